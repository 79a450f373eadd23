"""Authorisation and audit for every RPC, by wrapping each method handler.

Python server interceptors see no auth context, but the handler they return does: this
interceptor replaces every handler with one that (1) takes the principal from the verified TLS
client certificate (never from metadata), (2) checks the method's roles in :data:`ROLES`
(a method missing from the table is refused: fail closed), (3) runs the servicer, and (4)
appends an audit event, allowed or denied, before the answer goes out. Streaming responses
are audited before their first message. Domain errors become status codes via
:mod:`gateway._status`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from gateway._status import status_for
from gateway.identity import principal_from_certificate
from policies.errors import PermissionDenied, SealroomError
from policies.identity import USER_ROLES, Principal, Role

_ALL = USER_ROLES
_GATEWAY = "/sealroom.v1.Gateway/"

ROLES: dict[str, frozenset[Role]] = {
    "WhoAmI": _ALL,
    "RegisterDataset": frozenset({Role.DATA_OWNER}),
    "ListDatasets": _ALL,
    "PutPolicy": frozenset({Role.DATA_OWNER}),
    "GetPolicy": _ALL,
    "ListPolicyVersions": _ALL,
    "SubmitJob": frozenset({Role.MODEL_TEAM}),
    "GetJob": _ALL,
    "ListJobs": _ALL,
    "CancelJob": frozenset({Role.MODEL_TEAM, Role.OPERATOR}),
    "WatchJob": _ALL,
    "GetJobLogs": frozenset({Role.DATA_OWNER, Role.OPERATOR, Role.MODEL_TEAM}),
    "DecideJob": frozenset({Role.DATA_OWNER}),
    "ReviewRelease": frozenset({Role.DATA_OWNER}),
    "DecideRelease": frozenset({Role.DATA_OWNER}),
    "DownloadRelease": frozenset({Role.MODEL_TEAM, Role.DATA_OWNER, Role.COMPLIANCE}),
    "QueryAudit": frozenset({Role.COMPLIANCE, Role.OPERATOR}),
    "ExportAudit": frozenset({Role.COMPLIANCE, Role.OPERATOR}),
    "GetCheckpoint": frozenset({Role.COMPLIANCE, Role.OPERATOR}),
    "GetInclusionProof": frozenset({Role.COMPLIANCE, Role.OPERATOR}),
    "GetConsistencyProof": frozenset({Role.COMPLIANCE, Role.OPERATOR}),
    "AuditReport": frozenset({Role.COMPLIANCE, Role.OPERATOR}),
    "RotateSiteKey": frozenset({Role.OPERATOR}),
}

AuditFn = Callable[..., int]


@functools.lru_cache(maxsize=1024)
def _principal_from_pem(pem: bytes) -> Principal:
    return principal_from_certificate(pem)


def principal_of(context: grpc.ServicerContext) -> Principal:
    """The caller, from the TLS handshake. Raises PermissionDenied without a certificate."""
    auth = context.auth_context()
    found = auth.get("x509_pem_cert")
    certs: list[bytes] = found if isinstance(found, list) else []  # gRPC: a list; else none
    if not certs:
        raise PermissionDenied("no verified client certificate")
    return _principal_from_pem(bytes(certs[0]))


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, audit: AuditFn) -> None:
        self._audit = audit

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        name = method.removeprefix(_GATEWAY) if method.startswith(_GATEWAY) else method
        roles = ROLES.get(name, frozenset())
        action = f"rpc.{name}"

        def check(context: grpc.ServicerContext) -> Principal:
            try:
                principal = principal_of(context)
            except PermissionDenied as e:
                self._audit(
                    Principal("unknown", Role.SITE),
                    action,
                    outcome="denied",
                    details={"reason": str(e)},
                )
                context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
                raise  # abort raises; this line keeps type checkers honest
            if principal.role not in roles:
                reason = f"role {principal.role} may not call {name}" + (
                    f" (allowed: {', '.join(sorted(r.value for r in roles))})" if roles else ""
                )
                self._audit(principal, action, outcome="denied", details={"reason": reason})
                context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
            return principal

        def fail(context: grpc.ServicerContext, principal: Principal, err: SealroomError) -> None:
            self._audit(
                principal,
                action,
                outcome="error",
                details={"error": type(err).__name__, "message": str(err)},
            )
            context.abort(status_for(err), str(err))

        def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
                principal = check(context)
                try:
                    response = behavior(request, context)
                except SealroomError as err:
                    fail(context, principal, err)
                self._audit(principal, action, outcome="allowed")
                return response

            return wrapped

        def streaming(behavior: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
            def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                principal = check(context)
                try:
                    it = iter(behavior(request, context))
                    first = next(it, None)
                except SealroomError as err:
                    fail(context, principal, err)
                    return
                self._audit(principal, action, outcome="allowed")
                if first is None:
                    return
                yield first
                try:
                    yield from it
                except SealroomError as err:
                    context.abort(status_for(err), str(err))

            return wrapped

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                unary(handler.unary_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                unary(handler.stream_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                streaming(handler.unary_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            streaming(handler.stream_stream),
            handler.request_deserializer,
            handler.response_serializer,
        )
