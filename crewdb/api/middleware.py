"""Server middleware: who may call each RPC, and every failure turned into a typed status, logged once."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc import aio

from crewdb import logs
from crewdb.api import status
from crewdb.api.metrics import MethodMetrics, Metrics
from crewdb.errors import (
    CrewdbError,
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from crewdb.models import Principal
from crewdb.v1 import options_pb2

log = logging.getLogger("crewdb.rpc")
security_log = logging.getLogger("crewdb.security")

REQUEST_ID_KEY = "x-request-id"
AUTHORIZATION_KEY = "authorization"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


Authenticate = Callable[[str | None], Principal]

_caller: ContextVar[Principal | None] = ContextVar("crewdb_caller", default=None)
# The client's address (`ipv4:10.0.0.5:41234`: the port tells connections apart), read when the
# call starts: grpc frees a cancelled call's state, and asking its context then crashes.
_peer: ContextVar[str] = ContextVar("crewdb_peer", default="-")


def caller() -> Principal:
    """The signed-in caller of the current RPC (set by the wrapper before the servicer runs)."""
    principal = _caller.get()
    if principal is None:  # a public method asking for a caller: a wiring mistake
        raise UnauthenticatedError("sign in first")
    return principal


class CallLimit:
    """At most `maximum` crewdb calls in progress at once (CREWDB_MAX_CONCURRENT_RPCS); one more
    is refused at once with RESOURCE_EXHAUSTED (TOO_MANY_CALLS), never queued.

    Counted here, not by grpc's `maximum_concurrent_rpcs`: that one counts every call, health
    probes included, so enough idle streams made liveness and readiness probes fail and a
    healthy server got restarted. grpc.health.v1 and server reflection are not mounted through
    this module, so they are never counted and never refused: a probe is always answered.

    Server streams (WatchMessages, WatchTask, ExportVectors) count for as long as they are
    open: each holds a coroutine, buffers and a subscription, and this limit is what bounds
    them. A flood of idle watchers can therefore refuse new crewdb calls, but never a probe.
    Every wrapper runs on the event loop's thread, so a plain counter needs no lock.
    """

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.in_progress = 0

    def enter(self, metrics: MethodMetrics | None) -> None:
        """Takes a place for a call; `leave` gives it back.

        Raises:
            ResourceExhaustedError: (TOO_MANY_CALLS) `maximum` calls are in progress; counted
                in `crewdb_rpc_refused_total`.
        """
        if self.in_progress >= self.maximum:
            if metrics is not None:
                metrics.refused.inc()
            raise ResourceExhaustedError(
                f"the server is at its limit of {self.maximum} calls in progress: retry shortly",
                retry_after_seconds=1.0,
                reason="TOO_MANY_CALLS",
            )
        self.in_progress += 1

    def leave(self) -> None:
        self.in_progress -= 1


def access_of(method: MethodDescriptor) -> int:
    """The method's `(crewdb.v1.access)` option; unset counts as ACCESS_USER (closed by default)."""
    access: int = method.GetOptions().Extensions[options_pb2.access]
    return access or options_pb2.ACCESS_USER


