"""VectorService end to end: search by meaning and words, filters, ownership, upserts, deletes, limits."""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from crewdb.client import Client
from crewdb.clock import Clock
from crewdb.errors import CrewdbError, FailedPreconditionError
from crewdb.models import NewDocument, Principal, SearchMode, UserRole
from crewdb.server import page_token_key
from crewdb.services.knowledge import KnowledgeBase
from crewdb.services.pagination import PageTokens
from crewdb.v1 import user_service_pb2
from crewdb.v1 import vector_service_pb2 as pb
from crewdb.v1.vector_service_pb2_grpc import VectorServiceStub
from crewdb.vectors.chunking import Chunker
from tests.conftest import TEST_SECRET, RunningServer, settings_in, sign_in, start_server
from tests.e2e.test_auth import assert_fails
from tests.rpc_errors import RpcFailure

TIMEOUT = 10.0
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED

SEMANTIC = pb.SEARCH_MODE_SEMANTIC
KEYWORD = pb.SEARCH_MODE_KEYWORD
HYBRID = pb.SEARCH_MODE_HYBRID
MODES = {"semantic": SEMANTIC, "keyword": KEYWORD, "hybrid": HYBRID}
MODEL = "all-MiniLM-L6-v2-int8"

Scalar = str | int | float | bool


# --- the corpus: short documents on clearly distinct topics, each one chunk -------------------


@dataclass(frozen=True)
class Entry:
    id: str
    title: str
    text: str
    metadata: dict[str, Scalar]


def entry(id_: str, text: str, metadata: dict[str, Scalar]) -> Entry:
    return Entry(id_, id_.replace("-", " ").title(), text, metadata)


CORPUS = [
    entry(
        "refunds",
        (
            "Customers may return an unused item within 30 days of purchase for a full refund. The "
            "amount is credited to the original card within five business days."
        ),
        {"topic": "billing", "year": 2021, "public": True, "priority": 2.5},
    ),
    entry(
        "password-reset",
        (
            "To reset a forgotten password, open the sign-in page, choose Forgot password and follow "
            "the link we email you. The link expires after one hour."
        ),
        {"topic": "account", "year": 2023, "public": True, "priority": 1.0},
    ),
    entry(
        "shipping",
        (
            "Standard shipping takes three to five business days. Express delivery arrives the next day"
            " when ordered before noon."
        ),
        {"topic": "billing", "year": 2019, "public": True, "priority": 1.5},
    ),
    entry(
        "vacation",
        (
            "Employees accrue twenty-five days of paid annual leave. Unused leave carries over into the"
            " next year, up to ten days."
        ),
        {"topic": "hr", "year": 2022, "public": False, "priority": 3.0},
    ),
    entry(
        "backups",
        (
            "The production PostgreSQL cluster is snapshotted every night at 02:00 UTC, and snapshots "
            "are retained for thirty days in cold storage."
        ),
        {"topic": "ops", "year": 2020, "public": False, "priority": 4.5},
    ),
    entry(
        "coffee",
        (
            "The espresso machine on the third floor is descaled every Friday; report any faults to "
            "facilities."
        ),
        {"topic": "facilities", "year": 2018, "public": True, "priority": 0.5},
    ),
    entry(
        "parking",
        ("Staff may park in the underground garage; permits are issued by reception."),
        {"topic": "hr", "year": 2017, "public": True, "priority": 0.5},
    ),
    entry(
        "laptop",
        (
            "New hires receive a laptop on their first morning; IT installs the operating system and "
            "mail client beforehand."
        ),
        {"topic": "hr", "year": 2024, "public": False, "priority": 2.0},
    ),
    entry(
        "fire-drill",
        (
            "A fire alarm test happens on the first Monday of each month at 10am; leave the building by"
            " the nearest stairwell."
        ),
        {"topic": "facilities", "year": 2021, "public": True, "priority": 5.0},
    ),
    entry(
        "pets",
        ("Dogs are welcome in the office on Fridays if they are house-trained and kept on a leash."),
        {"topic": "hr", "year": 2020, "public": True, "priority": 1.0},
    ),
    entry(
        "rate-limits",
        ("Each API key may send at most 100 requests per minute; excess requests receive HTTP status 429."),
        {"topic": "ops", "year": 2023, "public": True, "priority": 3.5},
    ),
    entry(
        "wifi",
        ("The guest wireless network is called CrewGuest and its passphrase changes weekly."),
        {"topic": "account", "year": 2022, "public": False, "priority": 0.5},
    ),
]
BY_ID = {e.id: e for e in CORPUS}

# Queries that say what a document says without any of its words (see `shares_a_word`).
PARAPHRASES = {
    "refunds": "can I get reimbursed if I send a product back?",
    "password-reset": "I cannot remember my login credentials, how do I regain access to my account?",
    "shipping": "how long until my parcel gets here",
    "vacation": "how many holidays off work does staff get each twelve months",
    "backups": "how often do we copy our data in case the server crashes",
    "fire-drill": "when is the evacuation practice",
    "pets": "may I bring my puppy to work",
    "rate-limits": "what happens if my integration calls the service too frequently",
}


def shares_a_word(query: str, text: str) -> set[str]:
    """Words of four or more letters that query and text share, or that share their first four."""
    words = [{w[:4] for w in re.findall(r"\w+", s.lower()) if len(w) >= 4} for s in (query, text)]
    return words[0] & words[1]


# --- the shared server: alice holds the corpus and only reads it; other tests make accounts --


@dataclass(frozen=True)
class Account:
    client: Client
    id: str

    @property
    def vectors(self) -> VectorServiceStub:
        return self.client.vectors


@dataclass
class World:
    server: RunningServer
    made: list[Client] = field(default_factory=list)
    alice: Account = field(init=False)

    def account(self, name: str) -> Account:
        """A new signed-in account, its username `name` plus a random suffix."""
        client = sign_in(self.server, f"{name}-{uuid.uuid4().hex[:8]}")
        self.made.append(client)
        me = client.users.GetMe(user_service_pb2.GetMeRequest(), timeout=TIMEOUT)
        return Account(client, me.id)

    def chroma_count(self, account: Account) -> int:
        """How many chunks Chroma itself holds for the account."""
        return int(self.server.call(self.server.app.vectors.count(account.id)))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One server for the module (the embedding model loads once); alice's corpus is read-only."""
    running, stop = start_server(settings_in(tmp_path_factory.mktemp("vectors")))
    shared = World(running)
    try:
        alice = shared.account("alice")
        added = add(alice.vectors, *(doc(e.id, e.text, title=e.title, **e.metadata) for e in CORPUS))
        assert [a.chunk_count for a in added] == [1] * len(CORPUS)
        shared.alice = alice
        yield shared
    finally:
        for client in shared.made:
            client.close()
        stop()


