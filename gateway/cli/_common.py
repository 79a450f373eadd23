"""What every CLI verb shares: where the deployment lives, who is calling, and output.

Every verb takes ``--json``: then it prints exactly one JSON document on stdout (errors too,
as ``{"error": ..., "message": ...}`` with a non-zero exit), and nothing else. The document is
made from the domain values the client returns (:func:`to_json`), never from wire messages.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from enclave.audit import AuditRecord, DatasetReport, SignedCheckpoint
from enclave.identity import IdentityFiles
from gateway._views import JobEvent
from gateway.client import Client, JobView
from gateway.server import DEFAULT_ADDRESS, default_home
from policies.errors import NotFound, SealroomError
from policies.review import ReviewReport

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)
F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = typer.Option(False, "--json", help="Print one JSON document instead of text.")


@dataclass
class Context:
    home: Path
    address: str
    identity: str | None


STATE = Context(home=default_home(), address=DEFAULT_ADDRESS, identity=None)


def identity_files(name: str | None = None) -> IdentityFiles:
    name = name or STATE.identity or os.environ.get("SEALROOM_IDENTITY")
    if not name:
        raise NotFound("no identity chosen: pass --as NAME or set SEALROOM_IDENTITY")
    ids = STATE.home / "identities"
    files = IdentityFiles(
        cert=ids / f"{name}.pem", key=ids / f"{name}.key", ca_cert=STATE.home / "ca" / "ca.pem"
    )
    if not files.cert.exists():
        raise NotFound(f"no identity {name!r} in {ids}: issue one with `sealroom ca issue`")
    return files


@contextmanager
def client() -> Iterator[Client]:
    with Client(STATE.address, identity_files()) as c:
        yield c


@functools.singledispatch
def to_json(value: object) -> Any:
    """``value`` as JSON for scripts: a dataclass as the object of its fields, an enum as its
    value, bytes as hex, a set sorted. The few values whose printed form differs from their
    fields (kept as the CLI has always printed them) are registered below."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, frozenset | set):
        return sorted(to_json(v) for v in value)
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


@to_json.register
def _(job: JobView) -> Any:
    d = to_json.dispatch(object)(job)
    del d["binding"]  # not sent to clients
    return d


@to_json.register
def _(event: JobEvent) -> Any:
    d: dict[str, Any] = {
        "job_id": event.job_id,
        "state": event.state.value,
        "reason": event.reason,
        "time": event.time,
        "terminal": event.terminal,
    }
    if event.progress is not None:
        step, total, loss = event.progress
        d["progress"] = {"step": step, "total": total, "loss": loss}
    return d


@to_json.register
def _(record: AuditRecord) -> Any:
    e = record.event
    return {
        "seq": record.seq,
        "time": record.time,
        "principal": e.principal,
        "role": e.role,
        "action": e.action,
        "outcome": e.outcome,
        "job_id": e.job_id or "",
        "dataset": e.dataset or "",
        "file": e.file or "",
        "details_json": json.dumps(dict(e.details), sort_keys=True),
        "leaf_hash": record.leaf_hash.hex(),
    }


@to_json.register
def _(report: DatasetReport) -> Any:
    return {
        "dataset": report.dataset,
        "accesses": to_json(report.accesses),
        "reads": [{"job_id": j, "files": list(f)} for j, f in report.reads.items()],
        "releases": to_json(report.releases),
    }


@to_json.register
def _(report: ReviewReport) -> Any:
    return report.to_dict()


@to_json.register
def _(cp: SignedCheckpoint) -> Any:
    # The form `audit verify --previous` reads back (with the exact signed text).
    return {
        "size": cp.size,
        "root_hash": cp.root.hex(),
        "time": cp.time,
        "signature": cp.to_dict()["signature"],
        "encoded": cp.note().decode(),
    }


def emit(as_json: bool, data: Any, text: Callable[[], None] | str | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        return
    if callable(text):
        text()
    elif text is not None:
        console.print(text)
    else:
        console.print_json(json.dumps(data, default=str))


def fail(as_json: bool, error: Exception) -> None:
    name = type(error).__name__
    if as_json:
        sys.stdout.write(json.dumps({"error": name, "message": str(error)}) + "\n")
    else:
        err_console.print(f"[bold red]error[/]: {error}", markup=True)
    raise typer.Exit(code=1)


@contextmanager
def errors(as_json: bool) -> Iterator[None]:
    """Turn Sealroom errors into a clear message and exit code 1."""
    try:
        yield
    except SealroomError as e:
        fail(as_json, e)
    except OSError as e:
        fail(as_json, e)