def mount(
    server: aio.Server,
    servicer: object,
    service: ServiceDescriptor,
    authenticate: Authenticate,
    metrics: Metrics | None = None,
    *,
    limit: CallLimit,
) -> None:
    """Serves `servicer`'s RPCs on `server`, each wrapped with access control, the limit on calls
    in progress, and errors turned into typed statuses (in place of the generated
    `add_*_to_server`).

    Access: each method's `(crewdb.v1.access)` option in the proto decides whether it needs an
    `authorization: Bearer <access token>` (and which role); the servicer then reads the
    caller with `caller()`.

    CrewdbError becomes its status code (crewdb.api.status) and anything unexpected becomes
    INTERNAL. The client gets a short message and an ErrorInfo with the reason and a request
    id (the caller's `x-request-id` when it sent a sane one); the log gets the method, code,
    reason and, for INTERNAL only, the traceback. Request bytes that do not decode (corrupt,
    invalid UTF-8, nested past protobuf's depth limit) are INVALID_ARGUMENT with reason
    MALFORMED_REQUEST, where grpcio alone would answer UNKNOWN.

    The wrapping is done once here rather than in a server interceptor: grpc.aio runs
    interceptors as an extra coroutine on every call, which was measured to cost more than a
    typical read.
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        behavior = getattr(servicer, method.name)
        path = f"/{service.full_name}/{method.name}"
        check = _access_check(access_of(method), authenticate)
        decode = _decoder(message_factory.GetMessageClass(method.input_type))
        encode = message_factory.GetMessageClass(method.output_type).SerializeToString
        instruments = metrics.for_method(path, streaming=method.server_streaming) if metrics else None
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _stream(path, behavior, check, limit, instruments),
                request_deserializer=decode,
                response_serializer=encode,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(path, behavior, check, limit, instruments),
                request_deserializer=decode,
                response_serializer=encode,
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


@dataclass(frozen=True, slots=True)
class _Malformed:
    """Stands in for a request whose bytes did not decode; the wrapper answers it."""

    type_name: str


def _decoder(message_class: type[Message]) -> Callable[[bytes], Any]:
    type_name = message_class.DESCRIPTOR.full_name

    def decode(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except Exception:  # noqa: BLE001 - DecodeError, RecursionError: all mean bad bytes
            return _Malformed(type_name)

    return decode


Check = Callable[["aio.ServicerContext[Any, Any]"], Principal | None]


def _access_check(access: int, authenticate: Authenticate) -> Check:
    def public(context: aio.ServicerContext[Any, Any]) -> None:
        _caller.set(None)

    def signed_in(context: aio.ServicerContext[Any, Any]) -> Principal:
        principal = authenticate(_bearer_token(context))
        _caller.set(principal)
        return principal

    def requiring(allowed: Callable[[Principal], bool], roles: str) -> Check:
        def check(context: aio.ServicerContext[Any, Any]) -> Principal:
            principal = authenticate(_bearer_token(context))
            _caller.set(principal)  # also for the log line of a denial
            if not allowed(principal):
                raise PermissionDeniedError(f"this needs the {roles} role")
            return principal

        return check

    if access == options_pb2.ACCESS_PUBLIC:
        return public
    if access == options_pb2.ACCESS_ADMIN:
        return requiring(lambda principal: principal.is_admin, "admin")
    if access == options_pb2.ACCESS_WORKER:
        return requiring(lambda principal: principal.runs_tasks, "worker or admin")
    return signed_in


def _bearer_token(context: aio.ServicerContext[Any, Any]) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORIZATION_KEY and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise UnauthenticatedError("authorization must be `Bearer <access token>`")
            return token.strip()
    return None


def peer_address(context: aio.ServicerContext[Any, Any]) -> str:
    """The client's address without its port (`ipv4:10.0.0.5:41234` -> `ipv4:10.0.0.5`)."""
    peer = context.peer() or "unknown"
    address, _, port = peer.rpartition(":")
    return address if address and port.isdigit() else peer


def _check_decoded(request: Any) -> None:
    if type(request) is _Malformed:
        raise InvalidArgumentError(
            f"malformed request: the bytes are not a valid {request.type_name} (corrupt, "
            "invalid UTF-8 in a string, or nested too deeply)",
            reason="MALFORMED_REQUEST",
        )


def _unary(
    method: str,
    behavior: Callable[..., Awaitable[Any]],
    check: Check,
    limit: CallLimit,
    metrics: MethodMetrics | None,
) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        started = metrics.begin() if metrics is not None else time.perf_counter()
        request_id = _begin(context)
        code = "CANCELLED"  # unless it finishes: the client went away or its deadline passed
        admitted = False
        try:
            try:
                limit.enter(metrics)
                admitted = True
                _check_decoded(request)
                check(context)
                response = await behavior(request, context)
            except Exception as error:  # noqa: BLE001 - the one place every failure is turned into a status
                status_code, message, trailers = _failure(method, error, started, request_id)
                code = status_code.name
                await context.abort(status_code, message, trailing_metadata=trailers)
            code = "OK"
            _log_call(method, code, started)
            return response
        finally:
            if admitted:
                limit.leave()
            if code == "CANCELLED":  # asyncio.CancelledError is no Exception: logged here
                _log_call(method, code, started)
            if metrics is not None:
                metrics.end(code, started)

    return call