# --- calls -----------------------------------------------------------------------------------


def struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def as_dict(message: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def doc(id_: str, text: str, *, title: str = "", **metadata: Any) -> pb.DocumentInput:
    return pb.DocumentInput(id=id_, text=text, title=title, metadata=struct(metadata))


def add(stub: VectorServiceStub, *documents: pb.DocumentInput) -> list[pb.AddedDocument]:
    reply = stub.AddDocuments(pb.AddDocumentsRequest(documents=documents), timeout=TIMEOUT)
    return list(reply.documents)


def search(
    stub: VectorServiceStub,
    query: str,
    *,
    mode: pb.SearchMode.ValueType = SEMANTIC,
    top_k: int = 0,
    filter_: Mapping[str, Any] | None = None,
    min_score: float = 0.0,
) -> list[pb.ChunkResult]:
    request = pb.SearchRequest(query=query, mode=mode, top_k=top_k, min_score=min_score)
    if filter_ is not None:
        request.filter.CopyFrom(struct(filter_))
    return list(stub.Search(request, timeout=TIMEOUT).results)


def found(results: Sequence[pb.ChunkResult]) -> list[str]:
    return [result.document_id for result in results]


def get(stub: VectorServiceStub, document_id: str) -> pb.Document:
    return stub.GetDocument(pb.GetDocumentRequest(id=document_id), timeout=TIMEOUT)


def listing(stub: VectorServiceStub, page_size: int = 0, token: str = "") -> pb.ListDocumentsResponse:
    request = pb.ListDocumentsRequest(page_size=page_size, page_token=token)
    return stub.ListDocuments(request, timeout=TIMEOUT)


def delete(
    stub: VectorServiceStub, ids: Sequence[str] = (), filter_: Mapping[str, Any] | None = None
) -> pb.DeleteDocumentsResponse:
    request = pb.DeleteDocumentsRequest(ids=ids)
    if filter_ is not None:
        request.filter.CopyFrom(struct(filter_))
    return stub.DeleteDocuments(request, timeout=TIMEOUT)


def stats(stub: VectorServiceStub) -> pb.VectorStats:
    return stub.GetVectorStats(pb.GetVectorStatsRequest(), timeout=TIMEOUT)


def assert_invalid(call: Callable[[], object], *fields: str) -> RpcFailure:
    """The call fails with INVALID_ARGUMENT and a BadRequest naming exactly `fields`."""
    got = assert_fails(call, INVALID, "INVALID_ARGUMENT")
    assert set(got.fields) == set(fields), got.message
    assert all(got.fields.values()), "every field violation has a description"
    return got


def assert_well_scored(results: Sequence[pb.ChunkResult]) -> None:
    scores = [result.score for result in results]
    assert all(0.0 <= score <= 1.0 for score in scores), scores
    assert scores == sorted(scores, reverse=True), scores


# --- retrieval by meaning --------------------------------------------------------------------


@pytest.mark.parametrize(("target", "query"), list(PARAPHRASES.items()))
def test_semantic_search_finds_a_paraphrased_document_first_without_shared_words(
    world: World, target: str, query: str
) -> None:
    assert not shares_a_word(query, BY_ID[target].text), "the query must not borrow the document's words"

    results = search(world.alice.vectors, query)

    assert found(results)[0] == target, [(r.document_id, round(r.score, 3)) for r in results]
    assert_well_scored(results)


def test_semantic_is_the_default_mode(world: World) -> None:
    query = PARAPHRASES["pets"]
    unspecified = search(world.alice.vectors, query, mode=pb.SEARCH_MODE_UNSPECIFIED)
    semantic = search(world.alice.vectors, query, mode=SEMANTIC)

    assert [(r.chunk_id, r.score) for r in unspecified] == [(r.chunk_id, r.score) for r in semantic]


@pytest.mark.parametrize("mode", list(MODES))
def test_scores_are_between_0_and_1_best_first_in_every_mode(world: World, mode: str) -> None:
    for query in ("days", "refund policy for returned items", "who fixes the espresso machine"):
        results = search(world.alice.vectors, query, mode=MODES[mode], top_k=100)
        assert results, query
        assert_well_scored(results)


def test_results_carry_their_document_title_metadata_and_chunk_id(world: World) -> None:
    results = search(world.alice.vectors, PARAPHRASES["backups"], top_k=100)

    assert sorted(found(results)) == sorted(BY_ID), "every one-chunk document, once"
    for result in results:
        source = BY_ID[result.document_id]
        assert result.chunk_id == f"{result.document_id}#{result.chunk_index}"
        assert (result.chunk_index, result.start, result.end) == (0, 0, len(source.text))
        assert result.text == source.text
        assert result.title == source.title
        assert as_dict(result.metadata) == source.metadata


def test_min_score_leaves_out_weaker_results(world: World) -> None:
    query = PARAPHRASES["shipping"]
    everything = search(world.alice.vectors, query, top_k=100)
    threshold = (everything[2].score + everything[3].score) / 2

    strong = search(world.alice.vectors, query, top_k=100, min_score=threshold)

    assert [r.chunk_id for r in strong] == [r.chunk_id for r in everything[:3]]
    assert all(r.score >= threshold for r in strong)
    assert search(world.alice.vectors, query, min_score=1.0) == []


def test_top_k_limits_the_results_and_defaults_to_10(world: World) -> None:
    query = "office rules"
    assert len(search(world.alice.vectors, query, top_k=1)) == 1
    assert len(search(world.alice.vectors, query, top_k=3)) == 3
    assert len(search(world.alice.vectors, query)) == 10
    assert len(search(world.alice.vectors, query, top_k=100)) == len(CORPUS)
    everything = search(world.alice.vectors, query, top_k=100)
    assert [r.chunk_id for r in search(world.alice.vectors, query, top_k=3)] == [
        r.chunk_id for r in everything[:3]
    ]


def test_top_k_above_100_is_clamped_to_100_in_every_mode(world: World) -> None:
    owner = world.account("hoarder")
    notes = [
        doc(f"note-{i}", f"Note {i}: the inventory count for aisle {i} is recorded.") for i in range(120)
    ]
    add(owner.vectors, *notes[:100])
    add(owner.vectors, *notes[100:])

    for mode in MODES.values():
        for top_k in (100, 101, 1000, 2**31 - 1):
            results = search(owner.vectors, "inventory count", mode=mode, top_k=top_k)
            assert len(results) == 100, (mode, top_k)
            assert len(set(found(results))) == 100


def test_chunk_spans_are_code_point_offsets_into_the_document_text(world: World) -> None:
    owner = world.account("spans")
    sentences = [
        f"Chapter {i}: the café owner 🚀 served naïve crème brûlée to guest №{i}. "
        f"彼は{i}杯のコーヒーを飲んだ。 Then the harbour lights came on over the quay.\n"
        for i in range(30)
    ]
    text = "".join(sentences)
    (added,) = add(owner.vectors, doc("story", text, title="Harbour café", kind="story"))
    stored = get(owner.vectors, "story")
    assert added.chunk_count > 3
    assert (stored.chunk_count, stored.char_count, stored.text) == (added.chunk_count, len(text), text)

    for mode in MODES.values():
        results = search(owner.vectors, "harbour café crème brûlée", mode=mode, top_k=100)
        assert results
        for result in results:
            assert result.chunk_id == f"story#{result.chunk_index}"
            assert result.text == text[result.start : result.end]
            assert (result.title, as_dict(result.metadata)) == ("Harbour café", {"kind": "story"})
    every = sorted(search(owner.vectors, "harbour lights", top_k=100), key=lambda r: r.chunk_index)
    assert [r.chunk_index for r in every] == list(range(added.chunk_count))
    assert (every[0].start, every[-1].end) == (0, len(text))
    assert all(b.start <= a.end for a, b in itertools.pairwise(every)), "no gaps"


# --- retrieval by words ----------------------------------------------------------------------


@pytest.mark.parametrize("query", ["refund", "refunds", "REFUND", "Refunded"])
def test_keyword_search_finds_the_word_and_its_stem(world: World, query: str) -> None:
    assert "refunds" not in BY_ID["refunds"].text

    results = search(world.alice.vectors, query, mode=KEYWORD)

    assert found(results) == ["refunds"]
    assert 0.0 < results[0].score < 1.0


def test_keyword_search_ranks_every_document_with_any_word_of_the_query(world: World) -> None:
    results = search(world.alice.vectors, "espresso leash", mode=KEYWORD, top_k=100)

    assert sorted(found(results)) == ["coffee", "pets"]
    assert search(world.alice.vectors, "zebra giraffe", mode=KEYWORD) == []


INJECTIONS = [
    '"a" OR *',
    "NEAR(",
    "NEAR(refund shipping, 2)",
    "'; DROP TABLE documents; --",
    "'; DELETE FROM document_chunks; --",
    "refund*",
    "-refund",
    "^refund",
    "text:refund",
    '"unterminated',
    "()",
    "AND",
    "OR NOT",
    "{text}: refund",
    "refund\x00shipping",
    "*",
    "%_%",
    "\\",
]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("query", INJECTIONS)
def test_query_syntax_and_sql_in_a_query_are_only_words(world: World, query: str, mode: str) -> None:
    results = search(world.alice.vectors, query, mode=MODES[mode], top_k=100)

    assert set(found(results)) <= set(BY_ID)
    assert_well_scored(results)
    # Nothing was dropped or deleted along the way.
    assert found(search(world.alice.vectors, "refund", mode=KEYWORD)) == ["refunds"]
    assert stats(world.alice.vectors).documents == len(CORPUS)


def test_hybrid_scores_1_for_the_chunk_first_in_both_rankings(world: World) -> None:
    query = "full refund for an unused item"
    assert found(search(world.alice.vectors, query, mode=SEMANTIC))[0] == "refunds"
    assert found(search(world.alice.vectors, query, mode=KEYWORD))[0] == "refunds"

    results = search(world.alice.vectors, query, mode=HYBRID)

    assert found(results)[0] == "refunds"
    assert results[0].score == pytest.approx(1.0)
    assert all(r.score < 1.0 for r in results[1:])
    assert_well_scored(results)


def test_hybrid_scores_0_5_for_the_chunk_first_by_meaning_and_absent_by_words(world: World) -> None:
    query = PARAPHRASES["pets"]
    assert found(search(world.alice.vectors, query, mode=SEMANTIC))[0] == "pets"
    assert "pets" not in found(search(world.alice.vectors, query, mode=KEYWORD, top_k=100))

    results = search(world.alice.vectors, query, mode=HYBRID, top_k=100)

    scores = {r.document_id: r.score for r in results}
    assert scores["pets"] == pytest.approx(0.5)
    assert_well_scored(results)


# --- filters ---------------------------------------------------------------------------------

Predicate = Callable[[Mapping[str, Any]], bool]

FILTERS: list[tuple[str, dict[str, Any], Predicate]] = [
    ("equals", {"topic": "hr"}, lambda m: m["topic"] == "hr"),
    ("eq", {"topic": {"$eq": "ops"}}, lambda m: m["topic"] == "ops"),
    ("boolean", {"public": False}, lambda m: m["public"] is False),
    ("gte", {"year": {"$gte": 2021}}, lambda m: m["year"] >= 2021),
    ("lt", {"year": {"$lt": 2020}}, lambda m: m["year"] < 2020),
    ("range", {"year": {"$gte": 2019, "$lt": 2022}}, lambda m: 2019 <= m["year"] < 2022),
    ("gt-fraction", {"priority": {"$gt": 2.5}}, lambda m: m["priority"] > 2.5),
    ("lte-whole-number", {"priority": {"$lte": 1}}, lambda m: m["priority"] <= 1),
    ("in", {"topic": {"$in": ["ops", "billing"]}}, lambda m: m["topic"] in ("ops", "billing")),
    ("gt-fraction-on-whole-numbers", {"year": {"$gt": 2020.5}}, lambda m: m["year"] > 2020.5),
    ("lt-fraction-on-whole-numbers", {"year": {"$lt": 2020.5}}, lambda m: m["year"] < 2020.5),
    ("equals-fraction-on-whole-numbers", {"year": 2021.5}, lambda m: False),
    ("equals-whole-number-on-fractions", {"priority": 3}, lambda m: m["priority"] == 3),
    ("in-mixed-whole-and-fraction", {"priority": {"$in": [1, 2.5]}}, lambda m: m["priority"] in (1, 2.5)),
    ("in-numbers", {"year": {"$in": [2017, 2024]}}, lambda m: m["year"] in (2017, 2024)),
    ("nin", {"topic": {"$nin": ["hr", "facilities"]}}, lambda m: m["topic"] not in ("hr", "facilities")),
    ("ne", {"topic": {"$ne": "hr"}}, lambda m: m["topic"] != "hr"),
    ("several-keys", {"topic": "hr", "public": True}, lambda m: m["topic"] == "hr" and m["public"]),
    (
        "and",
        {"$and": [{"topic": "hr"}, {"year": {"$gte": 2021}}]},
        lambda m: m["topic"] == "hr" and m["year"] >= 2021,
    ),
    ("and-of-one", {"$and": [{"topic": "billing"}]}, lambda m: m["topic"] == "billing"),
    (
        "or",
        {"$or": [{"topic": "ops"}, {"public": False}]},
        lambda m: m["topic"] == "ops" or not m["public"],
    ),
    (
        "or-of-and",
        {"$or": [{"$and": [{"topic": "hr"}, {"public": False}]}, {"year": {"$lt": 2019}}]},
        lambda m: (m["topic"] == "hr" and not m["public"]) or m["year"] < 2019,
    ),
    ("no-match", {"topic": "astronomy"}, lambda m: False),
]


@pytest.mark.parametrize(("filter_", "matches"), [pytest.param(f, p, id=name) for name, f, p in FILTERS])
def test_a_filter_returns_exactly_the_matching_documents(
    world: World, filter_: dict[str, Any], matches: Predicate
) -> None:
    expected = sorted(e.id for e in CORPUS if matches(e.metadata))

    results = search(world.alice.vectors, "workplace information", top_k=100, filter_=filter_)

    assert sorted(found(results)) == expected


@pytest.mark.parametrize("mode", [KEYWORD, HYBRID], ids=["keyword", "hybrid"])
def test_keyword_and_hybrid_search_apply_the_filter(world: World, mode: pb.SearchMode.ValueType) -> None:
    assert sorted(found(search(world.alice.vectors, "days", mode=KEYWORD, top_k=100))) == [
        "backups",
        "refunds",
        "shipping",
        "vacation",
    ]

    results = search(world.alice.vectors, "days", mode=mode, top_k=100, filter_={"topic": "billing"})

    assert sorted(found(results)) == ["refunds", "shipping"]


MALFORMED_FILTERS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown-operator", {"year": {"$foo": 1}}, "filter.year.$foo"),
    ("unknown-logical-operator", {"$xor": [{"topic": "hr"}]}, "filter.$xor"),
    ("comparison-with-a-string", {"year": {"$gte": "2020"}}, "filter.year.$gte"),
    ("comparison-with-a-boolean", {"year": {"$lt": True}}, "filter.year.$lt"),
    ("in-with-no-values", {"topic": {"$in": []}}, "filter.topic.$in"),
    ("in-with-a-string", {"topic": {"$in": "hr"}}, "filter.topic.$in"),
    ("in-with-mixed-types", {"topic": {"$in": ["hr", 1]}}, "filter.topic.$in"),
    ("equals-a-list", {"topic": ["hr"]}, "filter.topic"),
    ("equals-null", {"topic": None}, "filter.topic"),
    ("equals-an-empty-object", {"topic": {}}, "filter.topic"),
    ("ne-an-object", {"topic": {"$ne": {"a": 1}}}, "filter.topic.$ne"),
    ("and-of-nothing", {"$and": []}, "filter.$and"),
    ("and-of-a-non-object", {"$and": ["hr"]}, "filter.$and[0]"),
    ("nested-bad-operator", {"$or": [{"topic": "hr"}, {"year": {"$foo": 1}}]}, "filter.$or[1].year.$foo"),
    ("reserved-document-key", {"_doc": "refunds"}, "filter._doc"),
    ("reserved-revision-key", {"_rev": {"$gte": 0}}, "filter._rev"),
    ("reserved-chroma-key", {"#document": {"$ne": ""}}, "filter.#document"),
]


