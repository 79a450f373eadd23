"""The `sealroom` command line over a real gateway (mTLS on localhost:0) and its Docker site.

Every verb a person types in the README's session, with ``--json``, in order: the operator makes
the CA, the identities and a base model; the data owner registers a corpus, puts two policy
versions, lists and diffs them, and has a broken policy refused naming its field; the model team
submits, cannot approve its own job, and watches it train; the owner approves; the team downloads
the release and verifies it offline (and a tampered copy fails); compliance asks which jobs read
a file, reports on the dataset, exports the log and verifies the export.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gateway.cli import app
from tests.integration._deployment import policy
from trainers.synthetic import write_corpus

pytestmark = pytest.mark.docker

SPEC = textwrap.dedent("""\
    name: cli-story
    datasets: [books]
    base_model: tiny-lm
    trainer: causal-lm
    purpose: testing
    hyperparameters: {max_steps: 4, batch_size: 4, block_size: 32, seed: 0}
    resources: {cpus: 1, memory_mb: 2048, timeout_s: 300}
""")


class Cli:
    """``sealroom --home H --address A [--as NAME] ... --json``, parsed."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.address = ""

    def __call__(self, *args: str, who: str | None = None, ok: bool = True) -> Any:
        argv = ["--home", str(self.home)]
        if self.address:
            argv += ["--address", self.address]
        if who:
            argv += ["--as", who]
        r = CliRunner().invoke(app, [*argv, *args, "--json"])
        assert (r.exit_code == 0) is ok, (args, r.exit_code, r.stdout, r.stderr)
        out = r.stdout.strip()
        if args[:2] == ("job", "watch"):
            return [json.loads(line) for line in out.splitlines()]
        return json.loads(out) if out else None


@pytest.fixture
def cli(tmp_path: Path, docker_client: Any, runtime_image: str) -> Iterator[Cli]:
    from gateway.server import build

    c = Cli(tmp_path / "home")
    c("ca", "init")
    for name, role, team in (
        ("oscar", "operator", "ops"),
        ("olivia", "data-owner", "library"),
        ("theo", "model-team", "model-team"),
        ("carol", "compliance", "audit"),
    ):
        assert c("ca", "issue", name, "--role", role, "--team", team)["role"] == role
    write_corpus(tmp_path / "public", documents=20, seed=1000)
    c("model", "create-tiny", "tiny-lm", str(tmp_path / "public"))
    running = build(c.home, address="localhost:0")
    c.address = f"localhost:{running.port}"
    try:
        yield c
    finally:
        running.stop()


