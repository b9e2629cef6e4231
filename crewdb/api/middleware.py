"""Server middleware: every RPC's errors become typed statuses, and every failure is logged once."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf.descriptor import ServiceDescriptor
from grpc import aio

from crewdb.api import status
from crewdb.errors import CrewdbError

log = logging.getLogger("crewdb.rpc")

REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

S = TypeVar("S")


def guard(servicer: S, service: ServiceDescriptor) -> S:
    """Wraps every RPC of `servicer`, in place, so that what it raises becomes a typed status.

    CrewdbError becomes its status code (crewdb.api.status) and anything unexpected becomes
    INTERNAL. The client gets a short message and an ErrorInfo with the reason and a request
    id (the caller's `x-request-id` when it sent a sane one); the log gets the method, code,
    reason and, for INTERNAL only, the traceback.

    Done once at start-up rather than in a server interceptor: grpc.aio runs interceptors as
    an extra coroutine on every call, which was measured to cost more than a typical read.
    """
    for method in service.methods:
        behavior = getattr(servicer, method.name)
        path = f"/{service.full_name}/{method.name}"
        if method.server_streaming:
            setattr(servicer, method.name, _stream(path, behavior))
        else:
            setattr(servicer, method.name, _unary(path, behavior))
    return servicer


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
