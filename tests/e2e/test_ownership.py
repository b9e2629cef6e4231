"""Who sees and changes which conversation: its owner, another user, a moderator, an admin."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial

import grpc
import pytest

from crewdb.client import Client
from crewdb.models import UserRole
from crewdb.v1 import conversation_service_pb2 as pb
from crewdb.v1 import user_service_pb2 as users_pb
from crewdb.v1.conversation_service_pb2_grpc import ConversationServiceStub
from tests.conftest import RunningServer, sign_in
from tests.e2e.test_auth import REVOCATION_WINDOW, TIMEOUT, assert_fails, assert_stream_ended, rpc_failure

NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def bob(server: RunningServer) -> Iterator[Client]:
    """A second plain user."""
    with sign_in(server, "bob") as signed_in:
        yield signed_in


@pytest.fixture
def moderator(server: RunningServer) -> Iterator[Client]:
    with sign_in(server, "mod", UserRole.MODERATOR) as signed_in:
        yield signed_in


@pytest.fixture
def admin(server: RunningServer) -> Iterator[Client]:
    with sign_in(server, "root", UserRole.ADMIN) as signed_in:
        yield signed_in


def create(stub: ConversationServiceStub, title: str) -> pb.Conversation:
    return stub.CreateConversation(pb.CreateConversationRequest(title=title), timeout=TIMEOUT)


def add(stub: ConversationServiceStub, conversation_id: str, content: str) -> pb.Message:
    request = pb.AddMessageRequest(
        conversation_id=conversation_id, role=pb.MESSAGE_ROLE_USER, content=content
    )
    return stub.AddMessage(request, timeout=TIMEOUT)


def get(stub: ConversationServiceStub, conversation_id: str) -> pb.Conversation:
    return stub.GetConversation(pb.GetConversationRequest(id=conversation_id), timeout=TIMEOUT)


def messages(stub: ConversationServiceStub, conversation_id: str) -> list[pb.Message]:
    reply = stub.ListMessages(pb.ListMessagesRequest(conversation_id=conversation_id), timeout=TIMEOUT)
    return list(reply.messages)


def listed(stub: ConversationServiceStub, *, all_users: bool = False) -> list[str]:
    reply = stub.ListConversations(pb.ListConversationsRequest(all_users=all_users), timeout=TIMEOUT)
    return [conversation.id for conversation in reply.conversations]


def found(stub: ConversationServiceStub, query: str, *, all_users: bool = False) -> list[str]:
    request = pb.SearchConversationsRequest(query=query, all_users=all_users)
    reply = stub.SearchConversations(request, timeout=TIMEOUT)
    return [result.conversation.id for result in reply.results]


def stats(stub: ConversationServiceStub, *, all_users: bool = False) -> pb.ConversationStats:
    request = pb.GetConversationStatsRequest(all_users=all_users)
    return stub.GetConversationStats(request, timeout=TIMEOUT)


def snapshot(stub: ConversationServiceStub, conversation_id: str) -> tuple[bytes, list[bytes]]:
    """Everything the owner sees of a conversation, to compare before and after an attack."""
    conversation = get(stub, conversation_id).SerializeToString(deterministic=True)
    return conversation, [m.SerializeToString(deterministic=True) for m in messages(stub, conversation_id)]


@pytest.fixture
def alices(conversations: ConversationServiceStub) -> pb.Conversation:
    """alice's conversation with two messages."""
    conversation = create(conversations, "alice's plans")
    add(conversations, conversation.id, "alice's first secret")
    add(conversations, conversation.id, "alice's second secret")
    return get(conversations, conversation.id)


Attempt = Callable[[ConversationServiceStub, str], object]

ATTEMPTS: dict[str, Attempt] = {
    "GetConversation": get,
    "UpdateConversationTitle": lambda s, cid: s.UpdateConversationTitle(
        pb.UpdateConversationTitleRequest(id=cid, title="taken over"), timeout=TIMEOUT
    ),
    "DeleteConversation": lambda s, cid: s.DeleteConversation(
        pb.DeleteConversationRequest(id=cid), timeout=TIMEOUT
    ),
    "AddMessage": lambda s, cid: add(s, cid, "planted"),
    "ListMessages": messages,
    "ExportConversation": lambda s, cid: s.ExportConversation(
        pb.ExportConversationRequest(id=cid, format=pb.EXPORT_FORMAT_MARKDOWN), timeout=TIMEOUT
    ),
    "WatchMessages": lambda s, cid: next(
        s.WatchMessages(pb.WatchMessagesRequest(conversation_id=cid), timeout=TIMEOUT)
    ),
}


