"""The one exception tree of Sealroom.

Every error the project raises on purpose derives from :class:`SealroomError`; third-party
errors (grpc, docker, sqlite, cryptography) are caught at the edge and re-raised as one of
these with ``raise ... from e``. The gateway maps each class to one gRPC status code in a
single table (``gateway/_status.py``), so the class chosen here is what a client sees.

    SealroomError
    ├── InvalidInput            bad input from a caller; names the field or file at fault
    │   ├── SpecError           a job spec or hyperparameter is malformed
    │   └── PolicyDocumentError a policy document does not validate (names line and field)
    ├── NotFound                a dataset, job, release or model that does not exist
    ├── AlreadyExists           a name already registered
    ├── PermissionDenied        the caller's role or ownership does not allow the action
    ├── PolicyViolation         a policy decision refused something (carries every reason)
    ├── InvalidState            the job's state does not allow the action now
    ├── VerificationError       a signature, hash, proof or log does not verify
    │   ├── SignatureError
    │   ├── IntegrityError      content hash or structure mismatch
    │   └── AuditLogError       the audit log or one of its proofs does not verify
    ├── ReleaseRefused          the release gate refused the job's outputs (which check,
    │                           never the data)
    ├── ResourceExhausted       a size cap, quota or queue limit was hit
    └── SiteError               the site or its runtime failed (the system's fault, not the job's)
        └── RuntimeBackendError the container backend (Docker, Kubernetes) failed
"""

from __future__ import annotations


class SealroomError(Exception):
    """Root of every error Sealroom raises on purpose."""


class InvalidInput(SealroomError):
    """Bad input from a caller. The message names the field or file at fault."""


class SpecError(InvalidInput):
    """A job spec or one of its hyperparameters is malformed."""


class PolicyDocumentError(InvalidInput):
    """A policy document does not validate; the message names the line and field."""


class NotFound(SealroomError):
    """A dataset, job, release or model that does not exist."""


class AlreadyExists(SealroomError):
    """A name that is already registered."""


class PermissionDenied(SealroomError):
    """The caller's role or ownership does not allow the action."""


class PolicyViolation(SealroomError):
    """A policy decision refused something. ``reasons`` lists every failing rule."""

    def __init__(self, message: str, *, reasons: tuple[str, ...] = ()) -> None:
        super().__init__(message if not reasons else f"{message}: {'; '.join(reasons)}")
        self.reasons = reasons


class InvalidState(SealroomError):
    """The job's current state does not allow the action."""


class VerificationError(SealroomError):
    """A signature, hash, proof or log does not verify."""


class SignatureError(VerificationError):
    """A signature does not verify against the expected key."""


class IntegrityError(VerificationError):
    """Content does not match its recorded hash or declared structure."""


class AuditLogError(VerificationError):
    """The audit log, a checkpoint or a proof does not verify."""


class ReleaseRefused(SealroomError):
    """The release gate refused the job's outputs; the message names the check, never the data."""


class ResourceExhausted(SealroomError):
    """A size cap, quota or queue limit was hit."""


class SiteError(SealroomError):
    """The site or its runtime failed: the system's fault, not the job's."""


class RuntimeBackendError(SiteError):
    """The container backend (Docker, Kubernetes) failed."""