@pytest.mark.parametrize(
    ("filter_", "field_name"), [pytest.param(f, n, id=name) for name, f, n in MALFORMED_FILTERS]
)
@pytest.mark.parametrize("rpc", ["search", "delete"])
def test_a_malformed_filter_is_invalid_argument_naming_the_field(
    world: World, filter_: dict[str, Any], field_name: str, rpc: str
) -> None:
    stub = world.alice.vectors
    if rpc == "search":
        assert_invalid(lambda: search(stub, "days", filter_=filter_), field_name)
    else:
        assert_invalid(lambda: delete(stub, filter_=filter_), field_name)
    assert stats(stub).documents == len(CORPUS)


# --- ownership -------------------------------------------------------------------------------


def test_another_account_never_sees_or_changes_the_owners_documents(world: World) -> None:
    owner, intruder = world.account("owner"), world.account("intruder")
    add(
        owner.vectors,
        doc("shared-id", "The owner's secret recipe uses saffron and cardamom.", team="red", topic="secret"),
        doc("owner-only", "Quarterly revenue grew by twelve percent.", team="red", topic="secret"),
    )
    add(intruder.vectors, doc("shared-id", "The intruder grows tomatoes on the balcony.", topic="garden"))
    intruders = {"shared-id": "The intruder grows tomatoes on the balcony."}
    owner_chunks = world.chroma_count(owner)

    for mode in MODES.values():
        for query in ("saffron cardamom recipe", "quarterly revenue", "secret"):
            for filter_ in (
                None,
                {"topic": "secret"},
                {"team": "red"},
                {"$or": [{"topic": "secret"}, {"topic": {"$ne": "secret"}}]},
            ):
                results = search(intruder.vectors, query, mode=mode, top_k=100, filter_=filter_)
                assert {r.document_id: r.text for r in results}.items() <= intruders.items()
            assert_invalid(
                partial(search, intruder.vectors, query, mode=mode, filter_={"_doc": "owner-only"}),
                "filter._doc",
            )

    assert_fails(lambda: get(intruder.vectors, "owner-only"), NOT_FOUND, "DOCUMENT_NOT_FOUND")
    assert get(intruder.vectors, "shared-id").text == intruders["shared-id"]
    assert [d.id for d in listing(intruder.vectors).documents] == ["shared-id"]
    assert (stats(intruder.vectors).documents, stats(intruder.vectors).chunks) == (1, 1)

    assert delete(intruder.vectors, ids=["owner-only"]).deleted_count == 0
    assert delete(intruder.vectors, filter_={"topic": "secret"}).deleted_count == 0
    assert delete(intruder.vectors, filter_={"team": "red"}).deleted_ids == []
    assert get(owner.vectors, "owner-only").text == "Quarterly revenue grew by twelve percent."
    assert world.chroma_count(owner) == owner_chunks == 2
    assert stats(owner.vectors).documents == 2

    # Both use "shared-id"; deleting one's leaves the other's.
    assert list(delete(owner.vectors, ids=["shared-id"]).deleted_ids) == ["shared-id"]
    assert get(intruder.vectors, "shared-id").text == intruders["shared-id"]
    assert found(search(intruder.vectors, "tomatoes", mode=KEYWORD)) == ["shared-id"]
    assert world.chroma_count(intruder) == 1


