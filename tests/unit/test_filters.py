"""Metadata checks and filter normalisation: Chroma's where shape, and every rejection by field path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chromadb
import chromadb.config
import pytest
from chromadb.api.models.Collection import Collection

from crewdb.errors import FieldViolation
from crewdb.vectors.filters import (
    MAX_FILTER_CONDITIONS,
    MAX_FILTER_DEPTH,
    MAX_KEY_LENGTH,
    MAX_KEYS,
    MAX_LIST_ITEMS,
    MAX_STRING_VALUE,
    check_metadata,
    stored_metadata,
    to_where,
)

FIELD = "documents[0].metadata"


def _fields(violations: list[FieldViolation]) -> list[str]:
    return [violation.field for violation in violations]


def _rejected(filter_: dict[str, Any]) -> list[str]:
    """The field paths of the violations in `filter_`, which must not produce a where clause."""
    where, violations = to_where(filter_, "filter")
    assert where is None
    assert violations, "expected the filter to be rejected"
    return _fields(violations)


# --- check_metadata ----------------------------------------------------------------------------


def test_flat_scalar_metadata_has_no_violations() -> None:
    metadata = {
        "topic": "billing",
        "year": 2024,
        "score": 0.5,
        "public": True,
        "empty": "",
        "big": 2**63 - 1,
        "small": -(2**63),
        "ünïcødé key": "ok",
        "long": "x" * MAX_STRING_VALUE,
        "k" * MAX_KEY_LENGTH: 1,
    }
    assert check_metadata(metadata, FIELD) == []


def test_empty_metadata_has_no_violations() -> None:
    assert check_metadata({}, FIELD) == []


@pytest.mark.parametrize(
    "value",
    [{"a": 1}, {}, ["a", "b"], [], None, float("nan"), float("inf"), -float("inf"), 2**63, -(2**63) - 1],
    ids=["object", "empty-object", "list", "empty-list", "null", "nan", "inf", "-inf", "2**63", "-2**63-1"],
)
def test_non_scalar_or_out_of_range_metadata_values_name_the_key(value: object) -> None:
    violations = check_metadata({"ok": 1, "tags": value}, FIELD)
    assert _fields(violations) == ["documents[0].metadata.tags"]


def test_metadata_string_longer_than_the_limit_is_rejected() -> None:
    violations = check_metadata({"body": "x" * (MAX_STRING_VALUE + 1)}, FIELD)
    assert _fields(violations) == ["documents[0].metadata.body"]
    assert str(MAX_STRING_VALUE) in violations[0].description


@pytest.mark.parametrize("key", ["_doc", "_idx", "#document", "$and", "$eq"])
def test_reserved_metadata_key_prefixes_are_rejected(key: str) -> None:
    violations = check_metadata({key: "x"}, FIELD)
    assert _fields(violations) == [f"documents[0].metadata.{key}"]
    assert "reserved" in violations[0].description


def test_empty_metadata_key_is_reported_on_the_metadata_itself() -> None:
    violations = check_metadata({"": "x"}, FIELD)
    assert _fields(violations) == ["documents[0].metadata"]
    assert "1 to 64 characters" in violations[0].description


def test_metadata_key_longer_than_the_limit_is_rejected() -> None:
    key = "k" * (MAX_KEY_LENGTH + 1)
    assert _fields(check_metadata({key: 1}, FIELD)) == [f"documents[0].metadata.{key}"]


@pytest.mark.parametrize("key", ["a\nb", "tab\tbed", "nul\x00", "bell\x07", "del\x7f"])
def test_metadata_keys_with_control_characters_are_rejected(key: str) -> None:
    violations = check_metadata({key: 1}, FIELD)
    assert _fields(violations) == [f"documents[0].metadata.{key}"]
    assert "control characters" in violations[0].description


def test_too_many_metadata_keys_is_one_violation_on_the_metadata() -> None:
    assert check_metadata({f"k{i}": i for i in range(MAX_KEYS)}, FIELD) == []
    violations = check_metadata({f"k{i}": i for i in range(MAX_KEYS + 1)}, FIELD)
    assert violations == [FieldViolation(FIELD, f"at most {MAX_KEYS} keys")]


def test_every_bad_metadata_key_is_reported() -> None:
    violations = check_metadata({"_a": 1, "ok": 2, "b": None, "c": [1]}, FIELD)
    assert _fields(violations) == [f"{FIELD}._a", f"{FIELD}.b", f"{FIELD}.c"]


# --- to_where: normalisation --------------------------------------------------------------------


def test_empty_filter_is_no_where_clause() -> None:
    assert to_where({}, "filter") == (None, [])


def test_scalar_value_becomes_eq() -> None:
    assert to_where({"topic": "billing"}, "filter") == ({"topic": {"$eq": "billing"}}, [])


def test_single_operator_is_kept_as_is() -> None:
    assert to_where({"year": {"$gte": 2020}}, "filter") == ({"year": {"$gte": 2020}}, [])


def test_several_keys_become_and() -> None:
    where, violations = to_where({"topic": "billing", "year": 2024, "public": True}, "filter")
    assert violations == []
    assert where == {
        "$and": [
            {"topic": {"$eq": "billing"}},
            {"year": {"$eq": 2024}},
            {"public": {"$eq": True}},
        ]
    }


def test_several_operators_on_one_key_become_and() -> None:
    where, _ = to_where({"year": {"$gte": 2020, "$lt": 2025}}, "filter")
    assert where == {"$and": [{"year": {"$gte": 2020}}, {"year": {"$lt": 2025}}]}


def test_keys_and_operators_flatten_into_one_and() -> None:
    where, _ = to_where({"topic": "a", "year": {"$gt": 1, "$ne": 5}}, "filter")
    assert where == {"$and": [{"topic": {"$eq": "a"}}, {"year": {"$gt": 1}}, {"year": {"$ne": 5}}]}


@pytest.mark.parametrize("operator", ["$and", "$or"])
def test_single_element_logical_is_unwrapped(operator: str) -> None:
    assert to_where({operator: [{"topic": "a"}]}, "filter") == ({"topic": {"$eq": "a"}}, [])


def test_single_element_logical_of_several_keys_becomes_their_and() -> None:
    where, _ = to_where({"$or": [{"a": 1, "b": 2}]}, "filter")
    assert where == {"$and": [{"a": {"$eq": 1}}, {"b": {"$eq": 2}}]}


def test_logical_lists_keep_their_items_normalised() -> None:
    where, _ = to_where({"$or": [{"a": 1}, {"b": {"$in": ["x", "y"]}, "c": {"$lte": 2.5}}]}, "filter")
    assert where == {
        "$or": [
            {"a": {"$eq": 1}},
            {"$and": [{"b": {"$in": ["x", "y"]}}, {"c": {"$lte": 2.5}}]},
        ]
    }


def test_logical_beside_keys_is_anded_with_them() -> None:
    where, _ = to_where({"$or": [{"a": 1}, {"b": 2}], "c": "z"}, "filter")
    assert where == {
        "$and": [
            {"$or": [{"a": {"$eq": 1}}, {"b": {"$eq": 2}}]},
            {"c": {"$eq": "z"}},
        ]
    }


@pytest.mark.parametrize(
    ("operator", "operand"),
    [
        ("$eq", "x"),
        ("$ne", False),
        ("$gt", 1),
        ("$gte", 1.5),
        ("$lt", -3),
        ("$lte", 0),
        ("$in", [1, 2]),
        ("$in", [1.5, 2.5]),
        ("$nin", ["a", "b"]),
        ("$in", [True, False]),
    ],
)
def test_every_known_operator_is_accepted(operator: str, operand: object) -> None:
    assert to_where({"k": {operator: operand}}, "filter") == ({"k": {operator: operand}}, [])


def test_integers_at_the_64_bit_edges_are_accepted() -> None:
    where, violations = to_where({"a": 2**63 - 1, "b": {"$gt": -(2**63)}}, "filter")
    assert violations == []
    assert where is not None


# --- to_where: rejections ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filter_", "path"),
    [
        ({"year": {"$foo": 1}}, "filter.year.$foo"),
        ({"year": {"$regex": "a.*"}}, "filter.year.$regex"),
        ({"year": {"$contains": "a"}}, "filter.year.$contains"),
        ({"year": {"gt": 1}}, "filter.year.gt"),
        ({"$foo": [{"a": 1}]}, "filter.$foo"),
        ({"$not": {"a": 1}}, "filter.$not"),
        ({"$eq": 1}, "filter.$eq"),
        ({"$or": [{"a": 1}, {"$nor": []}]}, "filter.$or[1].$nor"),
    ],
)
def test_unknown_operators_are_rejected_at_their_path(filter_: dict[str, Any], path: str) -> None:
    assert _rejected(filter_) == [path]


def test_unknown_operator_description_lists_the_known_ones() -> None:
    _, violations = to_where({"year": {"$foo": 1}}, "filter")
    assert "unknown operator" in violations[0].description
    assert "$gte" in violations[0].description


@pytest.mark.parametrize("operator", ["$gt", "$gte", "$lt", "$lte"])
@pytest.mark.parametrize("operand", ["2020", True, False, None, [1], {"a": 1}])
def test_comparisons_need_a_number(operator: str, operand: object) -> None:
    _, violations = to_where({"year": {operator: operand}}, "filter")
    assert violations == [FieldViolation(f"filter.year.{operator}", "must be a number")]


@pytest.mark.parametrize("operator", ["$gt", "$eq", "$ne"])
@pytest.mark.parametrize("operand", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_numbers_are_rejected(operator: str, operand: float) -> None:
    _, violations = to_where({"score": {operator: operand}}, "filter")
    assert violations == [FieldViolation(f"filter.score.{operator}", "numbers must be finite")]


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**30])
def test_integers_beyond_64_bits_are_rejected(value: int) -> None:
    assert _rejected({"n": value}) == ["filter.n"]
    assert _rejected({"n": {"$lt": value}}) == ["filter.n.$lt"]
    assert _rejected({"n": {"$in": [1, value]}}) == ["filter.n.$in"]


@pytest.mark.parametrize(
    "operand",
    [
        [],
        [1, "a"],
        [True, 1],
        ["a", None],
        [[1]],
        [{"a": 1}],
        [float("nan")],
        list(range(MAX_LIST_ITEMS + 1)),
        "abc",
        1,
        None,
    ],
    ids=[
        "empty",
        "int-str",
        "bool-int",
        "null",
        "nested-list",
        "object",
        "nan",
        "too-long",
        "str",
        "int",
        "none",
    ],
)
@pytest.mark.parametrize("operator", ["$in", "$nin"])
def test_bad_membership_lists_are_rejected(operator: str, operand: object) -> None:
    assert _rejected({"tags": {operator: operand}}) == [f"filter.tags.{operator}"]


def test_membership_list_at_the_limit_is_accepted() -> None:
    where, violations = to_where({"n": {"$in": list(range(MAX_LIST_ITEMS))}}, "filter")
    assert violations == []
    assert where == {"n": {"$in": list(range(MAX_LIST_ITEMS))}}


@pytest.mark.parametrize("value", [None, [1, 2], [], {}], ids=["null", "list", "empty-list", "empty-object"])
def test_values_that_are_not_scalars_or_operator_objects_are_rejected(value: object) -> None:
    assert _rejected({"a": 1, "tags": value}) == ["filter.tags"]


def test_nested_objects_as_eq_operands_are_rejected() -> None:
    assert _rejected({"tags": {"$eq": {"a": 1}}}) == ["filter.tags.$eq"]
    assert _rejected({"tags": {"$ne": [1]}}) == ["filter.tags.$ne"]
    assert _rejected({"tags": {"$eq": None}}) == ["filter.tags.$eq"]


def test_too_long_string_operand_is_rejected() -> None:
    assert _rejected({"body": "x" * (MAX_STRING_VALUE + 1)}) == ["filter.body"]


@pytest.mark.parametrize(
    ("filter_", "path"),
    [
        ({"$or": [{"a": 1}, 5]}, "filter.$or[1]"),
        ({"$or": [{"a": 1}, {}]}, "filter.$or[1]"),
        ({"$and": [{"a": 1}, {"b": 2}, "x"]}, "filter.$and[2]"),
        ({"$or": []}, "filter.$or"),
        ({"$and": {"a": 1}}, "filter.$and"),
        ({"$or": "a"}, "filter.$or"),
        ({"$and": [{"$or": [{"a": 1}, None]}]}, "filter.$and[0].$or[1]"),
    ],
)
def test_bad_logical_items_are_rejected_at_their_path(filter_: dict[str, Any], path: str) -> None:
    assert _rejected(filter_) == [path]


@pytest.mark.parametrize(
    ("key", "description"),
    [
        ("_doc", "reserved"),
        ("#document", "reserved"),
        ("k" * (MAX_KEY_LENGTH + 1), "1 to 64 characters"),
        ("a\nb", "control characters"),
    ],
)
def test_bad_filter_keys_are_rejected(key: str, description: str) -> None:
    _, violations = to_where({"ok": 1, key: 1}, "filter")
    assert _fields(violations) == [f"filter.{key}"]
    assert description in violations[0].description


def test_empty_filter_key_is_reported_on_the_enclosing_filter() -> None:
    assert _rejected({"": 1}) == ["filter"]
    assert _rejected({"$or": [{"a": 1}, {"": 1}]}) == ["filter.$or[1]"]


def _nested(levels: int) -> tuple[dict[str, Any], str]:
    """A filter whose innermost object sits `levels` $and lists down, and that object's path."""
    node: dict[str, Any] = {"a": 1}
    for _ in range(levels):
        node = {"$and": [node]}
    return node, "filter" + ".$and[0]" * levels


