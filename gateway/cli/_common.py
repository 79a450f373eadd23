"""What every CLI verb shares: where the deployment lives, who is calling, and output.

Every verb takes ``--json``: then it prints exactly one JSON document on stdout (errors too,
as ``{"error": ..., "message": ...}`` with a non-zero exit), and nothing else.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import typer
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console

from gateway.client import Client
from gateway.identity import IdentityFiles
from gateway.server import DEFAULT_ADDRESS, default_home
from policies.errors import NotFound, SealroomError

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
    files = IdentityFiles(cert=ids / f"{name}.pem", key=ids / f"{name}.key",
                          ca_cert=STATE.home / "ca" / "ca.pem")
    if not files.cert.exists():
        raise NotFound(f"no identity {name!r} in {ids}: issue one with `sealroom ca issue`")
    return files


@contextmanager
def client() -> Iterator[Client]:
    with Client(STATE.address, identity_files()) as c:
        yield c


def to_dict(msg: Message) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True)


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