def test_another_account_cannot_read_the_corpus_in_any_mode(world: World) -> None:
    stranger = world.account("stranger")

    for mode in MODES.values():
        for query in [*PARAPHRASES.values(), "refund", "days"]:
            assert search(stranger.vectors, query, mode=mode, top_k=100) == []
        for _, filter_, _ in FILTERS:
            assert search(stranger.vectors, "days", mode=mode, top_k=100, filter_=filter_) == []
    for entry_ in CORPUS:
        assert_fails(partial(get, stranger.vectors, entry_.id), NOT_FOUND, "DOCUMENT_NOT_FOUND")


# --- upserts ---------------------------------------------------------------------------------


def long_text(length: int) -> str:
    sentences: list[str] = []
    i = 0
    while sum(map(len, sentences)) < length:
        sentences.append(f"On night {i} the lighthouse keeper climbed the spiral stairs to polish the lamp. ")
        i += 1
    return "".join(sentences)[:length]


SHORT = "The garden shed is painted green and holds two rakes."


def test_replacing_a_long_document_with_a_short_one_leaves_no_stale_chunks(world: World) -> None:
    owner = world.account("upsert")
    old = long_text(8000)

    (first,) = add(owner.vectors, doc("log", old, title="Keeper's log", era="old"))
    created = get(owner.vectors, "log").created_at
    assert (first.replaced, first.chunk_count) == (False, get(owner.vectors, "log").chunk_count)
    assert first.chunk_count >= 9
    assert world.chroma_count(owner) == first.chunk_count
    assert "lighthouse" in search(owner.vectors, "lighthouse", mode=KEYWORD)[0].text

    (second,) = add(owner.vectors, doc("log", SHORT, title="Shed", era="new"))

    assert (second.id, second.replaced, second.chunk_count) == ("log", True, 1)
    stored = get(owner.vectors, "log")
    assert (stored.text, stored.title, as_dict(stored.metadata)) == (SHORT, "Shed", {"era": "new"})
    assert (stored.chunk_count, stored.char_count) == (1, len(SHORT))
    assert stored.created_at == created
    assert stored.updated_at.ToDatetime() > created.ToDatetime()
    assert world.chroma_count(owner) == 1
    assert (stats(owner.vectors).documents, stats(owner.vectors).chunks) == (1, 1)
    for mode in MODES.values():
        for query in ("lighthouse keeper polishing the lamp", "spiral stairs", "night"):
            results = search(owner.vectors, query, mode=mode, top_k=100)
            assert all(r.text == SHORT and r.title == "Shed" for r in results), (query, mode)
    assert search(owner.vectors, "lighthouse", mode=KEYWORD) == []
    assert search(owner.vectors, "lighthouse", filter_={"era": "old"}) == []


