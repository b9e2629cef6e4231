"""The one mapping from domain errors to gRPC status codes with google.rpc rich details."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from crewdb.errors import (
    AlreadyExistsError,
    CrewdbError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)

ERROR_DOMAIN = "crewdb.v1"
DETAILS_KEY = "grpc-status-details-bin"
INTERNAL_MESSAGE = "internal error"
# Error details travel in headers, and a default client refuses more than 8 KiB of them.
MAX_MESSAGE = 600
MAX_VIOLATIONS = 10
MAX_VIOLATION_TEXT = 120

_CODES: dict[type[CrewdbError], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
}

Trailers = tuple[tuple[str, bytes | str], ...]


def status_code(error: CrewdbError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def from_error(error: CrewdbError, request_id: str) -> tuple[grpc.StatusCode, str, Trailers]:
    """(code, message, trailing metadata with the google.rpc.Status) for a domain error."""
    code = status_code(error)
    details = [_error_info(error.reason, request_id)]
    message = _clip(error.message, MAX_MESSAGE)
    if isinstance(error, InvalidArgumentError) and error.violations:
        # Within the 8 KiB of headers a default client accepts: a request with hundreds of bad
        # items gets the first of them and a count of the rest.
        shown = error.violations[:MAX_VIOLATIONS]
        violations = [
            error_details_pb2.BadRequest.FieldViolation(
                field=_clip(v.field, MAX_VIOLATION_TEXT), description=_clip(v.description, MAX_VIOLATION_TEXT)
            )
            for v in shown
        ]
        if len(error.violations) > len(shown):
            more = len(error.violations) - len(shown)
            violations.append(
                error_details_pb2.BadRequest.FieldViolation(
                    field=_clip(error.violations[len(shown)].field, MAX_VIOLATION_TEXT),
                    description=f"and {more} more problems like these",
                )
            )
        details.append(_pack(error_details_pb2.BadRequest(field_violations=violations)))
    if isinstance(error, ResourceExhaustedError) and error.retry_after_seconds is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_seconds * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return code, message, _trailers(code, message, details)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def internal(request_id: str) -> tuple[grpc.StatusCode, str, Trailers]:
    """The answer to an unexpected failure: a fixed message and the id to find it in the log."""
    code = grpc.StatusCode.INTERNAL
    message = f"{INTERNAL_MESSAGE} (request id {request_id})"
    return code, message, _trailers(code, message, [_error_info("INTERNAL", request_id)])


def _error_info(reason: str, request_id: str) -> any_pb2.Any:
    info = error_details_pb2.ErrorInfo(
        reason=reason, domain=ERROR_DOMAIN, metadata={"request_id": request_id}
    )
    return _pack(info)


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _trailers(code: grpc.StatusCode, message: str, details: list[any_pb2.Any]) -> Trailers:
    rpc_code: int = getattr(code_pb2, code.name)
    status = status_pb2.Status(code=rpc_code, message=message, details=details)
    return ((DETAILS_KEY, status.SerializeToString()),)
