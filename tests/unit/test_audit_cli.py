"""`sealroom audit verify` offline: an export or the local log, and --previous checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from typer.testing import CliRunner

from enclave.audit import AuditEvent, AuditLog
from gateway.cli import app

KEY = ed25519.Ed25519PrivateKey.generate()


def _home(tmp_path: Path, n: int) -> tuple[Path, Path]:
    gw = tmp_path / "home" / "gateway"
    gw.mkdir(parents=True)
    (gw / "audit-signing.pub").write_bytes(
        KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    log = AuditLog(gw / "audit.db", signing_key=KEY, checkpoint_interval_s=0)
    for i in range(n):
        log.append(
            AuditEvent(
                principal="p", role="operator", action="rpc.X", outcome="ok", details={"i": i}
            )
        )
    early = log.checkpoint()
    (tmp_path / "early.json").write_text(json.dumps(early.to_dict()))
    for i in range(n, 2 * n):
        log.append(
            AuditEvent(
                principal="p", role="operator", action="rpc.X", outcome="ok", details={"i": i}
            )
        )
    log.export(tmp_path / "x.jsonl")
    log.close()
    return tmp_path / "home", tmp_path / "x.jsonl"


def _flat(text: str) -> str:
    return " ".join(text.split())  # the terminal wraps long messages


def _run(home: Path, *args: str) -> tuple[int, dict]:
    r = CliRunner().invoke(app, ["--home", str(home), "audit", "verify", *args, "--json"])
    return r.exit_code, json.loads(r.stdout) if r.stdout.strip() else {}


def test_verify_an_export_and_that_it_extends_an_earlier_checkpoint(tmp_path: Path) -> None:
    home, export = _home(tmp_path, 6)
    code, out = _run(home, str(export), "--previous", str(tmp_path / "early.json"))
    assert code == 0, out
    assert out["valid"] and out["size"] == 12 and out["extends"]["size"] == 6
    code, out = _run(home, "--previous", str(tmp_path / "early.json"))  # the local database
    assert code == 0 and out["size"] == 12 and out["unvouched"] == 0


def test_verify_names_the_edited_record_and_a_foreign_previous(tmp_path: Path) -> None:
    home, export = _home(tmp_path, 6)
    lines = export.read_text().splitlines()
    rec = json.loads(lines[8])
    rec["leaf"]["outcome"] = "denied"
    lines[8] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join(lines) + "\n")
    r = CliRunner().invoke(app, ["--home", str(home), "audit", "verify", str(edited)])
    assert r.exit_code == 1 and "record 8: its content does not match" in _flat(r.output)
    early = json.loads((tmp_path / "early.json").read_text())
    early["root"] = "00" * 32
    (tmp_path / "forged.json").write_text(json.dumps(early))
    r = CliRunner().invoke(
        app,
        [
            "--home",
            str(home),
            "audit",
            "verify",
            str(export),
            "--previous",
            str(tmp_path / "forged.json"),
        ],
    )
    assert r.exit_code == 1 and "not the gateway key" in _flat(r.output)
    (tmp_path / "junk.json").write_text("{}")
    r = CliRunner().invoke(
        app,
        [
            "--home",
            str(home),
            "audit",
            "verify",
            str(export),
            "--previous",
            str(tmp_path / "junk.json"),
        ],
    )
    assert r.exit_code == 1 and "not a checkpoint" in _flat(r.output)