def test_replacing_a_short_document_with_a_long_one_grows_its_chunks(world: World) -> None:
    owner = world.account("grow")
    add(owner.vectors, doc("log", SHORT))

    (replaced,) = add(owner.vectors, doc("log", long_text(5000)))

    assert replaced.replaced
    assert replaced.chunk_count == get(owner.vectors, "log").chunk_count == world.chroma_count(owner) > 1
    assert search(owner.vectors, "shed rakes", mode=KEYWORD) == []


def test_one_call_can_add_new_documents_and_replace_old_ones(world: World) -> None:
    owner = world.account("mixed")
    add(owner.vectors, doc("b", "Bees make honey in the hive."))

    added = add(owner.vectors, doc("a", "Ants carry leaves."), doc("b", "Bats sleep upside down."))

    assert [(a.id, a.replaced) for a in added] == [("a", False), ("b", True)]
    assert get(owner.vectors, "b").text == "Bats sleep upside down."
    assert found(search(owner.vectors, "honey", mode=KEYWORD)) == []
    assert world.chroma_count(owner) == 2


def test_concurrent_replacements_leave_only_the_last_written_chunks(world: World) -> None:
    owner = world.account("racer")
    lengths = [4000, 100, 2500, 300, 3000, 50]
    requests = [pb.AddDocumentsRequest(documents=[doc("log", long_text(n))]) for n in lengths]

    futures = [owner.vectors.AddDocuments.future(r, timeout=60) for r in requests]
    added = [future.result().documents[0] for future in futures]

    assert sorted(a.replaced for a in added) == [False] + [True] * (len(lengths) - 1)
    stored = get(owner.vectors, "log")
    assert len(stored.text) in lengths
    assert stored.chunk_count == world.chroma_count(owner) == stats(owner.vectors).chunks
    results = search(owner.vectors, "lighthouse keeper", top_k=100)
    assert len(results) == stored.chunk_count
    assert all(r.text == stored.text[r.start : r.end] for r in results)


ODD_IDS = ["docs/guide.md#intro", "user@example.com", "a b c", "Ünïcödé-文档", "rocket-🚀", "50%_off's"]


