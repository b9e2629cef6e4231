"""ConversationService behaviour end to end: a real server over real SQLite, through the stubs."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from concurrent.futures import TimeoutError as FutureTimeoutError
from contextlib import closing
from datetime import UTC, date, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from crewdb.client import Client
from crewdb.config import Settings
from crewdb.v1 import conversation_service_pb2 as pb
from crewdb.v1.conversation_service_pb2_grpc import ConversationServiceStub
from tests.conftest import PASSWORD, RunningServer, start_server
from tests.rpc_errors import failure

TIMEOUT = 5.0
USER = pb.MESSAGE_ROLE_USER
ASSISTANT = pb.MESSAGE_ROLE_ASSISTANT


def create(stub: ConversationServiceStub, title: str = "") -> pb.Conversation:
    return stub.CreateConversation(pb.CreateConversationRequest(title=title), timeout=TIMEOUT)


def get(stub: ConversationServiceStub, conversation_id: str) -> pb.Conversation:
    return stub.GetConversation(pb.GetConversationRequest(id=conversation_id), timeout=TIMEOUT)


def add(
    stub: ConversationServiceStub,
    conversation_id: str,
    content: str = "hello",
    *,
    role: pb.MessageRole.ValueType = USER,
    metadata: dict[str, Any] | None = None,
) -> pb.Message:
    request = pb.AddMessageRequest(conversation_id=conversation_id, role=role, content=content)
    if metadata is not None:
        request.metadata.update(metadata)
    return stub.AddMessage(request, timeout=TIMEOUT)


def list_ids(stub: ConversationServiceStub, page_size: int = 0, token: str = "") -> list[str]:
    page = stub.ListConversations(
        pb.ListConversationsRequest(page_size=page_size, page_token=token), timeout=TIMEOUT
    )
    return [c.id for c in page.conversations]


def conversation_pages(stub: ConversationServiceStub, page_size: int) -> list[list[str]]:
    """The ids on each page of a whole ListConversations listing."""
    pages, token = [], ""
    while True:
        page = stub.ListConversations(
            pb.ListConversationsRequest(page_size=page_size, page_token=token), timeout=TIMEOUT
        )
        pages.append([c.id for c in page.conversations])
        token = page.next_page_token
        if not token:
            return pages


def message_pages(
    stub: ConversationServiceStub, conversation_id: str, page_size: int
) -> list[list[pb.Message]]:
    """Each page of a whole ListMessages listing."""
    pages, token = [], ""
    while True:
        page = stub.ListMessages(
            pb.ListMessagesRequest(conversation_id=conversation_id, page_size=page_size, page_token=token),
            timeout=TIMEOUT,
        )
        pages.append(list(page.messages))
        token = page.next_page_token
        if not token:
            return pages


def all_messages(stub: ConversationServiceStub, conversation_id: str) -> list[pb.Message]:
    request = pb.ListMessagesRequest(conversation_id=conversation_id, page_size=1000)
    return list(stub.ListMessages(request, timeout=TIMEOUT).messages)


def search(stub: ConversationServiceStub, query: str, page_size: int = 0) -> list[pb.SearchResult]:
    request = pb.SearchConversationsRequest(query=query, page_size=page_size)
    return list(stub.SearchConversations(request, timeout=TIMEOUT).results)


def export(
    stub: ConversationServiceStub, conversation_id: str, export_format: pb.ExportFormat.ValueType
) -> pb.ExportConversationResponse:
    request = pb.ExportConversationRequest(id=conversation_id, format=export_format)
    return stub.ExportConversation(request, timeout=TIMEOUT)


def micros(stamp: timestamp_pb2.Timestamp) -> int:
    return int(stamp.ToMicroseconds())


# Create, get, update.


def test_created_conversation_is_empty_and_returned_by_get(
    conversations: ConversationServiceStub,
) -> None:
    created = create(conversations, "Trip to Lisbon")

    assert created.id
    assert created.title == "Trip to Lisbon"
    assert created.message_count == 0
    assert created.created_at == created.updated_at
    assert get(conversations, created.id) == created


def test_conversation_may_have_an_empty_title(conversations: ConversationServiceStub) -> None:
    created = create(conversations)

    assert get(conversations, created.id).title == ""


def test_update_title_changes_title_and_bumps_updated_at(
    conversations: ConversationServiceStub,
) -> None:
    created = create(conversations, "draft")

    updated = conversations.UpdateConversationTitle(
        pb.UpdateConversationTitleRequest(id=created.id, title="final"), timeout=TIMEOUT
    )

    assert updated.title == "final"
    assert updated.created_at == created.created_at
    assert micros(updated.updated_at) > micros(created.updated_at)
    assert get(conversations, created.id) == updated


def test_add_message_bumps_updated_at_and_message_count(
    conversations: ConversationServiceStub,
) -> None:
    created = create(conversations)

    first = add(conversations, created.id, "one")
    add(conversations, created.id, "two")
    after = get(conversations, created.id)

    assert after.message_count == 2
    assert micros(after.updated_at) > micros(first.timestamp) > micros(created.updated_at)
    assert after.created_at == created.created_at


# Listing conversations.


def test_conversations_are_listed_most_recently_updated_first(
    conversations: ConversationServiceStub,
) -> None:
    first, second, third = (create(conversations, title).id for title in ("1", "2", "3"))
    assert list_ids(conversations) == [third, second, first]

    add(conversations, first)
    assert list_ids(conversations) == [first, third, second]

    conversations.UpdateConversationTitle(
        pb.UpdateConversationTitleRequest(id=second, title="renamed"), timeout=TIMEOUT
    )
    assert list_ids(conversations) == [second, first, third]


def test_list_conversations_pages_return_each_conversation_once_in_order(
    conversations: ConversationServiceStub,
) -> None:
    created = [create(conversations, f"c{n}").id for n in range(25)]

    pages = conversation_pages(conversations, 10)

    assert [len(page) for page in pages] == [10, 10, 5]
    assert [cid for page in pages for cid in page] == created[::-1]


def test_conversation_updated_during_a_listing_is_not_seen_again(
    conversations: ConversationServiceStub,
) -> None:
    created = [create(conversations, f"c{n}").id for n in range(6)]
    first = conversations.ListConversations(pb.ListConversationsRequest(page_size=3), timeout=TIMEOUT)

    add(conversations, created[1])  # on the second page; moves to the front
    rest = list_ids(conversations, page_size=10, token=first.next_page_token)

    assert [c.id for c in first.conversations] == created[:2:-1]
    assert rest == [created[2], created[0]]


def test_list_conversations_defaults_to_50_and_clamps_page_size_to_200(
    conversations: ConversationServiceStub,
) -> None:
    futures = [
        conversations.CreateConversation.future(pb.CreateConversationRequest(title=f"c{n}"), timeout=TIMEOUT)
        for n in range(205)
    ]
    for future in futures:
        future.result()

    default = conversation_pages(conversations, 0)
    clamped = conversation_pages(conversations, 5000)

    assert [len(page) for page in default] == [50, 50, 50, 50, 5]
    assert [len(page) for page in clamped] == [200, 5]
    assert len({cid for page in clamped for cid in page}) == 205


# Messages.


def test_messages_are_listed_oldest_first_across_pages(
    conversations: ConversationServiceStub,
) -> None:
    conversation = create(conversations).id
    roles = [USER, ASSISTANT, pb.MESSAGE_ROLE_SYSTEM, pb.MESSAGE_ROLE_TOOL, USER, ASSISTANT, USER]
    added = [add(conversations, conversation, f"m{n}", role=role) for n, role in enumerate(roles)]

    pages = message_pages(conversations, conversation, 3)

    listed = [m for page in pages for m in page]
    assert [len(page) for page in pages] == [3, 3, 1]
    assert listed == added
    assert [m.content for m in listed] == [f"m{n}" for n in range(7)]
    assert [m.role for m in listed] == roles
    assert all(m.conversation_id == conversation for m in listed)
    stamps = [micros(m.timestamp) for m in listed]
    assert stamps == sorted(set(stamps)), "timestamps strictly increase"


def test_list_messages_clamps_page_size_to_1000(conversations: ConversationServiceStub) -> None:
    conversation = create(conversations).id
    futures = [
        conversations.AddMessage.future(
            pb.AddMessageRequest(conversation_id=conversation, role=USER, content=f"m{n}"),
            timeout=TIMEOUT,
        )
        for n in range(1005)
    ]
    for future in futures:
        future.result()

    default = message_pages(conversations, conversation, 0)
    clamped = message_pages(conversations, conversation, 5000)

    assert [len(page) for page in default] == [100] * 10 + [5]
    assert [len(page) for page in clamped] == [1000, 5]
    assert get(conversations, conversation).message_count == 1005


def test_list_messages_page_of_long_messages_ends_early_yet_pages_return_every_message(
    conversations: ConversationServiceStub,
) -> None:
    conversation = create(conversations).id
    # 40 messages of 100,000 characters: more than the ~3 MiB one page carries.
    contents = [f"{n:02d}" + "x" * 99_998 for n in range(40)]
    for content in contents:
        add(conversations, conversation, content)

    pages = [[m.content for m in page] for page in message_pages(conversations, conversation, 1000)]

    assert len(pages) > 1
    assert all(pages), "no page is empty"
    assert all(sum(map(len, page)) <= 3 * 1024 * 1024 for page in pages)
    assert [content for page in pages for content in page] == contents


def test_metadata_round_trips_with_whole_numbers_kept_whole(
    conversations: ConversationServiceStub, server: RunningServer
) -> None:
    metadata = {
        "model": "gpt-x",
        "tokens": {"prompt": 12, "completion": 30},
        "tools": [{"name": "search", "ok": True}, "plain", 1.5, None],
        "stream": False,
        "error": None,
        "negative": -7,
    }
    conversation = create(conversations).id

    added = add(conversations, conversation, metadata=metadata)
    plain = add(conversations, conversation)
    listed = all_messages(conversations, conversation)
    exported = json.loads(export(conversations, conversation, pb.EXPORT_FORMAT_JSON).content)
    with closing(sqlite3.connect(server.settings.database_path)) as db:
        (stored,) = db.execute("SELECT metadata FROM messages WHERE id = ?", (added.id,)).fetchone()

    assert json_format.MessageToDict(added.metadata) == metadata
    assert json_format.MessageToDict(listed[0].metadata) == metadata
    assert not plain.HasField("metadata")
    assert not listed[1].HasField("metadata")
    # Struct carries every number as a double; what crewdb stores and exports keeps ints as ints.
    for document in (exported["messages"][0]["metadata"], json.loads(stored)):
        assert document == metadata
        assert type(document["tokens"]["prompt"]) is int
        assert type(document["negative"]) is int
        assert type(document["tools"][2]) is float
    assert exported["messages"][1]["metadata"] is None


def test_empty_metadata_object_is_returned_as_set(
    conversations: ConversationServiceStub,
) -> None:
    conversation = create(conversations).id
    request = pb.AddMessageRequest(conversation_id=conversation, role=USER, content="x")
    request.metadata.CopyFrom(struct_pb2.Struct())

    added = conversations.AddMessage(request, timeout=TIMEOUT)
    exported = json.loads(export(conversations, conversation, pb.EXPORT_FORMAT_JSON).content)

    assert exported["messages"][0]["metadata"] == {}
    assert added.HasField("metadata")
    assert all_messages(conversations, conversation)[0].HasField("metadata")


# Limits: values exactly at each limit are accepted.


def test_content_of_100000_characters_is_accepted(conversations: ConversationServiceStub) -> None:
    conversation = create(conversations).id
    content = "x" * 99_999 + "y"

    added = add(conversations, conversation, content)

    assert added.content == content
    assert all_messages(conversations, conversation)[0].content == content


def test_title_of_200_characters_is_accepted(conversations: ConversationServiceStub) -> None:
    created = create(conversations, "a" * 200)
    updated = conversations.UpdateConversationTitle(
        pb.UpdateConversationTitleRequest(id=created.id, title="b" * 200), timeout=TIMEOUT
    )

    assert created.title == "a" * 200
    assert updated.title == "b" * 200


def test_metadata_of_exactly_16_kib_nested_32_levels_is_accepted(
    conversations: ConversationServiceStub,
) -> None:
    conversation = create(conversations).id
    deep: dict[str, Any] = {"leaf": True}
    for _ in range(31):
        deep = {"child": deep}
    # {"blob":"…"} is 11 bytes plus the string.
    big = {"blob": "x" * (16 * 1024 - 11)}

    add(conversations, conversation, metadata=deep)
    add(conversations, conversation, metadata=big)

    assert [json_format.MessageToDict(m.metadata) for m in all_messages(conversations, conversation)] == [
        deep,
        big,
    ]


def test_id_of_128_characters_is_looked_up(conversations: ConversationServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        get(conversations, "i" * 128)

    assert failure(raised.value).reason == "CONVERSATION_NOT_FOUND"


def test_query_of_200_characters_is_accepted(conversations: ConversationServiceStub) -> None:
    query = "q" * 200
    conversation = create(conversations).id
    add(conversations, conversation, f"before {query} after")

    assert [r.conversation.id for r in search(conversations, query)] == [conversation]


# Delete.


def test_delete_removes_the_conversation_and_all_its_messages(
    conversations: ConversationServiceStub, server: RunningServer
) -> None:
    doomed, kept = create(conversations).id, create(conversations).id
    for n in range(3):
        add(conversations, doomed, f"doomed {n}")
        add(conversations, kept, f"kept {n}")

    conversations.DeleteConversation(pb.DeleteConversationRequest(id=doomed), timeout=TIMEOUT)

    for call in (
        lambda: get(conversations, doomed),
        lambda: all_messages(conversations, doomed),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            call()
        assert failure(raised.value).reason == "CONVERSATION_NOT_FOUND"
    assert list_ids(conversations) == [kept]
    assert len(all_messages(conversations, kept)) == 3
    with closing(sqlite3.connect(server.settings.database_path)) as db:
        rows = dict(db.execute("SELECT conversation_id, count(*) FROM messages GROUP BY conversation_id"))
    assert rows == {kept: 3}


# Search.


def test_search_ranks_a_title_match_above_a_content_only_match(
    conversations: ConversationServiceStub,
) -> None:
    titled = create(conversations, "Rocket plans").id
    content_only = create(conversations, "misc").id
    message = add(conversations, content_only, "we talked about the rocket engine")

    results = search(conversations, "rocket")

    assert [r.conversation.id for r in results] == [titled, content_only]
    by_title, by_content = results
    assert (by_title.score, by_content.score) == (1e9, 1)
    assert "Rocket" in by_title.snippet
    assert by_title.message_id == ""
    assert by_title.matching_messages == 0
    assert "rocket" in by_content.snippet
    assert by_content.message_id == message.id
    assert by_content.matching_messages == 1


def test_search_ranks_a_title_match_above_many_content_matches(
    conversations: ConversationServiceStub,
) -> None:
    titled = create(conversations, "Rocket plans").id
    chatty = create(conversations, "misc").id
    for n in range(11):
        add(conversations, chatty, f"rocket {n}")

    assert [r.conversation.id for r in search(conversations, "rocket")] == [titled, chatty]


def test_search_ranks_more_matching_messages_higher(
    conversations: ConversationServiceStub,
) -> None:
    many, few = create(conversations).id, create(conversations).id
    for n in range(3):
        add(conversations, many, f"banana {n}")
        add(conversations, many, "unrelated")
    add(conversations, few, "banana bread")  # `few` is now the most recently updated

    results = search(conversations, "banana")

    assert [(r.conversation.id, r.matching_messages) for r in results] == [(many, 3), (few, 1)]
    assert results[0].score > results[1].score


def test_search_breaks_ties_by_most_recently_updated(
    conversations: ConversationServiceStub,
) -> None:
    older, newer = create(conversations).id, create(conversations).id
    add(conversations, newer, "kiwi")
    add(conversations, older, "kiwi")

    assert [r.conversation.id for r in search(conversations, "kiwi")] == [older, newer]


@pytest.mark.parametrize(
    ("query", "matching", "not_matching"),
    [
        ("50%", "now 50% off", "price 500 dollars"),
        ("a_b", "call a_b()", "call axb()"),
        ("a\\b", "path a\\b", "path ab"),
        ("%", "100%", "no percent sign"),
    ],
)
def test_search_matches_wildcard_characters_literally(
    conversations: ConversationServiceStub, query: str, matching: str, not_matching: str
) -> None:
    hit = create(conversations).id
    add(conversations, hit, matching)
    add(conversations, create(conversations).id, not_matching)
    titled_miss = create(conversations, not_matching).id

    results = search(conversations, query)

    assert [r.conversation.id for r in results] == [hit]
    assert titled_miss not in {r.conversation.id for r in results}


def test_search_ignores_ascii_case(conversations: ConversationServiceStub) -> None:
    by_content = create(conversations).id
    add(conversations, by_content, "Hello World")
    by_title = create(conversations, "HELLO world, again").id

    results = search(conversations, "hello WORLD")

    assert {r.conversation.id for r in results} == {by_content, by_title}


def test_search_snippet_shows_the_match_in_a_long_message(
    conversations: ConversationServiceStub,
) -> None:
    conversation = create(conversations).id
    add(conversations, conversation, "nothing here")
    message = add(conversations, conversation, "lorem " * 200 + "NEEDLE" + " ipsum" * 200)

    (result,) = search(conversations, "needle")

    assert result.message_id == message.id
    assert "NEEDLE" in result.snippet
    assert result.snippet.startswith("…")
    assert result.snippet.endswith("…")
    assert len(result.snippet) <= 170


def test_search_returns_20_results_by_default_and_at_most_100(
    conversations: ConversationServiceStub,
) -> None:
    futures = [
        conversations.CreateConversation.future(
            pb.CreateConversationRequest(title=f"match {n}"), timeout=TIMEOUT
        )
        for n in range(105)
    ]
    for future in futures:
        future.result()

    assert len(search(conversations, "match")) == 20
    assert len(search(conversations, "match", page_size=5000)) == 100
    assert len(search(conversations, "match", page_size=7)) == 7


def test_search_without_matches_is_empty(conversations: ConversationServiceStub) -> None:
    add(conversations, create(conversations, "apples").id, "pears")

    assert search(conversations, "plums") == []


# Stats.


def utc_today() -> date:
    return datetime.now(UTC).date()


def test_stats_of_an_empty_database_are_zero(conversations: ConversationServiceStub) -> None:
    stats = conversations.GetConversationStats(pb.GetConversationStatsRequest(), timeout=TIMEOUT)

    assert stats.total_conversations == 0
    assert stats.total_messages == 0
    assert stats.average_messages_per_conversation == 0
    assert [day.count for day in stats.messages_per_day] == [0] * 7


def test_stats_count_totals_average_and_todays_messages(
    conversations: ConversationServiceStub,
) -> None:
    busy, _quiet, other = (create(conversations).id for _ in range(3))
    for _ in range(4):
        add(conversations, busy)
    add(conversations, other)

    before = utc_today()
    stats = conversations.GetConversationStats(pb.GetConversationStatsRequest(), timeout=TIMEOUT)
    after = utc_today()

    assert stats.total_conversations == 3
    assert stats.total_messages == 5
    assert stats.average_messages_per_conversation == pytest.approx(5 / 3)
    days = [date.fromisoformat(day.date) for day in stats.messages_per_day]
    assert days[-1] in (before, after)
    assert days == [days[-1] - timedelta(days=6 - n) for n in range(7)]
    assert [day.count for day in stats.messages_per_day] == [0] * 6 + [5]


# Export.


def test_json_export_holds_the_conversation_and_its_messages_in_order(
    conversations: ConversationServiceStub,
) -> None:
    conversation = create(conversations, "Export me")
    added = [
        add(conversations, conversation.id, "question?", role=USER),
        add(conversations, conversation.id, "answer.", role=ASSISTANT, metadata={"n": 1}),
    ]

    response = export(conversations, conversation.id, pb.EXPORT_FORMAT_JSON)
    unspecified = export(conversations, conversation.id, pb.EXPORT_FORMAT_UNSPECIFIED)
    document = json.loads(response.content.decode("utf-8"))

    assert response.media_type == "application/json"
    assert response.filename.endswith(".json")
    assert unspecified.content == response.content
    assert document["conversation"]["id"] == conversation.id
    assert document["conversation"]["title"] == "Export me"
    assert document["conversation"]["message_count"] == 2
    assert [(m["id"], m["role"], m["content"], m["metadata"]) for m in document["messages"]] == [
        (added[0].id, "user", "question?", None),
        (added[1].id, "assistant", "answer.", {"n": 1}),
    ]
    assert all(m["timestamp"].endswith("Z") for m in document["messages"])


def test_markdown_export_has_the_title_heading_and_every_message(
    conversations: ConversationServiceStub,
) -> None:
    conversation = create(conversations, "Weekend plans").id
    add(conversations, conversation, "Where shall we go?")
    add(conversations, conversation, "To the *sea*.", role=ASSISTANT)

    response = export(conversations, conversation, pb.EXPORT_FORMAT_MARKDOWN)
    text = response.content.decode("utf-8")

    assert response.media_type == "text/markdown; charset=utf-8"
    assert response.filename.endswith(".md")
    assert text.splitlines()[0] == "# Weekend plans"
    assert text.index("Where shall we go?") < text.index("To the *sea*.")


# Restart and shutdown.


def test_data_survives_a_restart(conversations: ConversationServiceStub, server: RunningServer) -> None:
    conversation = create(conversations, "durable")
    added = [add(conversations, conversation.id, f"m{n}", metadata={"n": n}) for n in range(3)]
    before = get(conversations, conversation.id)
    server.call(server.app.stop(grace=1.0))

    restarted, stop = start_server(server.settings)
    try:
        with Client(restarted.address) as alice:
            alice.login("alice", PASSWORD)
            again = alice.conversations
            assert get(again, conversation.id) == before
            assert all_messages(again, conversation.id) == added
            later = add(again, conversation.id, "after restart")
            assert micros(later.timestamp) > micros(added[-1].timestamp)
            assert [m.content for m in all_messages(again, conversation.id)][-1] == "after restart"
    finally:
        stop()


def test_server_stops_promptly_even_mid_health_probe(settings: Settings) -> None:
    # A stop that landed just as a probe finished used to be swallowed by asyncio.wait_for on
    # Python 3.11 (CPython gh-86296), and App.stop then waited for the probe task forever: about
    # one stop in seven hung while probing nonstop, so 30 attempts catch it almost surely.
    probing = settings.replace(health_check_interval=0.0001)
    for attempt in range(30):
        running, stop = start_server(probing)
        time.sleep(0.01)
        stopping = asyncio.run_coroutine_threadsafe(running.app.stop(grace=0), running.loop)
        try:
            stopping.result(timeout=1)
        except FutureTimeoutError:
            running.call(_cancel_health_probes())  # unstick it, so the test leaves nothing behind
            stopping.result(timeout=TIMEOUT)
            pytest.fail(f"App.stop was still running after 1 s (attempt {attempt + 1})")
        finally:
            stop()


async def _cancel_health_probes() -> None:
    for task in asyncio.all_tasks():
        if task.get_name() == "crewdb-health":
            task.cancel()
