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


# -- a remote site's log against the gateway's ------------------------------------------------


def _site_and_gateway(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """A deployment CA, a site's own log signed with its CA-issued key, and a gateway log that
    recorded one checkpoint of it: (home, site export, site certificate, gateway export)."""
    from enclave.provenance import SiteSigner
    from gateway.identity import CertificateAuthority

    home, gateway_export = _home(tmp_path, 0)
    ca = CertificateAuthority.init(home / "ca")
    ids = ca.site_signer("hospital", out_dir=tmp_path / "ids")
    signer = SiteSigner.from_files(cert=ids.cert, key=ids.key)
    site = AuditLog(tmp_path / "site.db", signing_key=signer.key, checkpoint_interval_s=0)
    for i in range(9):
        site.append(AuditEvent("hospital", "site", "data.read", "ok", file=f"f{i}"))
        if i == 4:
            site.export(tmp_path / "site-early.jsonl")  # the log at 5 records
    cp = site.checkpoint()
    site.append(AuditEvent("hospital", "site", "container.start", "ok"))
    site.export(tmp_path / "site.jsonl")
    site.close()
    gw = AuditLog(home / "gateway" / "audit.db", signing_key=KEY, checkpoint_interval_s=0)
    details = cp.to_dict()
    gw.append(AuditEvent("hospital", "site", "site.checkpoint", "ok", details=details))
    gw.export(gateway_export)
    gw.close()
    return home, tmp_path / "site.jsonl", ids.cert, gateway_export


def test_verify_a_sites_export_against_the_gateways(tmp_path: Path) -> None:
    home, site, cert, gateway = _site_and_gateway(tmp_path)
    args = (str(site), "--site-cert", str(cert))
    code, out = _run(home, *args, "--gateway-export", str(gateway))
    assert code == 0, out
    assert out["site"] == "hospital" and out["size"] == 10
    assert out["recorded"] == 1 and out["latest_recorded"] == 9
    code, out = _run(home, *args)  # the site's export alone
    assert code == 0 and out["size"] == 10
    # The gateway's export offered as the site's: not signed by the site's key.
    r = CliRunner().invoke(
        app, ["--home", str(home), "audit", "verify", str(gateway), "--site-cert", str(cert)]
    )
    assert r.exit_code == 1 and "signature" in _flat(r.output)
    # A certificate from another CA, and --gateway-export without a site certificate.
    from gateway.identity import CertificateAuthority

    other = CertificateAuthority.init(tmp_path / "other-ca")
    foreign = other.site_signer("hospital", out_dir=tmp_path / "foreign")
    r = CliRunner().invoke(
        app, ["--home", str(home), "audit", "verify", *args[:1], "--site-cert", str(foreign.cert)]
    )
    assert r.exit_code == 1 and "not issued by the given CA" in _flat(r.output)
    r = CliRunner().invoke(
        app, ["--home", str(home), "audit", "verify", str(site), "--gateway-export", str(gateway)]
    )
    assert r.exit_code == 1 and "give its --site-cert" in _flat(r.output)


def test_a_site_export_older_than_what_the_gateway_recorded_fails_the_cross_check(
    tmp_path: Path,
) -> None:
    home, _, cert, gateway = _site_and_gateway(tmp_path)
    early = tmp_path / "site-early.jsonl"
    code, out = _run(home, str(early), "--site-cert", str(cert))
    assert code == 0 and out["size"] == 5  # on its own, it verifies
    r = CliRunner().invoke(
        app,
        [
            "--home", str(home), "audit", "verify", str(early), "--site-cert", str(cert),
            "--gateway-export", str(gateway),
        ],
    )  # fmt: skip
    assert r.exit_code == 1
    assert "vouches for 9 records; this log's latest only for 5" in _flat(r.output)
