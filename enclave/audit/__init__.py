"""The audit log: every access, durable before it is acknowledged, provable to an outsider.

:class:`AuditLog` appends :class:`AuditEvent` values as leaves of an RFC 6962 Merkle tree
(group-committed into SQLite, fsynced before ``append`` returns), signs checkpoints with the
gateway's Ed25519 key, answers compliance queries, takedown reports and inclusion and
consistency proofs, and exports JSON lines that :func:`verify_export` checks offline with the
public key alone. The tree maths is in :mod:`enclave.audit._merkle` (pure, no I/O); the values
and the leaf encoding in ``_model``; the one-pass verifier and the export format in ``_verify``
(its numpy batch path in ``_verify_fast``, held to the reference path by a property test).
:class:`AuditLog` itself is split by concern: the database, schema and tree in ``_store``, the
writer (batching durable appender) in ``_log``, checkpoints, export and verify in
``_checkpoints``, proofs and queries in ``_query``. :class:`AuditMirror` is a verified copy of
another party's log (a gateway's of each remote site's), grown only by stretches its owner
signed (``_mirror``); :func:`cross_check` checks a site's export against the gateway's
(``_crosscheck``).

Errors, all :class:`policies.errors.AuditLogError`::

    AuditLogError
    ├── RecordError        a record is edited, removed, inserted or moved (``.seq`` names it)
    ├── CheckpointError    a checkpoint is malformed, not the gateway's, or vouches for records
    │                      that are not there
    └── ProofError         an inclusion or consistency proof does not prove its claim
"""

from enclave.audit._crosscheck import ACTION as SITE_CHECKPOINT
from enclave.audit._crosscheck import CrossCheck, cross_check
from enclave.audit._log import AuditLog
from enclave.audit._merkle import ProofError, verify_consistency, verify_inclusion
from enclave.audit._mirror import AuditMirror
from enclave.audit._model import (
    AuditEvent,
    AuditRecord,
    CheckpointError,
    RecordError,
    SignedCheckpoint,
    VerifyResult,
)
from enclave.audit._report import DatasetReport
from enclave.audit._verify import verify_export

__all__ = [
    "SITE_CHECKPOINT",
    "AuditEvent",
    "AuditLog",
    "AuditMirror",
    "AuditRecord",
    "CheckpointError",
    "CrossCheck",
    "DatasetReport",
    "ProofError",
    "RecordError",
    "SignedCheckpoint",
    "VerifyResult",
    "cross_check",
    "verify_consistency",
    "verify_export",
    "verify_inclusion",
]