@pytest.mark.parametrize("rpc", list(ATTEMPTS))
def test_another_users_conversation_is_not_found_exactly_like_a_missing_one(
    conversations: ConversationServiceStub, alices: pb.Conversation, bob: Client, rpc: str
) -> None:
    before = snapshot(conversations, alices.id)
    theirs = assert_fails(
        lambda: ATTEMPTS[rpc](bob.conversations, alices.id), NOT_FOUND, "CONVERSATION_NOT_FOUND"
    )
    missing_id = str(uuid.uuid4())
    missing = rpc_failure(lambda: ATTEMPTS[rpc](bob.conversations, missing_id))
    assert (missing.code, missing.reason, missing.fields) == (theirs.code, theirs.reason, theirs.fields)
    assert theirs.message.replace(alices.id, "<id>") == missing.message.replace(missing_id, "<id>")
    assert alices.id not in missing.message
    assert snapshot(conversations, alices.id) == before


def test_watching_after_one_of_another_users_messages_is_not_found(
    conversations: ConversationServiceStub, alices: pb.Conversation, bob: Client
) -> None:
    first = messages(conversations, alices.id)[0]
    request = pb.WatchMessagesRequest(conversation_id=alices.id, after_message_id=first.id)
    assert_fails(
        lambda: next(bob.conversations.WatchMessages(request, timeout=TIMEOUT)),
        NOT_FOUND,
        "CONVERSATION_NOT_FOUND",
    )


def test_listing_search_and_stats_cover_only_the_callers_own(
    conversations: ConversationServiceStub, alices: pb.Conversation, bob: Client
) -> None:
    other = create(conversations, "alice's shared-word notes")
    add(conversations, other.id, "alice's shared-word text")
    bobs = create(bob.conversations, "bob's shared-word notes")
    add(bob.conversations, bobs.id, "bob's shared-word text")

    assert sorted(listed(conversations)) == sorted([alices.id, other.id])
    assert listed(bob.conversations) == [bobs.id]
    assert found(conversations, "shared-word") == [other.id]
    assert found(bob.conversations, "shared-word") == [bobs.id]
    assert found(bob.conversations, "secret") == []  # alice's messages say it, bob's do not
    reply = bob.conversations.SearchConversations(pb.SearchConversationsRequest(query="s"), timeout=TIMEOUT)
    assert b"alice" not in reply.SerializeToString()

    mine, his = stats(conversations), stats(bob.conversations)
    assert (mine.total_conversations, mine.total_messages) == (2, 3)
    assert (his.total_conversations, his.total_messages) == (1, 1)
    assert sum(day.count for day in his.messages_per_day) == 1


def test_all_users_is_permission_denied_for_a_plain_user(
    conversations: ConversationServiceStub, alices: pb.Conversation
) -> None:
    for call in (
        lambda: listed(conversations, all_users=True),
        lambda: found(conversations, "secret", all_users=True),
        lambda: stats(conversations, all_users=True),
    ):
        assert_fails(call, DENIED, "PERMISSION_DENIED")


def test_a_moderator_reads_any_conversation_but_may_not_change_another_users(
    conversations: ConversationServiceStub, alices: pb.Conversation, moderator: Client
) -> None:
    mods = moderator.conversations
    before = snapshot(conversations, alices.id)
    own = create(mods, "moderator's own")

    assert get(mods, alices.id) == get(conversations, alices.id)
    assert messages(mods, alices.id) == messages(conversations, alices.id)
    document = mods.ExportConversation(pb.ExportConversationRequest(id=alices.id), timeout=TIMEOUT)
    assert b"alice's first secret" in document.content
    assert sorted(listed(mods, all_users=True)) == sorted([alices.id, own.id])
    assert listed(mods) == [own.id]
    assert found(mods, "secret", all_users=True) == [alices.id]
    assert found(mods, "secret") == []
    assert stats(mods, all_users=True).total_messages == 2
    assert stats(mods).total_conversations == 1

    for rpc in ("UpdateConversationTitle", "DeleteConversation", "AddMessage"):
        assert_fails(partial(ATTEMPTS[rpc], mods, alices.id), DENIED, "PERMISSION_DENIED")
        missing = partial(ATTEMPTS[rpc], mods, str(uuid.uuid4()))
        assert_fails(missing, NOT_FOUND, "CONVERSATION_NOT_FOUND")
    assert snapshot(conversations, alices.id) == before

    renamed = mods.UpdateConversationTitle(
        pb.UpdateConversationTitleRequest(id=own.id, title="renamed"), timeout=TIMEOUT
    )
    assert renamed.title == "renamed"


def test_a_moderator_can_watch_another_users_conversation(
    conversations: ConversationServiceStub, alices: pb.Conversation, moderator: Client
) -> None:
    first, second = messages(conversations, alices.id)
    request = pb.WatchMessagesRequest(conversation_id=alices.id, after_message_id=first.id)
    watch = moderator.conversations.WatchMessages(request, timeout=TIMEOUT)
    try:
        assert next(watch).message == second
    finally:
        watch.cancel()


