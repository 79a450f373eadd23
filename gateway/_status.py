"""The one table from Sealroom errors to gRPC status codes (most specific class first)."""

from __future__ import annotations

import grpc

from policies import errors as e

STATUS: tuple[tuple[type[e.SealroomError], grpc.StatusCode], ...] = (
    (e.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (e.NotFound, grpc.StatusCode.NOT_FOUND),
    (e.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (e.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (e.PolicyViolation, grpc.StatusCode.FAILED_PRECONDITION),
    (e.InvalidState, grpc.StatusCode.FAILED_PRECONDITION),
    (e.ReleaseRefused, grpc.StatusCode.FAILED_PRECONDITION),
    (e.VerificationError, grpc.StatusCode.DATA_LOSS),
    (e.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.SiteError, grpc.StatusCode.UNAVAILABLE),
    (e.SealroomError, grpc.StatusCode.INTERNAL),
)

_BY_CODE: dict[grpc.StatusCode, type[e.SealroomError]] = {}
for _cls, _code in STATUS:
    _BY_CODE.setdefault(_code, _cls)


def status_for(error: e.SealroomError) -> grpc.StatusCode:
    for cls, code in STATUS:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def error_for(code: grpc.StatusCode, message: str) -> e.SealroomError:
    """The client side of the table: a status code back into an error class."""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return e.PermissionDenied(message)
    return _BY_CODE.get(code, e.SealroomError)(message)