def test_ids_with_punctuation_spaces_and_unicode_round_trip(world: World) -> None:
    owner = world.account("odd-ids")

    add(owner.vectors, *(doc(id_, f"Zebra number {i} grazes.") for i, id_ in enumerate(ODD_IDS)))

    results = search(owner.vectors, "zebra", mode=KEYWORD, top_k=100)
    assert sorted(found(results)) == sorted(ODD_IDS)
    assert all(r.chunk_id == f"{r.document_id}#0" for r in results)
    assert [get(owner.vectors, id_).id for id_ in ODD_IDS] == ODD_IDS
    assert sorted(delete(owner.vectors, ids=ODD_IDS).deleted_ids) == sorted(ODD_IDS)
    assert world.chroma_count(owner) == 0


# The contract refuses only control characters in an id; these are printable text.
NOT_CONTROL = {
    "emoji-with-zero-width-joiner": "notes/\U0001f469\u200d\U0001f4bb.md",
    "no-break-space": "Quarterly\u00a0report",
    "soft-hyphen": "data\u00adbase",
}


@pytest.mark.parametrize("id_", list(NOT_CONTROL.values()), ids=list(NOT_CONTROL))
def test_ids_with_characters_that_are_not_control_characters_are_accepted(world: World, id_: str) -> None:
    owner = world.account("format-ids")

    (added,) = add(owner.vectors, doc(id_, "Kittens purr."))

    assert added.id == id_
    assert get(owner.vectors, id_).text == "Kittens purr."


# --- deletes ---------------------------------------------------------------------------------


def fruit_basket(world: World, name: str) -> Account:
    owner = world.account(name)
    add(
        owner.vectors,
        doc("apple", "Apples grow on trees in orchards.", kind="fruit", colour="red"),
        doc("cherry", "Cherries ripen in early summer.", kind="fruit", colour="red"),
        doc("banana", "Bananas are picked green.", kind="fruit", colour="yellow"),
        doc("carrot", long_text(2500), kind="vegetable", colour="orange"),
    )
    return owner


def test_delete_by_ids_ignores_ids_that_do_not_exist(world: World) -> None:
    owner = fruit_basket(world, "delete-ids")
    carrot_chunks = get(owner.vectors, "carrot").chunk_count
    before = world.chroma_count(owner)

    deleted = delete(owner.vectors, ids=["carrot", "apple", "durian", "apple-2"])

    assert (deleted.deleted_count, list(deleted.deleted_ids)) == (2, ["apple", "carrot"])
    assert world.chroma_count(owner) == before - carrot_chunks - 1
    assert_fails(lambda: get(owner.vectors, "carrot"), NOT_FOUND, "DOCUMENT_NOT_FOUND")
    assert sorted(d.id for d in listing(owner.vectors).documents) == ["banana", "cherry"]
    assert "apple" not in found(search(owner.vectors, "apples orchards", top_k=100))
    assert delete(owner.vectors, ids=["carrot", "apple"]).deleted_count == 0


def test_delete_by_filter_deletes_only_the_matching_documents(world: World) -> None:
    owner = fruit_basket(world, "delete-filter")
    before = world.chroma_count(owner)

    deleted = delete(owner.vectors, filter_={"colour": "red"})

    assert (deleted.deleted_count, list(deleted.deleted_ids)) == (2, ["apple", "cherry"])
    assert world.chroma_count(owner) == before - 2
    assert sorted(d.id for d in listing(owner.vectors).documents) == ["banana", "carrot"]
    assert set(found(search(owner.vectors, "fruit", top_k=100))) == {"banana", "carrot"}

    carrot = get(owner.vectors, "carrot").chunk_count
    deleted = delete(owner.vectors, filter_={"$or": [{"kind": "vegetable"}, {"colour": "purple"}]})
    assert list(deleted.deleted_ids) == ["carrot"]
    assert world.chroma_count(owner) == before - 2 - carrot
    assert delete(owner.vectors, filter_={"kind": "mineral"}).deleted_count == 0
    assert (stats(owner.vectors).documents, stats(owner.vectors).chunks) == (1, 1)

    assert list(delete(owner.vectors, filter_={"kind": "fruit"}).deleted_ids) == ["banana"]
    assert world.chroma_count(owner) == 0
    for mode in MODES.values():
        assert search(owner.vectors, "bananas", mode=mode) == []


def test_delete_needs_exactly_one_of_ids_and_filter(world: World) -> None:
    owner = fruit_basket(world, "delete-neither")
    before = world.chroma_count(owner)

    assert_invalid(lambda: delete(owner.vectors), "ids")
    assert_invalid(lambda: delete(owner.vectors, filter_={}), "ids")
    assert_invalid(lambda: delete(owner.vectors, ids=["apple"], filter_={"kind": "fruit"}), "ids")

    assert stats(owner.vectors).documents == 4
    assert world.chroma_count(owner) == before


# --- listings and stats ----------------------------------------------------------------------


def test_list_documents_pages_newest_first_without_text(world: World) -> None:
    owner = world.account("lister")
    for i in range(5):
        add(owner.vectors, doc(f"d{i}", f"Document number {i} is about topic {i}.", title=f"T{i}", n=i))

    pages: list[list[str]] = []
    token = ""
    while True:
        page = listing(owner.vectors, page_size=2, token=token)
        pages.append([d.id for d in page.documents])
        for listed in page.documents:
            assert listed.text == ""
            assert (listed.chunk_count, listed.embedding_model) == (1, MODEL)
            assert listed.char_count == len(f"Document number {listed.id[1]} is about topic {listed.id[1]}.")
            assert listed.title == f"T{listed.id[1]}"
            assert as_dict(listed.metadata) == {"n": int(listed.id[1])}
        token = page.next_page_token
        if not token:
            break

    assert pages == [["d4", "d3"], ["d2", "d1"], ["d0"]]
    assert [d.id for d in listing(owner.vectors).documents] == ["d4", "d3", "d2", "d1", "d0"]
    everything = listing(owner.vectors, page_size=10_000)
    assert (len(everything.documents), everything.next_page_token) == (5, "")

    add(owner.vectors, doc("d1", "Document one, replaced."))
    assert [d.id for d in listing(owner.vectors).documents] == ["d1", "d4", "d3", "d2", "d0"]


