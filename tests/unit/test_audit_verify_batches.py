"""The export verifier read in small batches, its checkpoints read from the end: the same
roots at every size, and the same error named first as when every checkpoint line was read
before the records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave.audit import AuditEvent, AuditLog, CheckpointError, RecordError, _verify, verify_export

KEY = ed25519.Ed25519PrivateKey.generate()
PUB = KEY.public_key()
SIZES = (1, 7, 8, 33, 64, 100, 131)


def _event(i: int) -> AuditEvent:
    return AuditEvent(
        principal=f"p{i % 3}",
        role="model-team",
        action="rpc.GetJob",
        outcome="allowed",
        job_id=f"job-{i}",
        details={"i": i, "pad": "y" * (i % 17)},
    )


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, bytes]]:
    """An export with a checkpoint at each of SIZES, and the log's root at each size."""
    tmp = tmp_path_factory.mktemp("audit")
    log = AuditLog(tmp / "a.db", signing_key=KEY, checkpoint_interval_s=0)
    roots = {}
    i = 0
    for size in SIZES:
        while i < size:
            log.append(_event(i))
            i += 1
        log.checkpoint()
        roots[size] = log.root()
    log.export(tmp / "x.jsonl")
    log.close()
    return tmp / "x.jsonl", roots


@pytest.mark.parametrize(("batch_bytes", "chunk"), [(1, 1), (300, 4), (4096, 8), (1 << 18, 4096)])
def test_any_batch_and_chunk_size_gives_the_log_s_roots(
    made: tuple[Path, dict[int, bytes]],
    monkeypatch: pytest.MonkeyPatch,
    batch_bytes: int,
    chunk: int,
) -> None:
    path, roots = made
    monkeypatch.setattr(_verify, "_BATCH_BYTES", batch_bytes)
    monkeypatch.setattr(_verify, "_CHUNK", chunk)
    result = verify_export(path, public_key=PUB)
    assert (result.size, result.root) == (SIZES[-1], roots[SIZES[-1]])
    sizes: list[int] = []
    feed = _verify._Roots.feed

    def spy(self: _verify._Roots, hashes: bytes) -> bytes:
        out = feed(self, hashes)
        sizes.extend(s for s in self.roots if s not in sizes)
        return out

    monkeypatch.setattr(_verify._Roots, "feed", spy)
    with path.open("rb") as f:
        checker = _verify._Checker(SIZES)
        while batch := f.readlines(batch_bytes):
            checker.lines(batch)
        p = checker.finish()
    assert p.roots == roots  # the root at every checkpoint's size, chunk edges or not
    assert sorted(sizes) == list(SIZES)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "e.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_a_malformed_checkpoint_among_the_records_is_named_before_an_edited_record(
    made: tuple[Path, dict[int, bytes]], tmp_path: Path
) -> None:
    lines = _lines(made[0])
    lines[3] = lines[3].replace('"i":3', '"i":4')  # record 3 edited
    lines.insert(50, '{"checkpoint":{"size":"many"},"extends":{"size":0,"proof":[]}}')
    with pytest.raises(CheckpointError, match="line 51: a checkpoint has the wrong fields"):
        verify_export(_write(tmp_path, lines), public_key=PUB)
    del lines[50]  # without it, the edited record is what is named
    with pytest.raises(RecordError, match="record 3: its content does not match"):
        verify_export(_write(tmp_path, lines), public_key=PUB)


def test_of_two_malformed_checkpoints_the_first_in_the_file_is_named(
    made: tuple[Path, dict[int, bytes]], tmp_path: Path
) -> None:
    lines = _lines(made[0])
    lines.insert(20, '{"checkpoint":"not JSON at all')
    lines[-1] = lines[-1][: len(lines[-1]) // 2]  # the last checkpoint line cut short
    with pytest.raises(CheckpointError, match="line 21: a checkpoint line is not JSON"):
        verify_export(_write(tmp_path, lines), public_key=PUB)
    del lines[20]
    with pytest.raises(CheckpointError, match=f"line {len(lines)}: a checkpoint line is not"):
        verify_export(_write(tmp_path, lines), public_key=PUB)


def test_checkpoints_read_from_the_end_are_every_checkpoint(
    made: tuple[Path, dict[int, bytes]],
) -> None:
    with made[0].open("rb") as f:
        trailing = _verify._trailing_checkpoints(f)
        f.seek(0)
        everywhere = _verify._export_checkpoints(f)
    assert trailing == everywhere
    assert [x.checkpoint.size for x in trailing] == list(SIZES)


@pytest.mark.parametrize("tail", ["", "\n", "\n\n"])
def test_an_export_ending_in_any_number_of_newlines_is_judged_as_before(
    made: tuple[Path, dict[int, bytes]], tmp_path: Path, tail: str
) -> None:
    text = made[0].read_text().rstrip("\n") + tail
    p = tmp_path / "e.jsonl"
    p.write_text(text)
    if tail == "\n\n":  # an empty last line is not JSON
        with pytest.raises(Exception, match="is not JSON"):
            verify_export(p, public_key=PUB)
    else:
        assert verify_export(p, public_key=PUB).size == SIZES[-1]


def test_a_checkpoint_line_in_the_middle_of_checkpoints_parsed_once(
    made: tuple[Path, dict[int, bytes]], tmp_path: Path
) -> None:
    lines = _lines(made[0])
    cps = [x for x in lines if x.startswith('{"checkpoint"')]
    recs = [json.loads(x) for x in lines if not x.startswith('{"checkpoint"')]
    assert len(recs) == SIZES[-1] and len(cps) == len(SIZES)
    # A record between two checkpoints: every checkpoint is whole and signed, the layout lies.
    moved = lines[: len(recs) - 1] + cps[:2] + lines[len(recs) - 1 : len(recs)] + cps[2:]
    with pytest.raises(RecordError, match="an export lists every record first"):
        verify_export(_write(tmp_path, moved), public_key=PUB)