def test_the_whole_story_from_the_command_line(cli: Cli, tmp_path: Path) -> None:
    write_corpus(tmp_path / "books", documents=30, seed=7)
    ds = cli("dataset", "register", "books", str(tmp_path / "books"), who="olivia")
    assert ds["version"] == 1 and len(ds["files"]) == 30

    # Policies: a broken one is refused naming its field and changes nothing ...
    (tmp_path / "bad.yaml").write_text(policy("books").replace("dtype: bfloat16", "dtype: int4"))
    err = cli("policy", "put", "books", str(tmp_path / "bad.yaml"), who="olivia", ok=False)
    assert "release.dtype" in err["message"]
    # ... two good versions are kept, listed and diffed.
    (tmp_path / "p1.yaml").write_text(policy("books"))
    (tmp_path / "p2.yaml").write_text(policy("books").replace("max_cpus: 2", "max_cpus: 1"))
    assert cli("policy", "put", "books", str(tmp_path / "p1.yaml"), who="olivia")["version"] == 1
    assert cli("policy", "put", "books", str(tmp_path / "p2.yaml"), who="olivia")["version"] == 2
    versions = cli("policy", "versions", "books", who="olivia")
    assert [v["version"] for v in versions] == [1, 2]
    diff = json.dumps(cli("policy", "diff", "books", "1", "2", who="olivia"))
    assert "max_cpus" in diff and "max_memory_mb" not in diff

    # The operator rotates the site key: data keys re-wrapped, data not re-encrypted, and the
    # job below still reads it. Nobody else may.
    assert cli("site", "rotate-key", who="olivia", ok=False)["error"] == "PermissionDenied"
    vault = cli.home / "site" / "vault"
    chunks = {p: p.read_bytes() for p in vault.rglob("*") if p.is_file() and "key" not in p.name}
    rotated = cli("site", "rotate-key", who="oscar")
    assert rotated["dataset_versions"] == 1 and rotated["key_id"]
    assert {p: p.read_bytes() for p in chunks} == chunks

    (tmp_path / "spec.yaml").write_text(SPEC)
    job = cli("job", "submit", str(tmp_path / "spec.yaml"), who="theo")
    job_id = job["id"]
    assert job["state"] == "PENDING_APPROVAL"
    refused = cli("job", "approve", job_id, who="theo", ok=False)
    assert refused["error"] == "PermissionDenied"
    assert cli("job", "approve", job_id, who="olivia")["state"] in {"APPROVED", "QUEUED", "RUNNING"}
    events = cli("job", "watch", job_id, who="theo")
    states = [e["state"] for e in events if e.get("state")]
    assert states[-1] == "RELEASED", events
    assert "RUNNING" in states and "CHECKING" in states
    # The model team sees numbers only: steps and a loss, nothing else.
    progress = [e["progress"] for e in events if e.get("progress")]
    assert progress and all(set(p) <= {"step", "total", "loss"} for p in progress)
    assert max(p["step"] for p in progress) <= 4

    # Logs stay in the site's trust zone: the data owner and the operator, not the team.
    assert cli("job", "logs", job_id, who="theo", ok=False)["error"] == "PermissionDenied"
    assert cli("job", "logs", job_id, who="olivia")["job_id"] == job_id
    assert cli("job", "logs", job_id, who="oscar")["job_id"] == job_id

    release = tmp_path / "release"
    files = cli("release", "download", job_id, str(release), who="theo")["files"]
    assert "manifest.json" in files and "metrics.json" in files
    verified = cli("release", "verify", str(release))
    assert verified["valid"] and verified["manifest"]["job_id"] == job_id
    tampered = tmp_path / "tampered"
    shutil.copytree(release, tampered)
    metrics = json.loads((tampered / "metrics.json").read_text())
    metrics["eval_loss"] = 0.001
    (tampered / "metrics.json").write_text(json.dumps(metrics))
    bad = cli("release", "verify", str(tampered), ok=False)
    assert "metrics.json" in bad["message"]

    # Compliance: which jobs read this file, and which files did this job read.
    reads = cli("audit", "query", "--job", job_id, "--action", "data.read", who="carol")
    assert reads and all(r["job_id"] == job_id for r in reads)
    one = reads[0]["file"]
    by_file = cli("audit", "query", "--dataset", "books", "--file", one, who="carol")
    assert {r["job_id"] for r in by_file if r["action"] == "data.read"} == {job_id}
    report = cli("audit", "report", "books", who="carol")
    assert [r["job_id"] for r in report["reads"]] == [job_id]
    assert one in report["reads"][0]["files"]
    assert [r["job_id"] for r in report["releases"]] == [job_id]
    assert (
        cli("audit", "query", "--job", job_id, who="theo", ok=False)["error"] == "PermissionDenied"
    )

    export = tmp_path / "audit.jsonl"
    cli("audit", "export", str(export), who="carol")
    verdict = cli("audit", "verify", str(export))
    records = [line for line in export.read_text().splitlines() if line.startswith('{"chain"')]
    assert verdict["valid"] and verdict["size"] == len(records)
    # The export holds the policy versions as put, each audited, and the refused put too.
    leaves = [json.loads(line)["leaf"] for line in records]
    rotations = [p for p in leaves if p["action"] == "site.key_rotated"]
    assert [(r["principal"], r["details"]["key_id"]) for r in rotations] == [
        ("oscar", rotated["key_id"])
    ]
    puts = [
        (p["action"], p["outcome"], p["details"].get("version"))
        for p in leaves
        if p["action"] in {"policy.put", "rpc.PutPolicy"}
    ]
    assert puts == [
        ("rpc.PutPolicy", "error", None),
        ("policy.put", "ok", 1),
        ("rpc.PutPolicy", "allowed", None),
        ("policy.put", "ok", 2),
        ("rpc.PutPolicy", "allowed", None),
    ]
