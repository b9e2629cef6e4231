"""Server middleware: every RPC's errors become typed statuses, and every failure is logged once."""

from __future__ import annotations

import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from crewdb.api import status
from crewdb.errors import CrewdbError

log = logging.getLogger("crewdb.rpc")

REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

if TYPE_CHECKING:  # generic only in the type stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler


class ErrorInterceptor(aio.ServerInterceptor):
    """Maps CrewdbError to its status code and anything unexpected to INTERNAL.

    The client gets a short message, an ErrorInfo with the reason and a request id (the
    caller's `x-request-id` when it sent a sane one); the log gets the method, code, reason
    and, for INTERNAL only, the traceback. Wrapped handlers are built once per method.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, Handler | None] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method: str = details.method
        try:
            return self._wrapped[method]
        except KeyError:
            pass
        handler = await continuation(details)
        if handler is None:
            # Unknown methods are not cached, so callers cannot grow the cache without bound.
            return None
        # Handlers registered at start-up are the same for every call to a method.
        wrapped = self._wrapped[method] = _wrap(method, handler)
        return wrapped


def _wrap(method: str, handler: Handler) -> Handler:
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _unary(method, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
        return grpc.unary_stream_rpc_method_handler(
            _stream(method, handler.unary_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    # Streams written with context.write (health Watch) and bidirectional ones (reflection)
    # are library code that reports its own statuses.
    return handler


def _unary(method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        try:
            response = await behavior(request, context)
        except Exception as error:  # noqa: BLE001 - the one place every failure is turned into a status
            await _abort(method, context, error, started)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s OK %.1fms", method, (time.perf_counter() - started) * 1000)
        return response

    return call


def _stream(method: str, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def call(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        started = time.perf_counter()
        try:
            async for response in behavior(request, context):
                yield response
        except Exception as error:  # noqa: BLE001 - see _unary
            await _abort(method, context, error, started)
        log.debug("%s stream OK %.1fms", method, (time.perf_counter() - started) * 1000)

    return call


async def _abort(
    method: str, context: aio.ServicerContext[Any, Any], error: Exception, started: float
) -> None:
    if isinstance(error, aio.AbortError):  # the handler aborted on purpose
        raise error
    request_id = _request_id(context)
    elapsed = (time.perf_counter() - started) * 1000
    if isinstance(error, CrewdbError):
        code, message, trailers = status.from_error(error, request_id)
        log.info("%s %s %s %.1fms request_id=%s", method, code.name, error.reason, elapsed, request_id)
    else:
        code, message, trailers = status.internal(request_id)
        log.error("%s INTERNAL %.1fms request_id=%s", method, elapsed, request_id, exc_info=error)
    await context.abort(code, message, trailing_metadata=trailers)


def _request_id(context: aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex[:16]
