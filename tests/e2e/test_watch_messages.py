"""WatchMessages end to end: live delivery, resume, cancel, delete, slow consumers and many watchers."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import grpc
import pytest

from crewdb.v1 import conversation_service_pb2 as pb
from crewdb.v1.conversation_service_pb2_grpc import ConversationServiceStub
from tests.conftest import RunningServer
from tests.rpc_errors import failure

TIMEOUT = 5.0
# A stream the server never ends still ends at this deadline, so a bug cannot hang the suite.
STREAM_DEADLINE = 30.0


class Watcher:
    """One WatchMessages stream, read on its own thread so the test can wait with timeouts."""

    def __init__(
        self,
        stub: ConversationServiceStub,
        conversation_id: str,
        after_message_id: str = "",
        *,
        read: bool = True,
    ) -> None:
        request = pb.WatchMessagesRequest(conversation_id=conversation_id, after_message_id=after_message_id)
        self.call = stub.WatchMessages(request, timeout=STREAM_DEADLINE)
        self.error: grpc.RpcError | None = None
        self._received: queue.Queue[pb.Message] = queue.Queue()
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        if read:
            self.start_reading()

    def start_reading(self) -> None:
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self._received.put(response.message)
        except grpc.RpcError as error:
            self.error = error
        finally:
            self._ended.set()

    def take(self, count: int, timeout: float = TIMEOUT) -> list[pb.Message]:
        """The next `count` messages; fails if they do not all arrive within `timeout`."""
        deadline = time.monotonic() + timeout
        taken: list[pb.Message] = []
        while len(taken) < count:
            remaining = deadline - time.monotonic()
            try:
                taken.append(self._received.get(timeout=max(remaining, 0.001)))
            except queue.Empty:
                pytest.fail(f"received {len(taken)} of {count} messages in {timeout}s: {self.error}")
        return taken

    def assert_nothing_more(self, wait: float = 0.3) -> None:
        time.sleep(wait)
        assert self._received.empty(), f"unexpected message: {self._received.get_nowait()}"

    def ended(self, timeout: float = TIMEOUT) -> grpc.RpcError:
        """The error the stream ended with; fails if it is still open after `timeout`."""
        assert self._ended.wait(timeout), "stream still open"
        assert self.error is not None
        return self.error

    def cancel(self) -> None:
        self.call.cancel()
        if self._thread.is_alive():
            self._thread.join(TIMEOUT)


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def watcher_count(server: RunningServer) -> int:
    async def read() -> int:  # on the server's loop, where the watcher registry lives
        return server.app.events.watcher_count()

    count: int = server.call(read())
    return count


def wait_for_watchers(server: RunningServer, count: int) -> None:
    """Until `count` streams have subscribed: each started from the messages committed by then."""
    wait_until(lambda: watcher_count(server) == count)


def create(stub: ConversationServiceStub) -> str:
    return stub.CreateConversation(pb.CreateConversationRequest(), timeout=TIMEOUT).id


def add(stub: ConversationServiceStub, conversation_id: str, content: str) -> pb.Message:
    request = pb.AddMessageRequest(
        conversation_id=conversation_id, role=pb.MESSAGE_ROLE_USER, content=content
    )
    return stub.AddMessage(request, timeout=TIMEOUT)


def add_many(stub: ConversationServiceStub, conversation_id: str, contents: list[str]) -> None:
    for content in contents:
        add(stub, conversation_id, content)


def add_concurrently(stub: ConversationServiceStub, conversation_id: str, contents: list[str]) -> None:
    """Adds them all at once; the server orders them as it commits them."""
    futures = [
        stub.AddMessage.future(
            pb.AddMessageRequest(conversation_id=conversation_id, role=pb.MESSAGE_ROLE_USER, content=content),
            timeout=TIMEOUT,
        )
        for content in contents
    ]
    for future in futures:
        future.result()


def stored(stub: ConversationServiceStub, conversation_id: str) -> list[pb.Message]:
    """Every message of the conversation in conversation order, as ListMessages pages them."""
    messages: list[pb.Message] = []
    token = ""
    while True:
        page = stub.ListMessages(
            pb.ListMessagesRequest(conversation_id=conversation_id, page_size=1000, page_token=token),
            timeout=TIMEOUT,
        )
        messages += page.messages
        token = page.next_page_token
        if not token:
            return messages


def ids(messages: list[pb.Message]) -> list[str]:
    return [m.id for m in messages]


def test_live_messages_arrive_in_order(conversations: ConversationServiceStub, server: RunningServer) -> None:
    conversation = create(conversations)
    watcher = Watcher(conversations, conversation)
    wait_for_watchers(server, 1)

    added = [add(conversations, conversation, f"m{n}") for n in range(5)]

    try:
        assert watcher.take(5) == added
        watcher.assert_nothing_more()
    finally:
        watcher.cancel()


def test_watch_without_after_message_id_sends_only_new_messages(
    conversations: ConversationServiceStub, server: RunningServer
) -> None:
    conversation = create(conversations)
    add_many(conversations, conversation, ["old 1", "old 2", "old 3"])
    watcher = Watcher(conversations, conversation)
    wait_for_watchers(server, 1)

    added = [add(conversations, conversation, "new 1"), add(conversations, conversation, "new 2")]

    try:
        assert watcher.take(2) == added
        watcher.assert_nothing_more()
    finally:
        watcher.cancel()


def test_watch_after_the_last_message_replays_nothing_then_continues_live(
    conversations: ConversationServiceStub, server: RunningServer
) -> None:
    conversation = create(conversations)
    last = [add(conversations, conversation, f"old {n}") for n in range(3)][-1]
    watcher = Watcher(conversations, conversation, last.id)
    wait_for_watchers(server, 1)

    added = add(conversations, conversation, "new")

    try:
        assert watcher.take(1) == [added]
        watcher.assert_nothing_more()
    finally:
        watcher.cancel()


def test_resume_replays_the_rest_then_continues_live_without_gaps_or_duplicates(
    conversations: ConversationServiceStub,
) -> None:
    conversation = create(conversations)
    # More history than the server replays in one database read (500), so live writes land
    # while the replay is still going.
    add_concurrently(conversations, conversation, [f"old {n}" for n in range(600)])
    resume_after = stored(conversations, conversation)[9]
    live_contents = [f"live {n}" for n in range(200)]
    writer = threading.Thread(target=add_many, args=(conversations, conversation, live_contents))

    writer.start()
    watcher = Watcher(conversations, conversation, resume_after.id)
    try:
        received = watcher.take(590 + 200)
        writer.join(TIMEOUT)
        assert ids(received) == ids(stored(conversations, conversation)[10:])
        assert [m.content for m in received[590:]] == live_contents
        watcher.assert_nothing_more()
    finally:
        watcher.cancel()
        writer.join(TIMEOUT)


@pytest.mark.parametrize("busy", [False, True], ids=["idle-stream", "stream-with-unread-messages"])
def test_client_cancel_ends_the_stream_and_releases_the_watcher(
    conversations: ConversationServiceStub, server: RunningServer, busy: bool
) -> None:
    conversation = create(conversations)
    watcher = Watcher(conversations, conversation, read=False)
    wait_for_watchers(server, 1)
    if busy:  # 6 MB unread: the server is stuck sending, past HTTP/2 flow control
        add_many(conversations, conversation, ["x" * 16_000] * 400)

    watcher.cancel()

    assert watcher.call.code() == grpc.StatusCode.CANCELLED
    wait_for_watchers(server, 0)
    # The server still serves the conversation.
    assert add(conversations, conversation, "after cancel").content == "after cancel"


def test_deleting_the_conversation_ends_the_stream_with_not_found(
    conversations: ConversationServiceStub, server: RunningServer
) -> None:
    conversation = create(conversations)
    watcher = Watcher(conversations, conversation)
    wait_for_watchers(server, 1)
    added = add(conversations, conversation, "last words")
    assert watcher.take(1) == [added]

    conversations.DeleteConversation(pb.DeleteConversationRequest(id=conversation), timeout=TIMEOUT)

    error = failure(watcher.ended())
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "CONVERSATION_NOT_FOUND")
    wait_for_watchers(server, 0)


def test_server_shutdown_ends_the_stream_with_unavailable(
    conversations: ConversationServiceStub, server: RunningServer
) -> None:
    conversation = create(conversations)
    watcher = Watcher(conversations, conversation)
    wait_for_watchers(server, 1)

    server.call(server.app.stop(grace=1.0))

    error = failure(watcher.ended())
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE")


def test_slow_consumer_receives_every_message_in_order_after_falling_behind(
    conversations: ConversationServiceStub, server: RunningServer
) -> None:
    conversation = create(conversations)
    watcher = Watcher(conversations, conversation, read=False)
    wait_for_watchers(server, 1)
    # 16 MB: HTTP/2 flow control stops the server sending after a few MB, and the rest is far
    # more than the 256 messages it buffers per watcher, so it must catch up from the database.
    add_concurrently(conversations, conversation, [f"{n:04d} " + "x" * 16_000 for n in range(1000)])

    watcher.start_reading()
    try:
        received = watcher.take(1000)
        assert ids(received) == ids(stored(conversations, conversation))
        assert len(set(ids(received))) == 1000
        added = add(conversations, conversation, "live again")
        assert watcher.take(1) == [added]
        watcher.assert_nothing_more()
    finally:
        watcher.cancel()


def test_100_watchers_all_receive_a_message_while_unary_calls_still_succeed(
    conversations: ConversationServiceStub, server: RunningServer
) -> None:
    conversation = create(conversations)
    other = create(conversations)
    watchers = [Watcher(conversations, conversation) for _ in range(100)]
    try:
        wait_for_watchers(server, 100)

        for n in range(10):
            add(conversations, other, f"unrelated {n}")
            conversations.GetConversation(pb.GetConversationRequest(id=other), timeout=TIMEOUT)
            conversations.ListConversations(pb.ListConversationsRequest(), timeout=TIMEOUT)
        added = add(conversations, conversation, "to everyone")

        for watcher in watchers:
            assert watcher.take(1) == [added]
    finally:
        for watcher in watchers:
            watcher.cancel()
    wait_for_watchers(server, 0)
