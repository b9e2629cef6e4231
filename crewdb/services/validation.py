"""Request checks shared by the use cases: required ids and raising every violation at once."""

from __future__ import annotations

from crewdb.errors import FieldViolation, InvalidArgumentError

# Ids are server-made UUIDs; anything much longer cannot name a stored row.
ID_MAX_LENGTH = 128


def check_id(field: str, value: str) -> list[FieldViolation]:
    """The violation of a missing or overlong id, to report with the request's others."""
    if not value:
        return [FieldViolation(field, "required")]
    if len(value) > ID_MAX_LENGTH:
        return [FieldViolation(field, f"at most {ID_MAX_LENGTH} characters")]
    return []


def raise_if(violations: list[FieldViolation]) -> None:
    """Raises InvalidArgumentError naming every violation, if there are any."""
    if violations:
        raise InvalidArgumentError.of(violations)
