"""Authorisation and audit for every RPC, by wrapping each method handler.

Python server interceptors see no auth context, but the handler they return does: this
interceptor replaces every handler with one that (1) takes the principal from the verified TLS
client certificate (never from metadata), (2) checks the method's roles in :data:`ROLES`
(a method missing from the table is refused: fail closed), (3) runs the servicer, and (4)
appends exactly one audit event per call, whatever happens (but for a remote site's polls,
heartbeats and reports that succeed: :data:`QUIET`). Its outcome, and what the caller gets:

- ``denied``: no certificate with a valid role (recorded as principal and role
  ``unauthenticated``; the caller gets UNAUTHENTICATED), a certificate on the CA's revocation
  list (recorded as the principal it names; UNAUTHENTICATED: :class:`gateway.identity.
  RevocationList`, checked on every call, for every role, before the role), or a role the
  method does not allow (PERMISSION_DENIED); each with the reason.
- ``allowed``: the servicer answered; the answer.
- ``error``: a :class:`SealroomError` (its type and text; the status from :mod:`gateway._status`
  with the same text), or any other exception (its type name only, as in the server's log: its
  text may carry anything; the caller gets INTERNAL with a generic message).
- ``cancelled``: the client left (cancel, deadline) before a stream ended or a call failed.

A unary answer goes out only after its record is durable. A stream's record is written when it
ends (its last message, its error, or the client cancelling), so the record says how it ended;
what a stream carries was recorded by the domain before it left (``job.logs``,
``release.download``), and its OK status follows its record. If the append fails the call fails
closed: INTERNAL, never a success without its record. Servicers raise; they never call
``context.abort`` themselves.
"""

from __future__ import annotations

import functools
import logging
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Never

import grpc

from gateway._status import status_for
from gateway.identity import RevocationList, principal_from_certificate
from policies.errors import PermissionDenied, SealroomError
from policies.identity import USER_ROLES, Principal, Role

_LOG = logging.getLogger(__name__)
_ALL = USER_ROLES
_GATEWAY = "/sealroom.v1.Gateway/"
_SITELINK = "/sealroom.v1.SiteLink/"

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
    "ListSites": frozenset({Role.OPERATOR, Role.COMPLIANCE}),
    # The site link: remote sites only, each as the site its certificate names.
    "SiteLink.Hello": frozenset({Role.SITE}),
    "SiteLink.PullWork": frozenset({Role.SITE}),
    "SiteLink.Heartbeat": frozenset({Role.SITE}),
    "SiteLink.Report": frozenset({Role.SITE}),
    "SiteLink.FetchBundle": frozenset({Role.SITE}),
    "SiteLink.PushRelease": frozenset({Role.SITE}),
    "SiteLink.PushDataset": frozenset({Role.SITE}),
    "SiteLink.PushAudit": frozenset({Role.SITE}),
    "SiteLink.PullRound": frozenset({Role.SITE}),
    "SiteLink.AnswerRound": frozenset({Role.SITE}),
}

QUIET = frozenset(
    {"SiteLink.PullWork", "SiteLink.Heartbeat", "SiteLink.Report", "SiteLink.PullRound"}
)
"""Calls whose success is not an audit record of its own: a site's polls and heartbeats say
nothing, and what a report carries is recorded by the gateway as it applies it (the state, the
site's audit events). Their refusals and errors are recorded like any call's."""

AuditFn = Callable[..., int]

UNAUTHENTICATED = Principal("unauthenticated", Role.UNAUTHENTICATED)
"""Who the audit log names when the caller presented no certificate with a valid role."""

INTERNAL_MESSAGE = "internal error"
AUDIT_FAILED_MESSAGE = "internal error: the call could not be audited"


@functools.lru_cache(maxsize=1024)
def _principal_from_pem(pem: bytes) -> Principal:
    return principal_from_certificate(pem)


def client_certificate(context: grpc.ServicerContext) -> bytes:
    """The caller's certificate (PEM), as the TLS handshake verified it. Raises
    PermissionDenied without one."""
    found = context.auth_context().get("x509_pem_cert")
    certs: list[bytes] = found if isinstance(found, list) else []  # gRPC: a list; else none
    if not certs:
        raise PermissionDenied("no verified client certificate")
    return bytes(certs[0])


def principal_of(context: grpc.ServicerContext) -> Principal:
    """The caller, from the TLS handshake.

    Raises PermissionDenied without a certificate, or with one whose role is not a known role
    (``unauthenticated`` is never granted by a certificate)."""
    principal = _principal_from_pem(client_certificate(context))
    if principal.role is Role.UNAUTHENTICATED:
        raise PermissionDenied(
            f"client certificate carries an unknown role {principal.role.value!r}"
        )
    return principal