def test_filters_nested_to_the_depth_limit_are_accepted() -> None:
    filter_, _ = _nested(MAX_FILTER_DEPTH - 1)
    assert to_where(filter_, "filter") == ({"a": {"$eq": 1}}, [])


def test_filters_nested_past_the_depth_limit_are_rejected() -> None:
    filter_, path = _nested(MAX_FILTER_DEPTH)
    _, violations = to_where(filter_, "filter")
    assert violations == [FieldViolation(path, f"nested at most {MAX_FILTER_DEPTH} deep")]


def test_conditions_up_to_the_limit_are_accepted() -> None:
    where, violations = to_where({"$or": [{"k": i} for i in range(MAX_FILTER_CONDITIONS)]}, "filter")
    assert violations == []
    assert where is not None
    assert len(where["$or"]) == MAX_FILTER_CONDITIONS


@pytest.mark.parametrize(
    "filter_",
    [
        {"$or": [{"k": i} for i in range(MAX_FILTER_CONDITIONS + 1)]},
        {f"k{i}": i for i in range(MAX_FILTER_CONDITIONS + 1)},
        {"k": {"$gt": 0, "$lt": 9}, "$or": [{"k": i} for i in range(MAX_FILTER_CONDITIONS - 1)]},
    ],
    ids=["or", "keys", "mixed"],
)
def test_too_many_conditions_are_rejected_on_the_whole_filter(filter_: dict[str, Any]) -> None:
    _, violations = to_where(filter_, "filter")
    assert violations == [FieldViolation("filter", f"at most {MAX_FILTER_CONDITIONS} conditions")]


