"""Every error a caller can reach through ConversationService, from one table: code, reason, fields."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from crewdb.v1 import conversation_service_pb2 as pb
from crewdb.v1.conversation_service_pb2_grpc import ConversationServiceStub
from tests.rpc_errors import failure

TIMEOUT = 5.0
MISSING = "no-such-conversation"
LONG_ID = "i" * 129
METADATA_LIMIT = 16 * 1024
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
USER = pb.MESSAGE_ROLE_USER


@dataclass(frozen=True)
class World:
    """Two conversations with messages, and page tokens issued by real listings."""

    a: str
    b: str
    b_message: str
    a_messages_token: str
    conversations_token: str


Call = Callable[[ConversationServiceStub, World], object]


@dataclass(frozen=True)
class Case:
    """A request that must fail, and how: status code, ErrorInfo reason, BadRequest fields."""

    call: Call
    code: grpc.StatusCode
    reason: str
    fields: frozenset[str]


@pytest.fixture
def world(conversations: ConversationServiceStub) -> World:
    ids = []
    for title in ("a", "b"):
        conversation = conversations.CreateConversation(
            pb.CreateConversationRequest(title=title), timeout=TIMEOUT
        )
        for n in range(3):
            add(conversations, conversation.id, content=f"{title} {n}")
        ids.append(conversation.id)
    a, b = ids
    b_messages = conversations.ListMessages(pb.ListMessagesRequest(conversation_id=b), timeout=TIMEOUT)
    a_page = conversations.ListMessages(
        pb.ListMessagesRequest(conversation_id=a, page_size=1), timeout=TIMEOUT
    )
    conversations_page = conversations.ListConversations(
        pb.ListConversationsRequest(page_size=1), timeout=TIMEOUT
    )
    assert a_page.next_page_token
    assert conversations_page.next_page_token
    return World(
        a=a,
        b=b,
        b_message=b_messages.messages[0].id,
        a_messages_token=a_page.next_page_token,
        conversations_token=conversations_page.next_page_token,
    )


def add(
    stub: ConversationServiceStub,
    conversation_id: str,
    *,
    role: int = USER,
    content: str = "hello",
    metadata: dict[str, Any] | None = None,
) -> pb.Message:
    request = pb.AddMessageRequest(
        conversation_id=conversation_id, role=pb.MessageRole.ValueType(role), content=content
    )
    if metadata is not None:
        request.metadata.update(metadata)
    return stub.AddMessage(request, timeout=TIMEOUT)


def nested(levels: int) -> dict[str, Any]:
    """A JSON object `levels` objects deep."""
    value: dict[str, Any] = {"leaf": True}
    for _ in range(levels - 1):
        value = {"child": value}
    return value


def tampered(token: str) -> str:
    """`token` with one character in the middle changed to another base64url character."""
    middle = len(token) // 2
    flipped = "B" if token[middle] == "A" else "A"
    return token[:middle] + flipped + token[middle + 1 :]


# The table is built before the world exists; these stand in for its ids and its page
# tokens ("cursors" here, so the linter does not take them for passwords).
A = "<conversation a>"
B = "<conversation b>"
B_MESSAGE = "<a message of b>"
A_CURSOR = "<a ListMessages token of a>"
TAMPERED_A_CURSOR = "<a tampered ListMessages token of a>"
LIST_CURSOR = "<a ListConversations token>"
TAMPERED_LIST_CURSOR = "<a tampered ListConversations token>"
STAND_INS: dict[str, Callable[[World], str]] = {
    A: lambda w: w.a,
    B: lambda w: w.b,
    B_MESSAGE: lambda w: w.b_message,
    A_CURSOR: lambda w: w.a_messages_token,
    TAMPERED_A_CURSOR: lambda w: tampered(w.a_messages_token),
    LIST_CURSOR: lambda w: w.conversations_token,
    TAMPERED_LIST_CURSOR: lambda w: tampered(w.conversations_token),
}


def real(world: World, value: str) -> str:
    stand_in = STAND_INS.get(value)
    return stand_in(world) if stand_in else value


def create(title: str) -> Call:
    return lambda s, w: s.CreateConversation(pb.CreateConversationRequest(title=title), timeout=TIMEOUT)


def get(conversation: str) -> Call:
    return lambda s, w: s.GetConversation(
        pb.GetConversationRequest(id=real(w, conversation)), timeout=TIMEOUT
    )


def update(conversation: str, title: str = "new title") -> Call:
    return lambda s, w: s.UpdateConversationTitle(
        pb.UpdateConversationTitleRequest(id=real(w, conversation), title=title), timeout=TIMEOUT
    )


def delete(conversation: str) -> Call:
    return lambda s, w: s.DeleteConversation(
        pb.DeleteConversationRequest(id=real(w, conversation)), timeout=TIMEOUT
    )


def add_message(
    conversation: str,
    *,
    role: int = USER,
    content: str = "hello",
    metadata: dict[str, Any] | None = None,
) -> Call:
    return lambda s, w: add(s, real(w, conversation), role=role, content=content, metadata=metadata)


def list_conversations(page_size: int = 0, cursor: str = "") -> Call:
    return lambda s, w: s.ListConversations(
        pb.ListConversationsRequest(page_size=page_size, page_token=real(w, cursor)), timeout=TIMEOUT
    )


def list_messages(conversation: str, page_size: int = 0, cursor: str = "") -> Call:
    return lambda s, w: s.ListMessages(
        pb.ListMessagesRequest(
            conversation_id=real(w, conversation), page_size=page_size, page_token=real(w, cursor)
        ),
        timeout=TIMEOUT,
    )


def search(query: str, page_size: int = 0) -> Call:
    return lambda s, w: s.SearchConversations(
        pb.SearchConversationsRequest(query=query, page_size=page_size), timeout=TIMEOUT
    )


def export(conversation: str, export_format: int = pb.EXPORT_FORMAT_JSON) -> Call:
    return lambda s, w: s.ExportConversation(
        pb.ExportConversationRequest(
            id=real(w, conversation), format=pb.ExportFormat.ValueType(export_format)
        ),
        timeout=TIMEOUT,
    )


def watch(conversation: str, after: str = "") -> Call:
    """Opens the stream and waits for its first response (or its error)."""

    def call(stub: ConversationServiceStub, world: World) -> object:
        request = pb.WatchMessagesRequest(
            conversation_id=real(world, conversation), after_message_id=real(world, after)
        )
        return next(stub.WatchMessages(request, timeout=TIMEOUT))

    return call


def export_over_32_mib(stub: ConversationServiceStub, world: World) -> object:
    """Fills conversation b past the 32 MiB export limit, then exports it."""
    request = pb.AddMessageRequest(conversation_id=world.b, role=USER, content="y" * 100_000)
    for future in [stub.AddMessage.future(request, timeout=TIMEOUT) for _ in range(340)]:
        future.result()
    return stub.ExportConversation(pb.ExportConversationRequest(id=world.b), timeout=TIMEOUT)


def case(name: str, call: Call, code: grpc.StatusCode, reason: str, *fields: str) -> Any:
    return pytest.param(Case(call, code, reason, frozenset(fields)), id=name)


def invalid(name: str, call: Call, *fields: str) -> Any:
    return case(name, call, INVALID, "INVALID_ARGUMENT", *fields)


def bad_token(name: str, call: Call) -> Any:
    return case(name, call, INVALID, "INVALID_PAGE_TOKEN", "page_token")


def missing(name: str, call: Call) -> Any:
    return case(name, call, NOT_FOUND, "CONVERSATION_NOT_FOUND")


CASES = [
    # Required ids.
    invalid("get-without-id", get(""), "id"),
    invalid("update-title-without-id", update(""), "id"),
    invalid("delete-without-id", delete(""), "id"),
    invalid("add-message-without-conversation-id", add_message(""), "conversation_id"),
    invalid("list-messages-without-conversation-id", list_messages(""), "conversation_id"),
    invalid("export-without-id", export(""), "id"),
    invalid("watch-without-conversation-id", watch(""), "conversation_id"),
    # Ids longer than 128 characters.
    invalid("get-with-long-id", get(LONG_ID), "id"),
    invalid("update-title-with-long-id", update(LONG_ID), "id"),
    invalid("delete-with-long-id", delete(LONG_ID), "id"),
    invalid("add-message-with-long-id", add_message(LONG_ID), "conversation_id"),
    invalid("list-messages-with-long-id", list_messages(LONG_ID), "conversation_id"),
    invalid("export-with-long-id", export(LONG_ID), "id"),
    invalid("watch-with-long-id", watch(LONG_ID), "conversation_id"),
    invalid("watch-with-long-after-message-id", watch(A, LONG_ID), "after_message_id"),
    # Message fields.
    invalid("add-message-with-unspecified-role", add_message(A, role=0), "role"),
    invalid("add-message-with-unknown-role", add_message(A, role=99), "role"),
    invalid("add-message-with-empty-content", add_message(A, content=""), "content"),
    invalid("add-message-with-whitespace-content", add_message(A, content=" \n\t "), "content"),
    invalid("add-message-with-100001-characters", add_message(A, content="x" * 100_001), "content"),
    invalid(
        "add-message-with-metadata-one-byte-over-16kib",
        # {"blob":"…"} is 11 bytes plus the string.
        add_message(A, metadata={"blob": "x" * (METADATA_LIMIT - 10)}),
        "metadata",
    ),
    invalid("add-message-with-metadata-nested-33-levels", add_message(A, metadata=nested(33)), "metadata"),
    # Titles.
    invalid("create-with-201-character-title", create("t" * 201), "title"),
    invalid("update-with-201-character-title", update(A, "t" * 201), "title"),
    # Page sizes.
    invalid("list-conversations-with-negative-page-size", list_conversations(-1), "page_size"),
    invalid("list-messages-with-negative-page-size", list_messages(A, -1), "page_size"),
    invalid("search-with-negative-page-size", search("a", -1), "page_size"),
    # Page tokens.
    bad_token("list-conversations-with-garbage-token", list_conversations(cursor="garbage")),
    bad_token("list-conversations-with-non-ascii-token", list_conversations(cursor="☃☃☃")),
    bad_token("list-messages-with-garbage-token", list_messages(A, cursor="garbage")),
    bad_token("list-messages-with-another-conversations-token", list_messages(B, cursor=A_CURSOR)),
    bad_token("list-messages-with-a-list-conversations-token", list_messages(A, cursor=LIST_CURSOR)),
    bad_token("list-conversations-with-a-list-messages-token", list_conversations(cursor=A_CURSOR)),
    bad_token("list-messages-with-a-tampered-token", list_messages(A, cursor=TAMPERED_A_CURSOR)),
    bad_token("list-conversations-with-a-tampered-token", list_conversations(cursor=TAMPERED_LIST_CURSOR)),
    # Search queries.
    invalid("search-with-empty-query", search(""), "query"),
    invalid("search-with-201-character-query", search("q" * 201), "query"),
    # Export formats.
    invalid("export-with-unknown-format", export(A, 7), "format"),
    # Conversations that do not exist.
    missing("get-missing-conversation", get(MISSING)),
    missing("update-title-of-missing-conversation", update(MISSING)),
    missing("delete-missing-conversation", delete(MISSING)),
    missing("add-message-to-missing-conversation", add_message(MISSING)),
    missing("list-messages-of-missing-conversation", list_messages(MISSING)),
    missing("export-missing-conversation", export(MISSING)),
    missing("watch-missing-conversation", watch(MISSING)),
    # Messages that are not in the watched conversation.
    case(
        "watch-after-a-message-of-another-conversation",
        watch(A, B_MESSAGE),
        NOT_FOUND,
        "MESSAGE_NOT_FOUND",
    ),
    case("watch-after-an-unknown-message", watch(A, "no-such-message"), NOT_FOUND, "MESSAGE_NOT_FOUND"),
    # Limits on what the server sends back.
    case("export-over-32-mib", export_over_32_mib, RESOURCE_EXHAUSTED, "EXPORT_TOO_LARGE"),
    # Several violations in one request are reported together.
    invalid(
        "add-message-with-every-field-wrong",
        add_message("", role=99, content=" ", metadata=nested(33)),
        "conversation_id",
        "role",
        "content",
        "metadata",
    ),
    invalid(
        "add-message-with-long-content-and-oversized-metadata",
        add_message(A, content="x" * 100_001, metadata={"blob": "x" * METADATA_LIMIT}),
        "content",
        "metadata",
    ),
    invalid("update-title-without-id-and-with-long-title", update("", "t" * 201), "id", "title"),
    invalid("search-with-empty-query-and-negative-page-size", search("", -1), "query", "page_size"),
    invalid(
        "watch-with-long-conversation-and-message-ids",
        watch(LONG_ID, LONG_ID),
        "conversation_id",
        "after_message_id",
    ),
    invalid(
        "list-messages-without-conversation-id-and-with-negative-page-size",
        list_messages("", -1),
        "conversation_id",
        "page_size",
    ),
    invalid("export-without-id-and-with-unknown-format", export("", 7), "id", "format"),
]


@pytest.mark.parametrize("case", CASES)
def test_error_reports_its_code_reason_and_every_offending_field(
    conversations: ConversationServiceStub, world: World, case: Case
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        case.call(conversations, world)

    got = failure(raised.value)
    assert got.code != grpc.StatusCode.UNKNOWN
    assert "Traceback" not in got.message
    assert got.request_id
    assert (got.code, got.reason, frozenset(got.fields)) == (case.code, case.reason, case.fields), got.message
    assert all(got.fields.values()), "every field violation has a description"


def test_request_over_4_mib_is_refused_by_grpc_itself(
    conversations: ConversationServiceStub, world: World
) -> None:
    # gRPC refuses it before crewdb sees it, so it carries no ErrorInfo; within crewdb's own
    # limits (100,000 characters, 16 KiB of metadata) a request stays far below 4 MiB.
    with pytest.raises(grpc.RpcError) as raised:
        add(conversations, world.a, content="x" * (5 * 1024 * 1024))

    error = raised.value
    assert isinstance(error, grpc.Call)
    assert error.code() == RESOURCE_EXHAUSTED