class _Record:
    """The one audit record of one call: the first path to reach it writes it, later ones
    find it written (a stream's end and gRPC's cancellation callback can race)."""

    def __init__(self, audit: AuditFn, action: str, *, quiet: bool = False) -> None:
        self._audit = audit
        self._action = action
        self._quiet = quiet  # an allowed call is not recorded (QUIET)
        self._lock = threading.Lock()
        self._written = False

    def write(
        self, principal: Principal, outcome: str, details: Mapping[str, Any] | None = None
    ) -> bool:
        """Append the record unless it is written already. False when the append failed."""
        with self._lock:
            if self._written:
                return True
            self._written = True
        if self._quiet and outcome == "allowed":
            return True
        try:
            self._audit(principal, self._action, outcome=outcome, details=dict(details or {}))
        except Exception as err:
            _LOG.error("%s: the audit append failed (%s)", self._action, type(err).__name__)
            return False
        return True


def _where(err: BaseException) -> str:
    """Where an exception was raised (files, lines, code), without its text."""
    return "".join(traceback.format_list(traceback.extract_tb(err.__traceback__)))


class AuthInterceptor(grpc.ServerInterceptor):
    """``revoked``: the CA's revocation list (None: a deployment that revokes nothing, as in
    tests that build a server by hand)."""

    def __init__(self, audit: AuditFn, *, revoked: RevocationList | None = None) -> None:
        self._audit = audit
        self._revoked = revoked

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        if method.startswith(_GATEWAY):
            name = method.removeprefix(_GATEWAY)
        elif method.startswith(_SITELINK):
            name = "SiteLink." + method.removeprefix(_SITELINK)
        else:
            name = method
        roles = ROLES.get(name, frozenset())
        action = f"rpc.{name}"

        def refuse(
            context: grpc.ServicerContext,
            record: _Record,
            principal: Principal,
            code: grpc.StatusCode,
            reason: str,
        ) -> Never:
            if not record.write(principal, "denied", {"reason": reason}):
                context.abort(grpc.StatusCode.INTERNAL, AUDIT_FAILED_MESSAGE)
            context.abort(code, reason)

        def fail(
            context: grpc.ServicerContext, record: _Record, principal: Principal, err: Exception
        ) -> Never:
            details: dict[str, str] = {"error": type(err).__name__}
            outcome = "error" if context.is_active() else "cancelled"
            if isinstance(err, SealroomError):
                details["message"] = str(err)  # the caller gets this text too
                code, message = status_for(err), str(err)
            else:  # its text may carry anything: neither the record nor the caller sees it
                code, message = grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
                if outcome == "error":
                    _LOG.error("%s raised %s at\n%s", action, type(err).__name__, _where(err))
            if not record.write(principal, outcome, details):
                code, message = grpc.StatusCode.INTERNAL, AUDIT_FAILED_MESSAGE
            context.abort(code, message)

        def check(context: grpc.ServicerContext, record: _Record) -> Principal:
            try:
                principal = principal_of(context)
            except PermissionDenied as e:
                refuse(context, record, UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED, str(e))
            except Exception as e:  # a certificate the parser chokes on: still one record
                fail(context, record, UNAUTHENTICATED, e)
            if self._revoked is not None:
                try:
                    self._revoked.check(client_certificate(context))
                except PermissionDenied as e:
                    refuse(context, record, principal, grpc.StatusCode.UNAUTHENTICATED, str(e))
                except Exception as e:
                    fail(context, record, principal, e)
            if principal.role not in roles:
                reason = f"role {principal.role} may not call {name}" + (
                    f" (allowed: {', '.join(sorted(r.value for r in roles))})" if roles else ""
                )
                refuse(context, record, principal, grpc.StatusCode.PERMISSION_DENIED, reason)
            return principal

        def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
                record = _Record(self._audit, action, quiet=name in QUIET)
                principal = check(context, record)
                try:
                    response = behavior(request, context)
                except Exception as err:
                    fail(context, record, principal, err)
                if not record.write(principal, "allowed"):
                    context.abort(grpc.StatusCode.INTERNAL, AUDIT_FAILED_MESSAGE)
                return response

            return wrapped

        def streaming(behavior: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
            def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                record = _Record(self._audit, action, quiet=name in QUIET)
                principal = check(context, record)

                def gone() -> None:  # gRPC calls it when the call ends, however it ends
                    record.write(principal, "cancelled")

                if not context.add_callback(gone):
                    gone()  # the call has ended already
                try:
                    yield from behavior(request, context)
                except GeneratorExit:  # gRPC dropped the stream: the client left
                    gone()
                    raise
                except Exception as err:
                    fail(context, record, principal, err)
                outcome = "allowed" if context.is_active() else "cancelled"
                if not record.write(principal, outcome):
                    context.abort(grpc.StatusCode.INTERNAL, AUDIT_FAILED_MESSAGE)

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