def test_every_violation_in_a_filter_is_reported() -> None:
    filter_ = {
        "year": {"$gt": "x", "$foo": 1},
        "_doc": "d",
        "$or": [{"a": None}, {"b": {"$in": []}}],
    }
    assert sorted(_rejected(filter_)) == sorted(
        ["filter.year.$gt", "filter.year.$foo", "filter._doc", "filter.$or[0].a", "filter.$or[1].b.$in"]
    )


def test_violations_use_the_given_field_name() -> None:
    _, violations = to_where({"year": {"$foo": 1}}, "requests[3].filter")
    assert _fields(violations) == ["requests[3].filter.year.$foo"]


# --- the normalised shape against a real Chroma collection --------------------------------------


_ITEMS: dict[str, dict[str, str | int | float | bool]] = {
    "a": {"topic": "billing", "year": 2019, "score": 0.2, "public": True},
    "b": {"topic": "billing", "year": 2022, "score": 0.9, "public": False},
    "c": {"topic": "support", "year": 2023, "score": 0.5, "public": True},
    "d": {"topic": "sales", "year": 2024, "score": 0.7, "public": False},
}


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Collection:
    """A Chroma collection on a temp directory holding _ITEMS, with made-up embeddings."""
    client = chromadb.PersistentClient(
        path=str(tmp_path_factory.mktemp("chroma")),
        settings=chromadb.config.Settings(anonymized_telemetry=False),
    )
    collection = client.create_collection("filters", embedding_function=None)
    ids = list(_ITEMS)
    embeddings: list[Sequence[float]] = [[float(i), 1.0, 0.0] for i in range(len(ids))]
    collection.add(
        ids=ids,
        embeddings=embeddings,
        metadatas=[stored_metadata(_ITEMS[i]) for i in ids],  # as crewdb stores chunks
        documents=[f"document {i}" for i in ids],
    )
    return collection