def test_a_page_token_that_was_altered_or_issued_to_another_account_is_refused(world: World) -> None:
    owner, other = world.account("paged"), world.account("other-paged")
    for stub in (owner.vectors, other.vectors):
        for i in range(3):
            add(stub, doc(f"d{i}", f"Note {i}."))
    token = listing(owner.vectors, page_size=1).next_page_token
    assert token

    middle = len(token) // 2
    altered = token[:middle] + ("B" if token[middle] == "A" else "A") + token[middle + 1 :]
    for bad in ("garbage", altered, "☃", token + "x"):
        got = assert_fails(partial(listing, owner.vectors, 1, bad), INVALID, "INVALID_PAGE_TOKEN")
        assert set(got.fields) == {"page_token"}
    assert_fails(lambda: listing(other.vectors, 1, token), INVALID, "INVALID_PAGE_TOKEN")
    assert_invalid(lambda: listing(owner.vectors, page_size=-1), "page_size")


def test_stats_count_the_callers_documents_and_chunks_and_describe_the_store(world: World) -> None:
    owner = world.account("stats")
    empty = stats(owner.vectors)
    assert (empty.documents, empty.chunks) == (0, 0)

    added = add(owner.vectors, doc("short", SHORT), doc("long", long_text(6000)))
    got = stats(owner.vectors)

    assert (got.documents, got.chunks) == (2, sum(a.chunk_count for a in added))
    assert got.chunks == world.chroma_count(owner)
    assert (got.embedding_model, got.dimension, got.collection, got.distance) == (
        MODEL,
        384,
        "agent-knowledge",
        "cosine",
    )
    assert (got.chunk_size, got.chunk_overlap) == (1000, 200)
    assert (stats(world.alice.vectors).documents, stats(world.alice.vectors).chunks) == (
        len(CORPUS),
        len(CORPUS),
    )


# --- validation ------------------------------------------------------------------------------

KEPT = "The kept document must never change when a call is refused."
OK = pb.DocumentInput(id="fine", text="A perfectly good document.")


def add_two(**second: Any) -> Callable[[VectorServiceStub], object]:
    """Adds a valid replacement of `kept` and then a document with `second`'s fields."""

    def call(stub: VectorServiceStub) -> object:
        bad = pb.DocumentInput(**{"id": "other", "text": "Some text.", **second})
        return add(stub, pb.DocumentInput(id="kept", text="A replacement."), bad)

    return call


def add_many(documents: list[pb.DocumentInput]) -> Callable[[VectorServiceStub], object]:
    return lambda stub: add(stub, *documents)


def search_with(query: str = "q", **options: Any) -> Callable[[VectorServiceStub], object]:
    return lambda stub: search(stub, query, **options)


def raw_search(**fields: Any) -> Callable[[VectorServiceStub], object]:
    return lambda stub: stub.Search(pb.SearchRequest(**fields), timeout=TIMEOUT)


def invalid(name: str, call: Callable[[VectorServiceStub], object], *fields: str) -> Any:
    return pytest.param(call, frozenset(fields), id=name)


def bad_metadata(name: str, metadata: dict[str, Any], key: str) -> Any:
    return invalid(name, add_two(metadata=struct(metadata)), f"documents[1].metadata{key}")


ADD_CASES = [
    invalid("empty-id", add_two(id=""), "documents[1].id"),
    invalid("id-of-257-characters", add_two(id="i" * 257), "documents[1].id"),
    invalid("id-with-a-nul", add_two(id="a\x00b"), "documents[1].id"),
    invalid("id-with-a-newline", add_two(id="a\nb"), "documents[1].id"),
    invalid("id-with-an-escape", add_two(id="a\x1bb"), "documents[1].id"),
    invalid("empty-text", add_two(text=""), "documents[1].text"),
    invalid("whitespace-text", add_two(text=" \n\t "), "documents[1].text"),
    invalid("text-over-1000000-characters", add_two(text="x" * 1_000_001), "documents[1].text"),
    invalid("title-of-501-characters", add_two(title="t" * 501), "documents[1].title"),
    bad_metadata("nested-metadata", {"a": {"b": 1}}, ".a"),
    bad_metadata("list-metadata", {"a": [1, 2]}, ".a"),
    bad_metadata("null-metadata", {"a": None}, ".a"),
    bad_metadata("nan-metadata", {"a": math.nan}, ""),
    bad_metadata("reserved-doc-key", {"_doc": "x"}, "._doc"),
    bad_metadata("reserved-hash-key", {"#document": "x"}, ".#document"),
    bad_metadata("reserved-dollar-key", {"$eq": 1}, ".$eq"),
    bad_metadata("key-of-65-characters", {"k" * 65: 1}, "." + "k" * 65),
    bad_metadata("33-metadata-keys", {f"k{i}": i for i in range(33)}, ""),
    invalid("duplicate-ids", add_two(id="kept"), "documents[1].id"),
    invalid("no-documents", add_many([]), "documents"),
    invalid(
        "101-documents",
        add_many([pb.DocumentInput(id=f"n{i}", text="Some text.") for i in range(101)]),
        "documents",
    ),
    invalid(
        "every-field-of-a-document-wrong",
        add_two(id="", text=" ", title="t" * 501, metadata=struct({"a": None})),
        "documents[1].id",
        "documents[1].text",
        "documents[1].title",
        "documents[1].metadata.a",
    ),
]

OTHER_CASES = [
    invalid("empty-query", search_with(""), "query"),
    invalid("whitespace-query", search_with(" \n\t "), "query"),
    invalid("query-of-2001-characters", search_with("q" * 2001), "query"),
    invalid("negative-top-k", search_with(top_k=-1), "top_k"),
    invalid("min-score-above-1", search_with(min_score=1.5), "min_score"),
    invalid("negative-min-score", search_with(min_score=-0.1), "min_score"),
    invalid("nan-min-score", search_with(min_score=math.nan), "min_score"),
    invalid("unknown-mode", raw_search(query="q", mode=99), "mode"),
    invalid(
        "every-search-field-wrong", search_with("", top_k=-5, min_score=2.0), "query", "top_k", "min_score"
    ),
    invalid("get-without-id", lambda s: get(s, ""), "id"),
    invalid("get-with-257-character-id", lambda s: get(s, "i" * 257), "id"),
    invalid("get-with-control-character", lambda s: get(s, "a\tb"), "id"),
    invalid("delete-an-empty-id", lambda s: delete(s, ids=["nothing-here", ""]), "ids[1]"),
    invalid("delete-1001-ids", lambda s: delete(s, ids=[f"i{n}" for n in range(1001)]), "ids"),
    invalid("list-with-negative-page-size", lambda s: listing(s, page_size=-1), "page_size"),
]


