"""Server middleware: every RPC's errors become typed statuses, and every failure is logged once."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from grpc import aio

from crewdb.api import status
from crewdb.errors import CrewdbError, InvalidArgumentError

log = logging.getLogger("crewdb.rpc")

REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def mount(server: aio.Server, servicer: object, service: ServiceDescriptor) -> None:
    """Serves `servicer`'s RPCs on `server`, each wrapped so that what it raises becomes a typed
    status (in place of the generated `add_*_to_server`).

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
        decode = _decoder(message_factory.GetMessageClass(method.input_type))
        encode = message_factory.GetMessageClass(method.output_type).SerializeToString
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _stream(path, behavior), request_deserializer=decode, response_serializer=encode
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(path, behavior), request_deserializer=decode, response_serializer=encode
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


def _check_decoded(request: Any) -> None:
    if type(request) is _Malformed:
        raise InvalidArgumentError(
            f"malformed request: the bytes are not a valid {request.type_name} (corrupt, "
            "invalid UTF-8 in a string, or nested too deeply)",
            reason="MALFORMED_REQUEST",
        )


def _unary(method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        try:
            _check_decoded(request)
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
            _check_decoded(request)
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
