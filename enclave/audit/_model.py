"""The audit log's values: events, records, signed checkpoints, and the canonical leaf encoding.

A leaf is the canonical encoding of one record: sorted-key, compact, ASCII-only JSON of the
event's fields with its sequence number and time, the very bytes ``json.dumps(...,
sort_keys=True, separators=(",", ":"))`` writes, built here without the general encoder because
it runs once per append. A checkpoint is signed as a small text note in the manner of C2SP's
signed notes (origin line, size, base64 root, time), so it can be checked with any Ed25519
library.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from json.encoder import c_make_encoder as _c_make_encoder  # type: ignore[attr-defined]
from json.encoder import encode_basestring_ascii as _json_str
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from policies.errors import AuditLogError, InvalidInput

ORIGIN = "sealroom-audit/v1"
FIELDS = ("principal", "role", "action", "outcome", "job_id", "dataset", "file")
_HEX32 = re.compile(r"[0-9a-f]{64}")


class RecordError(AuditLogError):
    """A record does not match its hash, its place, the chain or a signed checkpoint; ``seq``
    names the first record at fault."""

    def __init__(self, message: str, *, seq: int) -> None:
        super().__init__(f"record {seq}: {message}")
        self.seq = seq


class CheckpointError(AuditLogError):
    """A checkpoint is malformed, not signed by the gateway's key, or vouches for records
    that are not there."""


_SCALARS = frozenset({str, int, float, bool, type(None)})
_STR = frozenset({str})
_PLAIN = json.JSONEncoder(allow_nan=False)
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
)
_NO_DETAILS: Mapping[str, Any] = MappingProxyType({})


# The C encoder behind json.dumps, made once: JSONEncoder.encode makes one a call, which is
# half the cost of encoding a small dict. Same settings as _CANONICAL's, without the check for
# circular references (a flat dict of scalars cannot hold itself).
_C_FLAT = (
    None
    if _c_make_encoder is None
    else _c_make_encoder(None, _CANONICAL.default, _json_str, None, ":", ",", True, False, False)
)


def _canonical_flat(details: dict[str, Any]) -> str:
    """``_CANONICAL.encode(details)`` for a dict of scalars with string keys."""
    return _CANONICAL.encode(details) if _C_FLAT is None else "".join(_C_FLAT(details, 0))


@dataclass(frozen=True, init=False)
class AuditEvent:
    """Something that happened: who (name and role), what, how it ended, about what.

    ``details`` is copied (any JSON value the caller keeps cannot change the event later) and
    must be JSON: finite numbers, string keys."""

    principal: str
    role: str
    action: str
    outcome: str
    job_id: str | None = None
    dataset: str | None = None
    file: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def __init__(
        self,
        principal: str,
        role: str,
        action: str,
        outcome: str,
        job_id: str | None = None,
        dataset: str | None = None,
        file: str | None = None,
        details: Mapping[str, Any] = _NO_DETAILS,
    ) -> None:
        # Runs on every append, so the common case (plain strings, flat details) takes few
        # steps: the fields set at once, checked in one expression, details encoded in C.
        vars(self).update(
            principal=principal,
            role=role,
            action=action,
            outcome=outcome,
            job_id=job_id,
            dataset=dataset,
            file=file,
        )
        if not (
            type(principal) is str
            and principal
            and type(role) is str
            and role
            and type(action) is str
            and action
            and type(outcome) is str
            and outcome
            and (job_id is None or type(job_id) is str)
            and (dataset is None or type(dataset) is str)
            and (file is None or type(file) is str)
        ):
            self._check_fields()
        copy: dict[str, Any]
        if details is _NO_DETAILS:
            copy, text = {}, "{}"
        elif (
            type(details) is dict
            and set(map(type, details)) <= _STR
            and set(map(type, details.values())) <= _SCALARS
        ):
            try:  # flat, string keys, immutable values: a shallow copy is a deep one
                text = _canonical_flat(details)
            except ValueError as e:
                raise InvalidInput(f"audit event: details must be JSON ({e})") from e
            copy = dict(details)
        else:
            if not isinstance(details, Mapping):
                raise InvalidInput("audit event: details must be a mapping")
            try:
                # Through JSON and back: keys become strings, tuples lists; then the canonical
                # text of what is kept (int keys sort differently before conversion).
                copy = json.loads(_PLAIN.encode(dict(details)))
                text = _CANONICAL.encode(copy)
            except (TypeError, ValueError) as e:
                raise InvalidInput(f"audit event: details must be JSON ({e})") from e
        # The leaf up to its seq (see encode_leaf), made here: it depends on the event alone.
        head = (
            f'{{"action":{_json_str(self.action)},"dataset":{_opt(self.dataset)},'
            f'"details":{text},"file":{_opt(self.file)},"job_id":{_opt(self.job_id)},'
            f'"outcome":{_json_str(self.outcome)},"principal":{_json_str(self.principal)},'
            f'"role":{_json_str(self.role)},"seq":'
        ).encode("ascii")
        vars(self).update(details=MappingProxyType(copy), _leaf_head=head)

    def _check_fields(self) -> None:
        for name in ("principal", "role", "action", "outcome", "job_id", "dataset", "file"):
            value = getattr(self, name)
            if value is None and name in ("job_id", "dataset", "file"):
                continue
            if not isinstance(value, str) or not value:
                what = "a non-empty string" + (
                    " or None" if name in ("job_id", "dataset", "file") else ""
                )
                raise InvalidInput(f"audit event: {name} must be {what}")
            object.__setattr__(self, name, str.__str__(value))  # a str subclass, made plain


@dataclass(frozen=True)
class AuditRecord:
    """One appended event: its place (``seq``, 0-based), when, and its RFC 6962 leaf hash."""

    seq: int
    time: str
    event: AuditEvent
    leaf_hash: bytes

    @classmethod
    def _make(cls, seq: int, time: str, event: AuditEvent, leaf_hash: bytes) -> AuditRecord:
        """The writer's constructor (once per append): the same value, built in one step."""
        rec = object.__new__(cls)
        rec.__dict__.update(seq=seq, time=time, event=event, leaf_hash=leaf_hash)
        return rec


