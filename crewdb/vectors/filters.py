"""Checks chunk metadata and turns filters into ChromaDB `where` clauses, naming bad fields (vectors layer).

Metadata is flat: string, number or boolean values (numbers are stored and compared as floats).
A filter is ChromaDB's `where` language over it: `{"topic": "billing", "year": {"$gte": 2020}}`,
with `$and`/`$or` lists; several keys in one object, or several operators on one key, mean AND.
Chroma itself accepts only one key per object and at least two items per `$and`/`$or`, so
filters are normalised to that shape.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any

from crewdb.errors import FieldViolation
from crewdb.models import JsonObject

Scalar = str | int | float | bool
Where = dict[str, Any]

MAX_KEYS = 32
MAX_KEY_LENGTH = 64
MAX_STRING_VALUE = 4096
MAX_FILTER_DEPTH = 8
MAX_FILTER_CONDITIONS = 100
MAX_LIST_ITEMS = 100
# Chroma stores integers as 64-bit.
_INT64 = 2**63
# Keys crewdb keeps on every chunk (`_doc`, `_idx`, ...) and Chroma's own (`#document`).
RESERVED_PREFIXES = ("_", "#", "$")
_COMPARISONS = ("$gt", "$gte", "$lt", "$lte")
_EQUALITIES = ("$eq", "$ne")
_MEMBERSHIPS = ("$in", "$nin")
_LOGICAL = ("$and", "$or")


def check_metadata(metadata: JsonObject, field: str) -> list[FieldViolation]:
    """The violations of metadata that is not a flat object of at most MAX_KEYS scalars."""
    if len(metadata) > MAX_KEYS:
        return [FieldViolation(field, f"at most {MAX_KEYS} keys")]
    violations: list[FieldViolation] = []
    for key, value in metadata.items():
        problem = _key_problem(key) or _scalar_problem(value)
        if problem:
            violations.append(FieldViolation(f"{field}.{key}" if key else field, problem))
    return violations


def to_where(filter_: JsonObject, field: str) -> tuple[Where | None, list[FieldViolation]]:
    """The filter as a Chroma `where` clause (None when empty), or the violations that stop it."""
    if not filter_:
        return None, []
    builder = _WhereBuilder()
    where = builder.expression(filter_, field, depth=1)
    if builder.conditions > MAX_FILTER_CONDITIONS:
        builder.violations.append(FieldViolation(field, f"at most {MAX_FILTER_CONDITIONS} conditions"))
    return (None, builder.violations) if builder.violations else (where, [])


class _WhereBuilder:
    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []
        self.conditions = 0

    def expression(self, node: object, path: str, depth: int) -> Where:
        if depth > MAX_FILTER_DEPTH:
            return self._fail(path, f"nested at most {MAX_FILTER_DEPTH} deep")
        if not isinstance(node, dict) or not node:
            return self._fail(path, "must be a non-empty object")
        parts: list[Where] = []
        for key, value in node.items():
            if key in _LOGICAL:
                parts.append(self._logical(key, value, f"{path}.{key}", depth))
            elif key.startswith("$"):
                self._fail(
                    f"{path}.{key}", f"unknown operator; expected a key or one of {', '.join(_LOGICAL)}"
                )
            elif problem := _key_problem(key):
                self._fail(f"{path}.{key}" if key else path, problem)
            else:
                parts.extend(self._conditions(key, value, f"{path}.{key}"))
        return _all_of(parts)

    def _logical(self, operator: str, items: object, path: str, depth: int) -> Where:
        if not isinstance(items, list) or not items:
            return self._fail(path, "must be a non-empty list of filters")
        parts = [self.expression(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(items)]
        return parts[0] if len(parts) == 1 else {operator: parts}

    def _conditions(self, key: str, value: object, path: str) -> list[Where]:
        if not isinstance(value, dict):
            return [self._condition(key, "$eq", value, path)]
        if not value:
            return [self._fail(path, "must be a value or a non-empty object of operators")]
        return [self._condition(key, op, operand, f"{path}.{op}") for op, operand in value.items()]

    def _condition(self, key: str, operator: str, operand: object, path: str) -> Where:
        self.conditions += 1
        if operator in _EQUALITIES:
            problem = _scalar_problem(operand)
        elif operator in _COMPARISONS:
            problem = None if _is_number(operand) else "must be a number"
            problem = problem or _scalar_problem(operand)
        elif operator in _MEMBERSHIPS:
            problem = _list_problem(operand)
        else:
            known = ", ".join((*_EQUALITIES, *_COMPARISONS, *_MEMBERSHIPS))
            problem = f"unknown operator; expected one of {known}"
        if problem:
            return self._fail(path, problem)
        return {
            key: {operator: [_stored(x) for x in operand] if isinstance(operand, list) else _stored(operand)}
        }

    def _fail(self, path: str, description: str) -> Where:
        self.violations.append(FieldViolation(path, description))
        return {}


def stored_metadata(metadata: JsonObject) -> dict[str, Scalar]:
    """Metadata as it is stored on chunks in Chroma: every number a float (see `_stored`)."""
    return {key: _stored(value) for key, value in metadata.items()}


def _stored(value: Any) -> Any:
    """Numbers become floats, in metadata and in filters alike.

    Chroma compares an integer field with a fractional operand by truncating the operand
    (`{"year": 2024.5}` matches 2024, and `$lt 2024.5` misses it) and refuses `$in` lists that
    mix ints and floats. API numbers are doubles anyway (google.protobuf.Struct), so storing and
    comparing floats loses nothing and keeps comparisons exact.
    """
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _all_of(parts: list[Where]) -> Where:
    return parts[0] if len(parts) == 1 else {"$and": parts}


def _key_problem(key: str) -> str | None:
    if not key or len(key) > MAX_KEY_LENGTH:
        return f"keys must be 1 to {MAX_KEY_LENGTH} characters"
    if key.startswith(RESERVED_PREFIXES):
        return f"keys must not start with {' or '.join(repr(p) for p in RESERVED_PREFIXES)} (reserved)"
    if has_control_characters(key):
        return "keys must not contain control characters"
    return None


def has_control_characters(text: str) -> bool:
    """True for C0/C1 control characters (Unicode category Cc); spaces, emoji joiners and the
    like are fine."""
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _scalar_problem(value: object) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return None if len(value) <= MAX_STRING_VALUE else f"strings of at most {MAX_STRING_VALUE} characters"
    if isinstance(value, int):
        return None if -_INT64 <= value < _INT64 else "integers must fit in 64 bits"
    if isinstance(value, float):
        return None if math.isfinite(value) else "numbers must be finite"
    return "must be a string, a number or a boolean (no objects, lists or null)"


def _list_problem(value: object) -> str | None:
    if not isinstance(value, list) or not value or len(value) > MAX_LIST_ITEMS:
        return f"must be a list of 1 to {MAX_LIST_ITEMS} values"
    for item in value:
        if problem := _scalar_problem(item):
            return problem
    kinds = {"number" if _is_number(item) else type(item).__name__ for item in value}
    return None if len(kinds) == 1 else "values must all be of one type"
