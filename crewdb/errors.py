"""The domain error tree: what can go wrong, in words every layer understands.

    CrewdbError                    base; carries a stable UPPER_SNAKE `reason`
    ├── InvalidArgumentError       bad input; lists FieldViolation(field, description)
    ├── NotFoundError              a named thing does not exist (or is not yours)
    ├── AlreadyExistsError         a unique thing exists already
    ├── PermissionDeniedError      signed in, but not allowed
    ├── UnauthenticatedError       no valid credentials
    ├── FailedPreconditionError    the thing is not in a state that allows this
    ├── ResourceExhaustedError     a limit or quota was hit; may say when to retry
    └── UnavailableError           a dependency is down; retrying later may work

Services and storage raise these; `crewdb.api.status` is the one place that turns them into
gRPC status codes with rich details. Messages are short, name the thing, and never contain
secrets.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One offending request field, named as in the proto (`metadata`, `page_size`)."""

    field: str
    description: str


class CrewdbError(Exception):
    """Base of every error crewdb reports to its callers."""

    default_reason = "ERROR"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason


class InvalidArgumentError(CrewdbError):
    """The request is malformed; `violations` names every offending field."""

    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        violations: list[FieldViolation] | None = None,
        *,
        reason: str | None = None,
    ) -> None:
        super().__init__(message, reason=reason)
        self.violations = violations or []

    @classmethod
    def of(cls, violations: list[FieldViolation]) -> InvalidArgumentError:
        """One error for several violations; the message names them all."""
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        return cls(f"invalid request: {summary}", violations)


class NotFoundError(CrewdbError):
    default_reason = "NOT_FOUND"


class AlreadyExistsError(CrewdbError):
    default_reason = "ALREADY_EXISTS"


class PermissionDeniedError(CrewdbError):
    default_reason = "PERMISSION_DENIED"


class UnauthenticatedError(CrewdbError):
    default_reason = "UNAUTHENTICATED"


class FailedPreconditionError(CrewdbError):
    default_reason = "FAILED_PRECONDITION"


class ResourceExhaustedError(CrewdbError):
    """A limit was hit; `retry_after_seconds` says when trying again may succeed."""

    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self, message: str, *, retry_after_seconds: float | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        self.retry_after_seconds = retry_after_seconds


class UnavailableError(CrewdbError):
    default_reason = "UNAVAILABLE"