def now() -> str:
    """The current time as RFC 3339 UTC with microseconds (sorts as text)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def normal_time(text: str) -> str:
    """``text`` (RFC 3339) in the form :func:`now` writes, so that times compare as text."""
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as e:
        raise InvalidInput(f"{text!r} is not an RFC 3339 time") from e
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _opt(value: str | None) -> str:
    return "null" if value is None else _json_str(value)


def encode_leaf(seq: int, time: str, event: AuditEvent) -> bytes:
    """The canonical bytes of one record (see the module docstring; keys in sorted order)."""
    return b"%s%d%s" % (event._leaf_head, seq, leaf_tail(time))  # type: ignore[attr-defined]


def leaf_tail(time: str) -> bytes:
    """What follows a leaf's seq: its time and the closing brace."""
    return b',"time":%s}' % _json_str(time).encode("ascii")


def decode_leaf(leaf: bytes) -> tuple[int, str, AuditEvent]:
    """The inverse of :func:`encode_leaf`. Raises InvalidInput if it is not a leaf."""
    try:
        obj = json.loads(leaf)
        if not isinstance(obj, dict) or set(obj) != {"seq", "time", "details", *FIELDS}:
            raise InvalidInput(f"a leaf has the keys {sorted(obj)}")
        seq, time = obj["seq"], obj["time"]
        if type(seq) is not int or not isinstance(time, str):
            raise InvalidInput("a leaf's seq or time has the wrong type")
        return seq, time, AuditEvent(details=obj["details"], **{f: obj[f] for f in FIELDS})
    except (ValueError, TypeError) as e:
        raise InvalidInput(f"a leaf is not an event ({e})") from e


def parse_hex32(value: object, what: str) -> bytes:
    """A 32-byte hash written as 64 lowercase hex digits (only that spelling is accepted, so
    one hash has one text)."""
    if not isinstance(value, str) or not _HEX32.fullmatch(value):
        raise InvalidInput(f"{what} is not 64 lowercase hex digits")
    return bytes.fromhex(value)


@dataclass(frozen=True)
class SignedCheckpoint:
    """A signed statement that the log had ``size`` records with Merkle root ``root``."""

    size: int
    root: bytes
    time: str
    signature: bytes
    origin: str = ORIGIN

    def note(self) -> bytes:
        """The signed text: origin, size, base64 root, time, one a line."""
        return (
            f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n{self.time}\n"
        ).encode()

    def verify(self, public_key: ed25519.Ed25519PublicKey) -> None:
        """Raises :class:`CheckpointError` unless the gateway's key signed this checkpoint."""
        if self.origin != ORIGIN:
            raise CheckpointError(
                f"checkpoint at size {self.size}: origin {self.origin!r} is not {ORIGIN!r}"
            )
        try:
            public_key.verify(self.signature, self.note())
        except InvalidSignature as e:
            raise CheckpointError(
                f"checkpoint at size {self.size}: the signature is not the gateway key's"
            ) from e

    def to_dict(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "size": self.size,
            "root": self.root.hex(),
            "time": self.time,
            "signature": base64.b64encode(self.signature).decode(),
        }

    @classmethod
    def from_dict(cls, d: object) -> SignedCheckpoint:
        """Parse the form :meth:`to_dict` writes, accepting only its canonical spelling.
        Raises :class:`CheckpointError`."""
        try:
            if not isinstance(d, Mapping) or set(d) != {
                "origin",
                "size",
                "root",
                "time",
                "signature",
            }:
                raise CheckpointError(f"a checkpoint has the wrong fields: {d!r:.200}")
            size, sig, origin, time = d["size"], d["signature"], d["origin"], d["time"]
            if type(size) is not int or size < 0:
                raise CheckpointError(f"a checkpoint's size is not a count: {size!r}")
            if not all(isinstance(x, str) for x in (sig, origin, time)):
                raise CheckpointError("a checkpoint's signature, origin and time are text")
            signature = base64.b64decode(sig, validate=True)
            if base64.b64encode(signature).decode() != sig:
                raise CheckpointError("a checkpoint's signature is not canonical base64")
            return cls(
                size=size,
                root=parse_hex32(d["root"], "a checkpoint's root"),
                time=time,
                signature=signature,
                origin=origin,
            )
        except (InvalidInput, binascii.Error) as e:
            raise CheckpointError(f"a checkpoint is malformed: {e}") from e


@dataclass(frozen=True)
class VerifyResult:
    """What a verification established: ``size`` records with Merkle root ``root``, vouched
    for by the signed ``checkpoint``; ``unvouched`` records after it (a live database only:
    appended since its last checkpoint, e.g. before a crash) were checked against the chain."""

    size: int
    root: bytes
    checkpoint: SignedCheckpoint | None
    unvouched: int = 0

    @property
    def root_hex(self) -> str:
        return self.root.hex()
