"""The audit log: every access, durable before it is acknowledged, provable to an outsider.

:class:`AuditLog` appends :class:`AuditEvent` values as leaves of an RFC 6962 Merkle tree
(group-committed into SQLite, fsynced before ``append`` returns), signs checkpoints with the
gateway's Ed25519 key, answers compliance queries and inclusion and consistency proofs, and
exports JSON lines that :func:`verify_export` checks offline with the public key alone. The
tree maths is in :mod:`gateway.audit._merkle` (pure, no I/O).

Errors, all :class:`policies.errors.AuditLogError`::

    AuditLogError
    ├── RecordError        a record is edited, removed, inserted or moved (``.seq`` names it)
    ├── CheckpointError    a checkpoint's signature or size does not hold
    └── ProofError         an inclusion or consistency proof does not prove its claim
"""

from gateway.audit._log import (
    AuditEvent,
    AuditLog,
    AuditRecord,
    CheckpointError,
    RecordError,
    SignedCheckpoint,
    VerifyResult,
    verify_export,
)
from gateway.audit._merkle import ProofError, verify_consistency, verify_inclusion

__all__ = [
    "AuditEvent",
    "AuditLog",
    "AuditRecord",
    "CheckpointError",
    "ProofError",
    "RecordError",
    "SignedCheckpoint",
    "VerifyResult",
    "verify_consistency",
    "verify_export",
    "verify_inclusion",
]