def test_an_admin_can_change_and_delete_another_users_conversation(
    conversations: ConversationServiceStub, alices: pb.Conversation, admin: Client
) -> None:
    renamed = admin.conversations.UpdateConversationTitle(
        pb.UpdateConversationTitleRequest(id=alices.id, title="moderated"), timeout=TIMEOUT
    )
    assert (renamed.title, renamed.owner_id) == ("moderated", alices.owner_id)
    add(admin.conversations, alices.id, "a note from the admin")
    assert get(conversations, alices.id).title == "moderated"
    assert messages(conversations, alices.id)[-1].content == "a note from the admin"
    admin.conversations.DeleteConversation(pb.DeleteConversationRequest(id=alices.id), timeout=TIMEOUT)
    assert_fails(lambda: get(conversations, alices.id), NOT_FOUND, "CONVERSATION_NOT_FOUND")


def test_owner_id_is_the_creators_user_id(
    client: Client, alices: pb.Conversation, bob: Client, moderator: Client
) -> None:
    alice_id = client.users.GetMe(users_pb.GetMeRequest(), timeout=TIMEOUT).id
    bob_id = bob.users.GetMe(users_pb.GetMeRequest(), timeout=TIMEOUT).id
    bobs = create(bob.conversations, "bob's")
    assert alices.owner_id == alice_id
    assert bobs.owner_id == bob_id
    everything = moderator.conversations.ListConversations(
        pb.ListConversationsRequest(all_users=True), timeout=TIMEOUT
    )
    assert {c.id: c.owner_id for c in everything.conversations} == {alices.id: alice_id, bobs.id: bob_id}
    search = client.conversations.SearchConversations(
        pb.SearchConversationsRequest(query="secret"), timeout=TIMEOUT
    )
    assert [r.conversation.owner_id for r in search.results] == [alice_id]


def test_a_page_token_is_only_good_for_the_listing_that_issued_it(
    conversations: ConversationServiceStub, alices: pb.Conversation, bob: Client, moderator: Client
) -> None:
    create(conversations, "another")
    create(moderator.conversations, "mod one")
    create(moderator.conversations, "mod two")

    def next_token(stub: ConversationServiceStub, *, all_users: bool = False) -> str:
        request = pb.ListConversationsRequest(page_size=1, all_users=all_users)
        token = stub.ListConversations(request, timeout=TIMEOUT).next_page_token
        assert token
        return token

    alices_token = next_token(conversations)
    mods_own_token = next_token(moderator.conversations)
    mods_all_token = next_token(moderator.conversations, all_users=True)
    for stub, token, all_users in (
        (bob.conversations, alices_token, False),
        (moderator.conversations, alices_token, True),
        (moderator.conversations, mods_own_token, True),
        (moderator.conversations, mods_all_token, False),
    ):
        request = pb.ListConversationsRequest(page_token=token, all_users=all_users)
        problem = assert_fails(
            partial(stub.ListConversations, request, timeout=TIMEOUT),
            INVALID,
            "INVALID_PAGE_TOKEN",
        )
        assert set(problem.fields) == {"page_token"}
    second_page = conversations.ListConversations(
        pb.ListConversationsRequest(page_size=1, page_token=alices_token), timeout=TIMEOUT
    )
    assert [c.id for c in second_page.conversations] == [alices.id]  # the token works where issued


def test_a_demoted_moderator_stops_receiving_another_users_messages(
    conversations: ConversationServiceStub, alices: pb.Conversation, moderator: Client, admin: Client
) -> None:
    first, second = messages(conversations, alices.id)
    request = pb.WatchMessagesRequest(conversation_id=alices.id, after_message_id=first.id)
    watch = moderator.conversations.WatchMessages(request, timeout=10)
    try:
        assert next(watch).message == second
        mod_id = moderator.users.GetMe(users_pb.GetMeRequest(), timeout=TIMEOUT).id
        admin.users.UpdateUserRole(
            users_pb.UpdateUserRoleRequest(user_id=mod_id, role=users_pb.USER_ROLE_USER), timeout=TIMEOUT
        )
        assert_fails(lambda: get(moderator.conversations, alices.id), NOT_FOUND, "CONVERSATION_NOT_FOUND")
        time.sleep(REVOCATION_WINDOW * 0.75)
        add(conversations, alices.id, "said after the moderator was demoted")
        assert_stream_ended(watch, (NOT_FOUND, "CONVERSATION_NOT_FOUND"), (DENIED, "PERMISSION_DENIED"))
    finally:
        watch.cancel()
