"""Conversation use cases: validation, one transaction per call, and events for watchers."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from functools import partial
from typing import TypeVar

from crewdb.clock import Clock, format_timestamp
from crewdb.db import conversations as store
from crewdb.db.engine import Connection, Database
from crewdb.errors import (
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from crewdb.models import (
    Conversation,
    ConversationStats,
    DailyCount,
    ExportDocument,
    ExportFormat,
    JsonObject,
    Message,
    MessageRole,
    Page,
    Principal,
    SearchHit,
)
from crewdb.services.events import MessageEvents, on_this_loop
from crewdb.services.pagination import PageTokens, check_page_size, page_size
from crewdb.services.validation import check_id, raise_if

# Limits; the proto documents the same numbers.
TITLE_MAX_LENGTH = 200
CONTENT_MAX_LENGTH = 100_000
METADATA_MAX_BYTES = 16 * 1024
METADATA_MAX_DEPTH = 32
QUERY_MAX_LENGTH = 200
CONVERSATIONS_PAGE = (50, 200)  # (default, maximum)
MESSAGES_PAGE = (100, 1000)
SEARCH_PAGE = (20, 100)
STATS_DAYS = 7
EXPORT_MAX_BYTES = 32 * 1024 * 1024
SNIPPET_LENGTH = 160
# Added to a search result's score when its title matches: a title match outranks any number
# of matching messages, as the proto promises.
TITLE_MATCH_SCORE = 1_000_000_000
# Messages a watcher reads from the database at a time while catching up (at most about
# 100 x 100,000 characters held per watcher).
WATCH_BATCH = 100
# Reads of at most this many rows run on the event loop (see ConversationService._read):
# conversations are small rows; a message may hold 100,000 characters, so a page of at most
# 50 (a few MB at worst, a few ms to decode) is the most read on the loop.
INLINE_CONVERSATION_ROWS = 201
INLINE_MESSAGE_ROWS = 51
# A ListMessages page ends early rather than carry more than about this many bytes, which
# keeps it under gRPC's default 4 MiB receive limit.
MESSAGES_PAGE_MAX_BYTES = 3 * 1024 * 1024


T = TypeVar("T")


def conversation_not_found(conversation_id: str) -> NotFoundError:
    return NotFoundError(f"conversation {conversation_id!r} not found", reason="CONVERSATION_NOT_FOUND")


class ConversationService:
    """Conversations and their messages."""

    def __init__(self, db: Database, events: MessageEvents, page_tokens: PageTokens, clock: Clock) -> None:
        self._db = db
        self._events = events
        self._tokens = page_tokens
        self._clock = clock

    async def create_conversation(self, caller: Principal, title: str) -> Conversation:
        """A new conversation owned by the caller. Raises: InvalidArgumentError."""
        raise_if(_check_title(title))
        conversation_id = str(uuid.uuid4())

        def work(conn: Connection) -> Conversation:
            store.insert_conversation(conn, conversation_id, title, self._clock.now(), owner=caller.user_id)
            found = store.get_conversation(conn, conversation_id, owner=caller.user_id)
            return _must_exist(found, conversation_id)

        return await self._db.write(work)

    async def get_conversation(self, caller: Principal, conversation_id: str) -> Conversation:
        """Raises: InvalidArgumentError, NotFoundError."""
        raise_if(check_id("id", conversation_id))
        owner = _reader(caller)
        found = self._db.read_now(lambda conn: store.get_conversation(conn, conversation_id, owner=owner))
        return _must_exist(found, conversation_id)

    async def list_conversations(
        self, caller: Principal, size: int, token: str, *, all_users: bool = False
    ) -> Page[Conversation]:
        """Most recently updated first. Raises: InvalidArgumentError, PermissionDeniedError."""
        raise_if(check_page_size(size))
        owner = _lister(caller, all_users)
        limit = page_size(size, default=CONVERSATIONS_PAGE[0], maximum=CONVERSATIONS_PAGE[1])
        scope = f"conversations:{owner or '*'}"
        after = self._tokens.after(scope, token)
        rows = await self._read(
            limit + 1,
            INLINE_CONVERSATION_ROWS,
            lambda conn: store.list_conversations(conn, after, limit + 1, owner=owner),
        )
        return self._tokens.page(rows, limit, scope, store.conversation_position)

    async def update_title(self, caller: Principal, conversation_id: str, title: str) -> Conversation:
        """Raises: InvalidArgumentError, NotFoundError, PermissionDeniedError."""
        raise_if(check_id("id", conversation_id) + _check_title(title))
        owner = _writer(caller)

        def work(conn: Connection) -> Conversation | None:
            updated = store.update_title(conn, conversation_id, title, self._clock.now(), owner=owner)
            _deny_if_only_readable(conn, caller, conversation_id, updated is not None)
            return updated

        return _must_exist(await self._db.write(work), conversation_id)

    async def delete_conversation(self, caller: Principal, conversation_id: str) -> None:
        """Deletes it with its messages and ends its watchers.

        Raises: InvalidArgumentError, NotFoundError, PermissionDeniedError.
        """
        raise_if(check_id("id", conversation_id))
        owner = _writer(caller)
        notify = on_this_loop(self._events.conversation_deleted)

        def work(conn: Connection) -> bool:
            deleted = store.delete_conversation(conn, conversation_id, owner=owner)
            _deny_if_only_readable(conn, caller, conversation_id, deleted)
            return deleted

        deleted = await self._db.write(
            work, after_commit=lambda done: notify(conversation_id) if done else None
        )
        if not deleted:
            raise conversation_not_found(conversation_id)

    async def add_message(
        self,
        caller: Principal,
        conversation_id: str,
        role: MessageRole | None,
        content: str,
        metadata: JsonObject | None,
    ) -> Message:
        """Appends a message, bumps the conversation, tells watchers.

        Raises: InvalidArgumentError, NotFoundError, PermissionDeniedError.
        """
        violations = check_id("conversation_id", conversation_id)
        violations += _check_content(content) + _check_metadata(metadata)
        if role is None:
            violations.insert(1, FieldViolation("role", "required: user, assistant, system or tool"))
        if violations or role is None:
            raise InvalidArgumentError.of(violations)
        message_id = str(uuid.uuid4())
        owner = _writer(caller)
        notify = on_this_loop(self._events.message_added)

        def work(conn: Connection) -> Message | None:
            added = store.insert_message(
                conn,
                message_id=message_id,
                conversation_id=conversation_id,
                role=role,
                content=content,
                metadata=metadata,
                now=self._clock.now(),
                owner=owner,
            )
            _deny_if_only_readable(conn, caller, conversation_id, added is not None)
            return added

        message = await self._db.write(work, after_commit=lambda added: notify(added) if added else None)
        if message is None:
            raise conversation_not_found(conversation_id)
        return message

    async def list_messages(
        self, caller: Principal, conversation_id: str, size: int, token: str
    ) -> Page[Message]:
        """Oldest first. Raises: InvalidArgumentError, NotFoundError."""
        raise_if(check_id("conversation_id", conversation_id) + check_page_size(size))
        limit = page_size(size, default=MESSAGES_PAGE[0], maximum=MESSAGES_PAGE[1])
        scope = f"messages:{conversation_id}"
        after = self._tokens.after(scope, token)
        owner = _reader(caller)

        def work(conn: Connection) -> list[Message] | None:
            if not store.conversation_exists(conn, conversation_id, owner=owner):
                return None
            return store.list_messages(conn, conversation_id, after, limit + 1)

        rows = await self._read(limit + 1, INLINE_MESSAGE_ROWS, work)
        if rows is None:
            raise conversation_not_found(conversation_id)
        # A page of long messages ends early, so that it fits a client's default 4 MiB limit.
        cut, size = 0, 0
        for message in rows[:limit]:
            size += _wire_size(message)
            if cut and size > MESSAGES_PAGE_MAX_BYTES:
                break
            cut += 1
        return self._tokens.page(rows, cut, scope, store.message_position)

    async def search(
        self, caller: Principal, query: str, size: int, *, all_users: bool = False
    ) -> list[SearchHit]:
        """Title and content substring search, best first.

        Raises: InvalidArgumentError, PermissionDeniedError.
        """
        violations = []
        if not query.strip():
            violations.append(FieldViolation("query", "required"))
        elif len(query) > QUERY_MAX_LENGTH:
            violations.append(FieldViolation("query", f"at most {QUERY_MAX_LENGTH} characters"))
        raise_if(violations + check_page_size(size))
        limit = page_size(size, default=SEARCH_PAGE[0], maximum=SEARCH_PAGE[1])
        owner = _lister(caller, all_users)

        def work(conn: Connection) -> list[SearchHit]:
            hits = []
            for conversation, matching, in_title in store.search(conn, query, limit, owner=owner):
                snippet_source, message_id = conversation.title, None
                if not in_title:
                    first = store.first_matching_message(conn, conversation.id, query)
                    if first is not None:
                        message_id, snippet_source = first
                score = matching + (TITLE_MATCH_SCORE if in_title else 0)
                hits.append(
                    SearchHit(
                        conversation=conversation,
                        score=float(score),
                        snippet=snippet(snippet_source, query),
                        message_id=message_id,
                        matching_messages=matching,
                    )
                )
            return hits

        return await self._db.read(work)

    async def stats(self, caller: Principal, *, all_users: bool = False) -> ConversationStats:
        """Totals and messages per UTC day for the last `STATS_DAYS` days, today last.

        Raises: PermissionDeniedError (`all_users` without the role for it).
        """
        owner = _lister(caller, all_users)
        midnight = self._clock.now().replace(hour=0, minute=0, second=0, microsecond=0)
        since = midnight - timedelta(days=STATS_DAYS - 1)
        days = [(since + timedelta(days=offset)).date() for offset in range(STATS_DAYS)]

        def work(conn: Connection) -> tuple[tuple[int, int], dict[str, int]]:
            return store.totals(conn, owner=owner), store.messages_per_day(conn, since, owner=owner)

        (conversation_total, message_total), per_day = await self._db.read(work)
        return ConversationStats(
            total_conversations=conversation_total,
            total_messages=message_total,
            average_messages_per_conversation=(
                message_total / conversation_total if conversation_total else 0.0
            ),
            messages_per_day=[DailyCount(day, per_day.get(day.isoformat(), 0)) for day in days],
        )

    async def export(
        self, caller: Principal, conversation_id: str, export_format: ExportFormat | None
    ) -> ExportDocument:
        """The whole conversation as one document.

        Raises: InvalidArgumentError, NotFoundError, ResourceExhaustedError (over
        EXPORT_MAX_BYTES).
        """
        violations = check_id("id", conversation_id)
        if export_format is None:
            violations.append(FieldViolation("format", "unknown format: use JSON or MARKDOWN"))
        raise_if(violations)
        owner = _reader(caller)

        too_large = ResourceExhaustedError(
            f"conversation {conversation_id!r} is too large to export in one response "
            f"(limit {EXPORT_MAX_BYTES} bytes): page through ListMessages instead",
            reason="EXPORT_TOO_LARGE",
        )

        # Everything, rendering included, on a reader thread: a large export must not hold
        # up the event loop. The stored size is checked before any message is loaded.
        def work(conn: Connection) -> ExportDocument | None:
            conversation = store.get_conversation(conn, conversation_id, owner=owner)
            if conversation is None:
                return None
            if store.stored_size(conn, conversation_id) > EXPORT_MAX_BYTES:
                raise too_large
            messages = list(store.all_messages(conn, conversation_id))
            if export_format is ExportFormat.MARKDOWN:
                content = render_markdown(conversation, messages).encode()
                name, media_type = f"conversation-{conversation.id}.md", "text/markdown; charset=utf-8"
            else:
                content = render_json(conversation, messages).encode()
                name, media_type = f"conversation-{conversation.id}.json", "application/json"
            if len(content) > EXPORT_MAX_BYTES:
                raise too_large
            return ExportDocument(name, media_type, content)

        document = await self._db.read(work)
        if document is None:
            raise conversation_not_found(conversation_id)
        return document

    async def watch(
        self, caller: Principal, conversation_id: str, after_message_id: str
    ) -> AsyncIterator[Message]:
        """Messages after `after_message_id` (or after now), in order, until cancelled.

        Every message after the starting point is delivered once, whether it arrives live or
        is read back from the database after a lag.

        Raises: InvalidArgumentError, NotFoundError (the conversation or message is missing, or
        the conversation was deleted while watching), UnavailableError (server shutting down).
        """
        violations = check_id("conversation_id", conversation_id)
        if after_message_id:
            violations += check_id("after_message_id", after_message_id)
        raise_if(violations)
        owner = _reader(caller)

        def start(conn: Connection) -> store.Position | None:
            if not store.conversation_exists(conn, conversation_id, owner=owner):
                raise conversation_not_found(conversation_id)
            if not after_message_id:
                return store.last_message_position(conn, conversation_id)
            position = store.find_message_position(conn, conversation_id, after_message_id)
            if position is None:
                raise NotFoundError(
                    f"message {after_message_id!r} not found in conversation {conversation_id!r}",
                    reason="MESSAGE_NOT_FOUND",
                )
            return position

        # Find the starting point first, then subscribe, then read from the database
        # everything after the starting point: a message committed in between is in that
        # read, one committed later is in the subscription too, and `last` drops the repeat.
        last = self._db.read_now(start)
        subscription = self._events.subscribe(conversation_id)
        try:
            catch_up = True
            while True:
                if subscription.deleted:
                    raise conversation_not_found(conversation_id)
                if subscription.closed:
                    raise UnavailableError("server is shutting down; resume from the last id")
                if catch_up or subscription.lagged:
                    subscription.lagged = False
                    subscription.drop_pending()
                    batch = await self._db.read(partial(_messages_after, conversation_id, last))
                    for message in batch:
                        last = store.message_position(message)
                        yield message
                    catch_up = len(batch) == WATCH_BATCH
                    continue
                while subscription.pending and not subscription.lagged:
                    message = subscription.take()
                    position = store.message_position(message)
                    if last is None or position > last:
                        last = position
                        yield message
                if not subscription.pending and not subscription.lagged:
                    await subscription.wait()
        finally:
            self._events.unsubscribe(subscription)

    async def _read(self, rows: int, most_inline: int, work: Callable[[Connection], T]) -> T:
        """Small reads run on the event loop (cheaper than a thread hop), larger ones on a
        reader thread so that they cannot stall other calls."""
        if rows <= most_inline:
            return self._db.read_now(work)
        return await self._db.read(work)


def _messages_after(conversation_id: str, after: store.Position | None, conn: Connection) -> list[Message]:
    return store.list_messages(conn, conversation_id, after, WATCH_BATCH)


def _wire_size(message: Message) -> int:
    """About what `message` takes in a response (content and metadata dominate)."""
    size = len(message.content.encode()) + 200
    if message.metadata:
        size += len(json.dumps(message.metadata, separators=(",", ":")).encode())
    return size


def _reader(caller: Principal) -> str | None:
    """The owner scope for reading one conversation: moderators and admins read any."""
    return None if caller.reads_everything else caller.user_id


def _writer(caller: Principal) -> str | None:
    """The owner scope for changing one conversation: admins change any."""
    return None if caller.is_admin else caller.user_id


def _lister(caller: Principal, all_users: bool) -> str | None:
    """The owner scope of a listing, search or statistics.

    Raises: PermissionDeniedError (`all_users` asked by a plain user).
    """
    if not all_users:
        return caller.user_id
    if not caller.reads_everything:
        raise PermissionDeniedError("all_users needs the moderator or admin role")
    return None


def _deny_if_only_readable(conn: Connection, caller: Principal, conversation_id: str, changed: bool) -> None:
    """A moderator changing a conversation they may read but not change is told so, rather
    than told it does not exist (they can see that it does)."""
    others = not changed and caller.reads_everything and not caller.is_admin
    if others and store.conversation_exists(conn, conversation_id, owner=None):
        raise PermissionDeniedError(
            f"conversation {conversation_id!r} belongs to another user; moderators may only read it"
        )


def _must_exist(conversation: Conversation | None, conversation_id: str) -> Conversation:
    if conversation is None:
        raise conversation_not_found(conversation_id)
    return conversation


def _check_title(title: str) -> list[FieldViolation]:
    if len(title) > TITLE_MAX_LENGTH:
        return [FieldViolation("title", f"at most {TITLE_MAX_LENGTH} characters")]
    return []


def _check_content(content: str) -> list[FieldViolation]:
    if not content.strip():
        return [FieldViolation("content", "required: must not be empty or only whitespace")]
    if len(content) > CONTENT_MAX_LENGTH:
        return [FieldViolation("content", f"at most {CONTENT_MAX_LENGTH} characters")]
    return []


def _check_metadata(metadata: JsonObject | None) -> list[FieldViolation]:
    if metadata is None:
        return []
    if _depth(metadata) > METADATA_MAX_DEPTH:
        return [FieldViolation("metadata", f"nested more than {METADATA_MAX_DEPTH} levels")]
    size = len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode())
    if size > METADATA_MAX_BYTES:
        return [FieldViolation("metadata", f"at most {METADATA_MAX_BYTES} bytes as JSON")]
    return []


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def snippet(text: str, query: str, length: int = SNIPPET_LENGTH) -> str:
    """About `length` characters of `text` around the first match of `query`, `…` where cut."""
    match = re.search(re.escape(query), text, re.IGNORECASE)
    start = 0
    if match is not None:
        start = max(0, min(match.start() - length // 3, len(text) - length))
    end = min(len(text), start + length)
    piece = " ".join(text[start:end].split())
    return ("…" if start > 0 else "") + piece + ("…" if end < len(text) else "")


def render_json(conversation: Conversation, messages: list[Message]) -> str:
    document = {
        "conversation": {
            "id": conversation.id,
            "title": conversation.title,
            "created_at": format_timestamp(conversation.created_at),
            "updated_at": format_timestamp(conversation.updated_at),
            "message_count": conversation.message_count,
        },
        "messages": [
            {
                "id": message.id,
                "role": message.role.value,
                "content": message.content,
                "timestamp": format_timestamp(message.timestamp),
                "metadata": message.metadata,
            }
            for message in messages
        ],
    }
    return json.dumps(document, ensure_ascii=False, indent=2) + "\n"


def render_markdown(conversation: Conversation, messages: list[Message]) -> str:
    lines = [
        f"# {conversation.title or 'Untitled conversation'}",
        "",
        f"- id: `{conversation.id}`",
        f"- created: {format_timestamp(conversation.created_at)}",
        f"- updated: {format_timestamp(conversation.updated_at)}",
        f"- messages: {conversation.message_count}",
    ]
    for message in messages:
        lines += [
            "",
            f"## {message.role.value.capitalize()} · {format_timestamp(message.timestamp)}",
            "",
            message.content,
        ]
        if message.metadata:
            metadata = json.dumps(message.metadata, ensure_ascii=False, indent=2)
            lines += ["", "```json", metadata, "```"]
    return "\n".join(lines) + "\n"