@pytest.mark.parametrize(
    ("filter_", "expected"),
    [
        ({"topic": "billing"}, {"a", "b"}),
        ({"topic": "billing", "public": True}, {"a"}),
        ({"year": {"$gte": 2020, "$lt": 2024}}, {"b", "c"}),
        ({"$or": [{"topic": "sales"}, {"year": 2019}]}, {"a", "d"}),
        ({"$and": [{"topic": "support"}]}, {"c"}),
        (
            {"$or": [{"topic": "billing", "score": {"$gt": 0.5}}, {"public": True, "year": {"$gt": 2022}}]},
            {"b", "c"},
        ),
        ({"topic": {"$in": ["sales", "support"]}, "score": {"$ne": 0.5}}, {"d"}),
        ({"topic": {"$nin": ["billing"]}}, {"c", "d"}),
        ({"$and": [{"$or": [{"year": 2019}, {"year": 2024}]}, {"public": False}]}, {"d"}),
        ({"topic": "nothing"}, set()),
    ],
)
def test_where_clauses_are_accepted_by_chroma(
    collection: Collection, filter_: dict[str, Any], expected: set[str]
) -> None:
    where, violations = to_where(filter_, "filter")
    assert violations == []
    assert where is not None
    assert set(collection.get(where=where)["ids"]) == expected


def test_membership_list_mixing_ints_and_floats_reaches_chroma_in_a_shape_it_accepts(
    collection: Collection,
) -> None:
    # Struct numbers arrive as ints when whole and floats otherwise, so [2019, 2024.5] is a
    # natural user filter; Chroma refuses lists whose items differ in type. Either a violation
    # or a where clause Chroma accepts will do, not one that fails inside Chroma.
    where, violations = to_where({"year": {"$in": [2019, 2024.5]}}, "filter")
    if where is None:
        assert _fields(violations) == ["filter.year.$in"]
    else:
        assert set(collection.get(where=where)["ids"]) == {"a"}
