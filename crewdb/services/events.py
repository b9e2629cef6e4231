"""In-process fan-out of conversation events to WatchMessages streams, on the event loop.

Publishing never blocks and never grows memory without bound: each subscriber buffers up to
`buffer` messages or `buffer_bytes` of content; past that it is marked lagged and catches up
from the database, which is the source of truth. So a slow or stalled watcher costs a flag,
not the server's memory.
Everything here runs on the event-loop thread; writers hand events over with
`loop.call_soon_threadsafe`, in commit order.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Callable

from crewdb.models import Message


def on_this_loop(callback: Callable[..., object]) -> Callable[..., None]:
    """`callback` made callable from another thread (the database writer, after a commit); it
    then runs on the event loop that is running now, in the order of the calls."""
    loop = asyncio.get_running_loop()

    def call(*args: object) -> None:
        loop.call_soon_threadsafe(callback, *args)

    return call


class Subscription:
    """One watcher's view of a conversation's events."""

    def __init__(self, conversation_id: str, buffer: int, buffer_bytes: int) -> None:
        self.conversation_id = conversation_id
        self.pending: deque[Message] = deque()
        self.pending_bytes = 0
        self.lagged = False
        self.deleted = False
        self.closed = False
        self._buffer = buffer
        self._buffer_bytes = buffer_bytes
        self._wake = asyncio.Event()

    def _push(self, message: Message) -> None:
        size = len(message.content)
        if len(self.pending) >= self._buffer or self.pending_bytes + size > self._buffer_bytes:
            self.drop_pending()
            self.lagged = True
        else:
            self.pending.append(message)
            self.pending_bytes += size
        self._wake.set()

    def take(self) -> Message:
        message = self.pending.popleft()
        self.pending_bytes -= len(message.content)
        return message

    def drop_pending(self) -> None:
        self.pending.clear()
        self.pending_bytes = 0

    def _signal(self) -> None:
        self._wake.set()

    async def wait(self) -> None:
        """Returns once something happened since the last wait."""
        await self._wake.wait()
        self._wake.clear()


class MessageEvents:
    """Who watches which conversation, and the events that reach them."""

    def __init__(self, buffer: int = 256, buffer_bytes: int = 1024 * 1024) -> None:
        self._buffer = buffer
        self._buffer_bytes = buffer_bytes
        self._subscribers: defaultdict[str, set[Subscription]] = defaultdict(set)
        self._closed = False

    def subscribe(self, conversation_id: str) -> Subscription:
        subscription = Subscription(conversation_id, self._buffer, self._buffer_bytes)
        subscription.closed = self._closed
        self._subscribers[conversation_id].add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        watchers = self._subscribers.get(subscription.conversation_id)
        if watchers is not None:
            watchers.discard(subscription)
            if not watchers:
                del self._subscribers[subscription.conversation_id]

    def watcher_count(self) -> int:
        return sum(len(watchers) for watchers in self._subscribers.values())

    def message_added(self, message: Message) -> None:
        for subscription in self._subscribers.get(message.conversation_id, ()):
            subscription._push(message)

    def conversation_deleted(self, conversation_id: str) -> None:
        for subscription in self._subscribers.get(conversation_id, ()):
            subscription.deleted = True
            subscription._signal()

    def close(self) -> None:
        """Ends every watch (server shutdown); later subscriptions start closed."""
        self._closed = True
        for watchers in self._subscribers.values():
            for subscription in watchers:
                subscription.closed = True
                subscription._signal()
