"""Operator verbs: the CA and identities, running the gateway, the site's base models."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

import typer

from gateway.cli._common import STATE, JsonOpt, emit, errors
from gateway.identity import CertificateAuthority
from policies.errors import InvalidInput
from policies.identity import USER_ROLES, Role

ca_app = typer.Typer(
    help="The deployment's certificate authority and identities.", no_args_is_help=True
)
model_app = typer.Typer(help="The site's base model store (operator).", no_args_is_help=True)


@ca_app.command("init")
def ca_init(as_json: bool = JsonOpt) -> None:
    """Create the deployment CA under $SEALROOM_HOME/ca."""
    with errors(as_json):
        ca = CertificateAuthority.init(STATE.home / "ca")
        emit(as_json, {"ca_cert": str(ca.cert_path)}, f"CA created: {ca.cert_path}")


def _issue_site(name: str, as_json: bool) -> None:
    """A remote site's two identities: its TLS client identity (role site) and its release-
    signing identity (Ed25519), both under identities/, for the operator to hand to the site."""
    ca = CertificateAuthority.load(STATE.home / "ca")
    out = STATE.home / "identities"
    tls = ca.issue(name, role=Role.SITE, out_dir=out)
    signer = ca.site_signer(name, out_dir=out)
    emit(
        as_json,
        {
            "name": name,
            "role": Role.SITE.value,
            "cert": str(tls.cert),
            "key": str(tls.key),
            "signer_cert": str(signer.cert),
            "signer_key": str(signer.key),
            "ca_cert": str(ca.cert_path),
        },
        f"issued site {name}: {tls.cert} and its release signer {signer.cert}; copy them, "
        f"their keys and {ca.cert_path} to the site's home (identities/, ca/)",
    )


@ca_app.command("issue")
def ca_issue(
    name: str,
    role: str = typer.Option(..., help="model-team, data-owner, compliance, operator or site"),
    team: str = typer.Option("", help="the principal's team (used by policies)"),
    as_json: bool = JsonOpt,
) -> None:
    """Issue a client identity whose role is carried in its certificate."""
    with errors(as_json):
        try:
            r = Role(role)
        except ValueError:
            raise InvalidInput(
                f"unknown role {role!r}: use model-team, data-owner, compliance, operator or site"
            ) from None
        if r is Role.SITE:
            _issue_site(name, as_json)
            return
        if r not in USER_ROLES:
            raise InvalidInput(
                f"role {role!r} is never carried by a certificate: use model-team, data-owner, "
                "compliance or operator"
            )
        ca = CertificateAuthority.load(STATE.home / "ca")
        files = ca.issue(name, role=r, team=team, out_dir=STATE.home / "identities")
        emit(
            as_json,
            {
                "name": name,
                "role": r.value,
                "team": team,
                "cert": str(files.cert),
                "key": str(files.key),
            },
            f"issued {name} ({r.value}): {files.cert}",
        )


@ca_app.command("revoke")
def ca_revoke(name: str, as_json: bool = JsonOpt) -> None:
    """Revoke every certificate the CA issued to NAME (a site's TLS and release-signing
    identities both): the gateway refuses them from its next call on, and audits each refusal."""
    with errors(as_json):
        ca = CertificateAuthority.load(STATE.home / "ca")
        serials = ca.revoke(name)
        emit(
            as_json,
            {"name": name, "revoked": serials, "crl": str(ca.crl_path)},
            f"revoked {len(serials)} certificate(s) of {name}: {', '.join(serials)} ({ca.crl_path})"
            if serials
            else f"every certificate of {name} was revoked already ({ca.crl_path})",
        )


def up(
    address: str = typer.Option(None, help="host:port to listen on"),
    workers: int = typer.Option(1, help="jobs the local site runs at once"),
    gpus: int = typer.Option(0, help="GPUs the local site may grant a job"),
    runtime: str = typer.Option(
        "runc",
        help="OCI runtime for job containers (runc, runsc, "
        "kata-runtime: what the engine has installed)",
    ),
    warm: int = typer.Option(
        0,
        min=0,
        help="containers kept started ahead of jobs, their imports done: a built-in trainer's "
        "job then starts in one (about 4 s sooner to its first step); each is used once",
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Run the gateway and one local enclave site in this process until interrupted."""
    from gateway.server import build

    with errors(as_json):
        running = build(
            STATE.home,
            address=address or STATE.address,
            workers=workers,
            gpus=gpus,
            container_runtime=runtime,
            warm_containers=warm,
        )
        emit(
            as_json,
            {"port": running.port, "home": str(STATE.home)},
            f"sealroom gateway listening on port {running.port} (home {STATE.home})",
        )
        done = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: done.set())
        with contextlib.suppress(KeyboardInterrupt):
            done.wait()
        running.stop()


@model_app.command("register")
def model_register(name: str, directory: Path, as_json: bool = JsonOpt) -> None:
    """Register a Hugging Face-format model directory as a base model of the local site."""
    from enclave.models import ModelStore

    with errors(as_json):
        info = ModelStore(STATE.home / "site" / "models").register(name, directory)
        emit(
            as_json,
            {"name": info.name, "sha256": info.sha256, "tensors": len(info.layout)},
            f"registered base model {info.name} ({len(info.layout)} tensors, {info.sha256[:16]})",
        )


@model_app.command("create-tiny")
def model_create_tiny(name: str, corpus: Path, as_json: bool = JsonOpt) -> None:
    """Create a tiny causal LM locally (tokenizer trained on CORPUS) and register it."""
    import tempfile

    from enclave.models import ModelStore
    from trainers.basemodel import create_base_model

    with errors(as_json):
        texts = [p.read_text() for p in sorted(corpus.rglob("*.txt"))]
        if not texts:
            raise InvalidInput(f"{corpus} holds no .txt files to train a tokenizer on")
        with tempfile.TemporaryDirectory() as tmp:
            path = create_base_model(Path(tmp) / name, texts=texts, seed=0)
            info = ModelStore(STATE.home / "site" / "models").register(name, path)
        emit(
            as_json,
            {"name": info.name, "sha256": info.sha256},
            f"created and registered base model {info.name}",
        )