def _stream(
    method: str,
    behavior: Callable[..., AsyncIterator[Any]],
    check: Check,
    limit: CallLimit,
    metrics: MethodMetrics | None,
) -> Callable[..., AsyncIterator[Any]]:
    async def call(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        started = metrics.begin() if metrics is not None else time.perf_counter()
        request_id = _begin(context)
        code = "CANCELLED"
        admitted = False
        try:
            try:
                limit.enter(metrics)  # for as long as the stream is open (see CallLimit)
                admitted = True
                _check_decoded(request)
                opened_by = check(context)
                async for response in behavior(request, context):
                    if opened_by is not None:
                        # Before every message: the checks are cached lookups, and a session
                        # ended or an account deactivated must stop the stream at once.
                        now_by = check(context)  # UNAUTHENTICATED once the token or session is over
                        if now_by is None or now_by.role is not opened_by.role:
                            raise PermissionDeniedError("your role changed: open the stream again")
                    yield response
            except Exception as error:  # noqa: BLE001 - see _unary
                status_code, message, trailers = _failure(method, error, started, request_id)
                code = status_code.name
                await context.abort(status_code, message, trailing_metadata=trailers)
            code = "OK"
            _log_call(method, code, started)
        finally:
            if admitted:
                limit.leave()
            if code == "CANCELLED":  # asyncio.CancelledError is no Exception: logged here
                _log_call(method, code, started)
            if metrics is not None:
                metrics.end(code, started)

    return call


def _begin(context: aio.ServicerContext[Any, Any]) -> str:
    """The call's request id: the caller's `x-request-id` if sane, else a new one. Every log line
    of the call carries it, and the client gets it back in the trailing metadata. Also notes the
    peer for the call's log line."""
    request_id = _request_id(context)
    logs.request_id.set(request_id)
    _peer.set(context.peer() or "-")
    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
    return request_id


def _log_call(
    method: str, code: str, started: float, reason: str = "", error: Exception | None = None
) -> None:
    """The one line every call gets: method, status code, duration, caller and peer (request id
    added by crewdb.logs). INTERNAL is an error, with its traceback; everything else is INFO."""
    level = logging.ERROR if error is not None else logging.INFO
    if not log.isEnabledFor(level):
        return
    elapsed = (time.perf_counter() - started) * 1000
    principal = _caller.get()
    user = principal.user_id if principal is not None else "-"
    peer = _peer.get()
    fields = {
        "method": method,
        "code": code,
        "reason": reason,
        "duration_ms": round(elapsed, 2),
        "user_id": user,
        "peer": peer,
    }
    text = f"{method} {code}{' ' + reason if reason else ''} {elapsed:.1f}ms user={user} peer={peer}"
    log.log(level, "%s", text, extra=fields, exc_info=error)


def _failure(
    method: str, error: Exception, started: float, request_id: str
) -> tuple[grpc.StatusCode, str, status.Trailers]:
    """Logs a failed call and says how to end it: its status code, message and trailers (the
    google.rpc.Status details and the request id)."""
    if isinstance(error, aio.AbortError):  # the handler aborted on purpose
        raise error
    if isinstance(error, CrewdbError):
        code, message, trailers = status.from_error(error, request_id)
        _log_call(method, code.name, started, error.reason)
        if isinstance(error, PermissionDeniedError):
            principal = _caller.get()
            security_log.warning(
                "permission denied: %s by user %s (%s)",
                method,
                principal.user_id if principal else "-",
                principal.role.value if principal else "-",
            )
    else:
        code, message, trailers = status.internal(request_id)
        _log_call(method, "INTERNAL", started, "INTERNAL", error)
    return code, message, (*trailers, (REQUEST_ID_KEY, request_id))


def _request_id(context: aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex[:16]
