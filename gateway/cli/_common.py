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
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console

from enclave.identity import IdentityFiles
from gateway.client import Client
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


def to_dict(msg: Message) -> dict[str, Any]:
    """``msg`` as JSON for scripts: proto3's mapping, except that 64-bit integers stay numbers
    (the mapping writes them as strings, which no script expects of a version or a size)."""
    d = MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _numbers(msg.DESCRIPTOR, d)  # type: ignore[arg-type]
    return d


_INT64 = frozenset({FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64})


def _numbers(desc: Descriptor, d: dict[str, Any]) -> None:
    for f in desc.fields:
        if f.name not in d:
            continue
        value = d[f.name]
        entry = f.message_type
        if entry is not None and entry.GetOptions().map_entry:
            vf = entry.fields_by_name["value"]
            for k, v in value.items():
                if vf.message_type is not None:
                    _numbers(vf.message_type, v)
                elif vf.cpp_type in _INT64:
                    value[k] = int(v)
        elif entry is not None:
            for v in value if isinstance(value, list) else [value]:
                _numbers(entry, v)
        elif f.cpp_type in _INT64:
            d[f.name] = [int(v) for v in value] if isinstance(value, list) else int(value)


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