@pytest.fixture(scope="module")
def vera(world: World) -> Account:
    """An account holding one document, `kept`, that refused calls must leave as it is."""
    account = world.account("vera")
    add(account.vectors, pb.DocumentInput(id="kept", text=KEPT))
    return account


@pytest.mark.parametrize(("call", "fields"), ADD_CASES + OTHER_CASES)
def test_a_malformed_request_is_invalid_argument_naming_each_field_and_changes_nothing(
    world: World, vera: Account, call: Callable[[VectorServiceStub], object], fields: frozenset[str]
) -> None:
    before = stats(vera.vectors)

    got = assert_invalid(lambda: call(vera.vectors), *fields)

    assert "Traceback" not in got.message
    assert got.request_id
    assert stats(vera.vectors) == before
    assert world.chroma_count(vera) == before.chunks == 1
    assert get(vera.vectors, "kept").text == KEPT
    assert_fails(lambda: get(vera.vectors, "other"), NOT_FOUND, "DOCUMENT_NOT_FOUND")


def test_values_at_the_limits_are_accepted(world: World) -> None:
    owner = world.account("limits")
    metadata = {f"k{i}": i for i in range(31)} | {"k" * 64: "x" * 4096}
    long_id = "i" * 256

    (added,) = add(owner.vectors, doc(long_id, "Lemons are sour.", title="t" * 500, **metadata))

    assert added.id == long_id
    assert as_dict(get(owner.vectors, long_id).metadata) == metadata
    for mode in MODES.values():
        assert set(found(search(owner.vectors, "l" * 2000, mode=mode, min_score=0.0))) <= {long_id}
    assert found(search(owner.vectors, "sour", mode=KEYWORD, top_k=100)) == [long_id]
    assert found(search(owner.vectors, "citrus fruit", top_k=100)) == [long_id]


# --- authentication --------------------------------------------------------------------------

UNSIGNED_CALLS: dict[str, Callable[[VectorServiceStub, tuple[tuple[str, str], ...]], object]] = {
    "AddDocuments": lambda s, md: s.AddDocuments(
        pb.AddDocumentsRequest(documents=[OK]), metadata=md, timeout=TIMEOUT
    ),
    "Search": lambda s, md: s.Search(pb.SearchRequest(query="refund"), metadata=md, timeout=TIMEOUT),
    "GetDocument": lambda s, md: s.GetDocument(
        pb.GetDocumentRequest(id="refunds"), metadata=md, timeout=TIMEOUT
    ),
    "ListDocuments": lambda s, md: s.ListDocuments(pb.ListDocumentsRequest(), metadata=md, timeout=TIMEOUT),
    "DeleteDocuments": lambda s, md: s.DeleteDocuments(
        pb.DeleteDocumentsRequest(ids=["refunds"]), metadata=md, timeout=TIMEOUT
    ),
    "GetVectorStats": lambda s, md: s.GetVectorStats(
        pb.GetVectorStatsRequest(), metadata=md, timeout=TIMEOUT
    ),
}


def test_every_method_of_the_service_is_covered_by_the_unauthenticated_table() -> None:
    methods = pb.DESCRIPTOR.services_by_name["VectorService"].methods_by_name
    assert set(methods) == set(UNSIGNED_CALLS)


@pytest.mark.parametrize("authorization", [None, "Bearer not-a-jwt"])
@pytest.mark.parametrize("method", list(UNSIGNED_CALLS))
def test_calls_without_a_valid_token_are_unauthenticated(
    world: World, method: str, authorization: str | None
) -> None:
    metadata = () if authorization is None else (("authorization", authorization),)
    with grpc.insecure_channel(world.server.address) as channel:
        stub = VectorServiceStub(channel)
        assert_fails(lambda: UNSIGNED_CALLS[method](stub, metadata), UNAUTHENTICATED, "UNAUTHENTICATED")

    assert stats(world.alice.vectors).documents == len(CORPUS)
    assert found(search(world.alice.vectors, "refund", mode=KEYWORD)) == ["refunds"]


# --- embedding model mismatch ----------------------------------------------------------------


class OtherEmbedder:
    """Another embedding model: 8 dimensions, unit vectors derived from a hash of the text."""

    model = "other-model"
    dimension = 8

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors = []
        for text in texts:
            raw = [byte - 127.5 for byte in hashlib.sha256(text.encode()).digest()[: self.dimension]]
            norm = math.sqrt(sum(x * x for x in raw))
            vectors.append([x / norm for x in raw])
        return vectors

    def probe(self) -> dict[str, Any]:
        return {"model": self.model}

    def close(self) -> None:
        pass


def test_another_embedding_model_is_refused_not_mixed_in(world: World) -> None:
    owner = world.account("mismatch")
    add(owner.vectors, doc("rules", "Always lock the back door at night.", topic="security"))
    app = world.server.app
    other = KnowledgeBase(
        app.db,
        app.vectors,
        OtherEmbedder(),
        chunker=Chunker(1000, 200),
        page_tokens=PageTokens(page_token_key(TEST_SECRET)),
        clock=Clock(),
    )
    caller = Principal(user_id=owner.id, role=UserRole.USER, session_id="test-session")
    try:
        attempts: dict[str, Callable[[], Coroutine[Any, Any, object]]] = {
            "add-new": lambda: other.add(caller, [NewDocument("new", "Water the plants.", "", {})]),
            "add-replacing": lambda: other.add(caller, [NewDocument("rules", "Leave it open.", "", {})]),
            "search": lambda: other.search(caller, "door"),
            "search-filtered": lambda: other.search(caller, "door", filter_={"topic": "security"}),
            "search-hybrid": lambda: other.search(caller, "door", mode=SearchMode.HYBRID),
        }
        for name, attempt in attempts.items():
            with pytest.raises(FailedPreconditionError) as raised:
                world.server.call(attempt())
            error: CrewdbError = raised.value
            assert error.reason == "EMBEDDING_MODEL_MISMATCH", name
    finally:
        other.close()

    assert get(owner.vectors, "rules").text == "Always lock the back door at night."
    assert [d.id for d in listing(owner.vectors).documents] == ["rules"]
    assert world.chroma_count(owner) == 1
    assert found(search(owner.vectors, "securing the house")) == ["rules"]
