"""Queries over conversations and messages; each takes a Connection inside the caller's transaction."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.engine import Connection

from crewdb.clock import format_timestamp, parse_timestamp
from crewdb.db.schema import conversations, messages
from crewdb.models import Conversation, JsonObject, Message, MessageRole

# A position in an ordered listing: (timestamp text, id), compared as a tuple.
Position = tuple[str, str]

_CONVERSATION_COLUMNS = (
    conversations.c.id,
    conversations.c.title,
    conversations.c.created_at,
    conversations.c.updated_at,
    conversations.c.message_count,
    conversations.c.owner_id,
)
_MESSAGE_COLUMNS = (
    messages.c.id,
    messages.c.conversation_id,
    messages.c.role,
    messages.c.content,
    messages.c.timestamp,
    messages.c.metadata,
)


_ROLES = {role.value: role for role in MessageRole}


def _conversation(row: Any) -> Conversation:  # a Row of _CONVERSATION_COLUMNS
    conversation_id, title, created_at, updated_at, message_count, owner_id = row[:6]
    return Conversation(
        id=conversation_id,
        title=title or "",
        created_at=parse_timestamp(created_at),
        updated_at=parse_timestamp(updated_at),
        message_count=message_count,
        owner_id=owner_id,
    )


def _message(row: Any) -> Message:  # a Row of _MESSAGE_COLUMNS
    message_id, conversation_id, role, content, stamp, metadata = row
    return Message(
        id=message_id,
        conversation_id=conversation_id,
        role=_ROLES[role],
        content=content,
        timestamp=parse_timestamp(stamp),
        metadata=json.loads(metadata) if metadata else None,
    )


def conversation_position(conversation: Conversation) -> Position:
    return format_timestamp(conversation.updated_at), conversation.id


def message_position(message: Message) -> Position:
    return format_timestamp(message.timestamp), message.id


# Every query on conversations takes `owner`: a user id limits it to that user's
# conversations, None (an explicit choice of moderators' reads and admins) to all of them.
# Another user's conversation then looks exactly like a missing one.
_OWNED = or_(bindparam("p_owner").is_(None), conversations.c.owner_id == bindparam("p_owner"))

# `updated_at` never goes backwards, even when the clock does (a restart with a clock behind
# the stored times): then it keeps its value, and a new message is stamped just after it.
_LATER_OF_NOW = case(
    (conversations.c.updated_at < bindparam("p_now"), bindparam("p_now")), else_=conversations.c.updated_at
)

# The statements behind the hot paths, built once: constructing a statement costs more than
# SQLite takes to run it. Parameters are bound per call; `p_` names keep them apart from
# column names in INSERT/UPDATE.
_GET_CONVERSATION = select(*_CONVERSATION_COLUMNS).where(conversations.c.id == bindparam("p_id"), _OWNED)
_CONVERSATION_EXISTS = select(literal(1)).where(conversations.c.id == bindparam("p_id"), _OWNED)
_ALL_CONVERSATIONS = (
    select(*_CONVERSATION_COLUMNS)
    .order_by(conversations.c.updated_at.desc(), conversations.c.id.desc())
    .limit(bindparam("p_limit"))
)
# A separate statement, not _OWNED, so that SQLite reads idx_conversations_owner_updated.
_OWN_CONVERSATIONS = _ALL_CONVERSATIONS.where(conversations.c.owner_id == bindparam("p_owner"))
_AFTER_CONVERSATION = tuple_(conversations.c.updated_at, conversations.c.id) < tuple_(
    bindparam("p_updated_at"), bindparam("p_id")
)
_UPDATE_TITLE = (
    update(conversations)
    .where(conversations.c.id == bindparam("p_id"), _OWNED)
    .values(title=bindparam("p_title"), updated_at=_LATER_OF_NOW)
    .returning(*_CONVERSATION_COLUMNS)
)
_DELETE_CONVERSATION = delete(conversations).where(conversations.c.id == bindparam("p_id"), _OWNED)
_BUMP_CONVERSATION = (
    update(conversations)
    .where(conversations.c.id == bindparam("p_id"), _OWNED)
    .values(updated_at=_LATER_OF_NOW, message_count=conversations.c.message_count + 1)
    .returning(conversations.c.updated_at)
)
_SET_UPDATED_AT = (
    update(conversations).where(conversations.c.id == bindparam("p_id")).values(updated_at=bindparam("p_now"))
)
_INSERT_MESSAGE = insert(messages)
_CONVERSATION_MESSAGES = (
    select(*_MESSAGE_COLUMNS)
    .where(messages.c.conversation_id == bindparam("p_conversation_id"))
    .order_by(messages.c.timestamp, messages.c.id)
)
_LIST_MESSAGES = _CONVERSATION_MESSAGES.limit(bindparam("p_limit"))
_ONE_MICROSECOND = timedelta(microseconds=1)
_LIST_MESSAGES_AFTER = _LIST_MESSAGES.where(
    tuple_(messages.c.timestamp, messages.c.id) > tuple_(bindparam("p_timestamp"), bindparam("p_id"))
)


def insert_conversation(
    conn: Connection, conversation_id: str, title: str, now: datetime, *, owner: str | None
) -> None:
    stamp = format_timestamp(now)
    conn.execute(
        insert(conversations).values(
            id=conversation_id,
            title=title,
            created_at=stamp,
            updated_at=stamp,
            message_count=0,
            owner_id=owner,
        )
    )


def get_conversation(conn: Connection, conversation_id: str, *, owner: str | None) -> Conversation | None:
    row = conn.execute(_GET_CONVERSATION, {"p_id": conversation_id, "p_owner": owner}).one_or_none()
    return _conversation(row) if row else None


def conversation_exists(conn: Connection, conversation_id: str, *, owner: str | None) -> bool:
    params = {"p_id": conversation_id, "p_owner": owner}
    return conn.execute(_CONVERSATION_EXISTS, params).first() is not None


def list_conversations(
    conn: Connection, after: Position | None, limit: int, *, owner: str | None
) -> list[Conversation]:
    """Most recently updated first; `after` is the position of the previous page's last row."""
    statement = _ALL_CONVERSATIONS if owner is None else _OWN_CONVERSATIONS
    params: dict[str, Any] = {"p_limit": limit, "p_owner": owner}
    if after is not None:
        statement = statement.where(_AFTER_CONVERSATION)
        params |= {"p_updated_at": after[0], "p_id": after[1]}
    return [_conversation(row) for row in conn.execute(statement, params).all()]


def update_title(
    conn: Connection, conversation_id: str, title: str, now: datetime, *, owner: str | None
) -> Conversation | None:
    params = {"p_id": conversation_id, "p_title": title, "p_now": format_timestamp(now), "p_owner": owner}
    row = conn.execute(_UPDATE_TITLE, params).one_or_none()
    return _conversation(row) if row else None


def delete_conversation(conn: Connection, conversation_id: str, *, owner: str | None) -> bool:
    """Deletes the conversation; its messages go by ON DELETE CASCADE."""
    result = conn.execute(_DELETE_CONVERSATION, {"p_id": conversation_id, "p_owner": owner})
    return result.rowcount > 0


def insert_message(
    conn: Connection,
    *,
    message_id: str,
    conversation_id: str,
    role: MessageRole,
    content: str,
    metadata: JsonObject | None,
    now: datetime,
    owner: str | None,
) -> Message | None:
    """Appends a message and bumps the conversation; None when the conversation is missing.

    The message's timestamp is `now`, or just after the conversation's `updated_at` when that
    is later (a restart with a clock that stepped back; `updated_at` is never before the last
    message), so that order by (timestamp, id) stays the order messages were added in, which
    pagination and watchers rely on.
    """
    stamp = format_timestamp(now)
    params = {"p_id": conversation_id, "p_now": stamp, "p_owner": owner}
    updated_at = conn.execute(_BUMP_CONVERSATION, params).scalar()
    if updated_at is None:
        return None
    if updated_at != stamp:  # the clock is behind what is stored
        now = parse_timestamp(updated_at) + _ONE_MICROSECOND
        stamp = format_timestamp(now)
        conn.execute(_SET_UPDATED_AT, {"p_id": conversation_id, "p_now": stamp})
    metadata_json = (
        json.dumps(metadata, ensure_ascii=False, separators=(",", ":")) if metadata is not None else None
    )
    conn.execute(
        _INSERT_MESSAGE,
        {
            "id": message_id,
            "conversation_id": conversation_id,
            "role": role.value,
            "content": content,
            "timestamp": stamp,
            "metadata": metadata_json,
        },
    )
    return Message(message_id, conversation_id, role, content, now, metadata)


def list_messages(
    conn: Connection, conversation_id: str, after: Position | None, limit: int | None
) -> list[Message]:
    """Oldest first; `after` is the position of the last message already seen; no limit if None."""
    if limit is None:
        if after is not None:
            raise ValueError("an unlimited listing starts at the beginning")
        rows = conn.execute(_CONVERSATION_MESSAGES, {"p_conversation_id": conversation_id})
    elif after is None:
        rows = conn.execute(_LIST_MESSAGES, {"p_conversation_id": conversation_id, "p_limit": limit})
    else:
        params = {
            "p_conversation_id": conversation_id,
            "p_limit": limit,
            "p_timestamp": after[0],
            "p_id": after[1],
        }
        rows = conn.execute(_LIST_MESSAGES_AFTER, params)
    return [_message(row) for row in rows.all()]


def find_message_position(conn: Connection, conversation_id: str, message_id: str) -> Position | None:
    row = conn.execute(
        select(messages.c.timestamp, messages.c.id).where(
            messages.c.id == message_id, messages.c.conversation_id == conversation_id
        )
    ).one_or_none()
    return (row.timestamp, row.id) if row else None


def last_message_position(conn: Connection, conversation_id: str) -> Position | None:
    row = conn.execute(
        select(messages.c.timestamp, messages.c.id)
        .where(messages.c.conversation_id == conversation_id)
        .order_by(messages.c.timestamp.desc(), messages.c.id.desc())
        .limit(1)
    ).one_or_none()
    return (row.timestamp, row.id) if row else None


def contains(column: ColumnElement[str], query: str) -> ColumnElement[bool]:
    """A case-insensitive substring match in which `%`, `_` and `\\` are literal."""
    escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.ilike(f"%{escaped}%", escape="\\")


def search(
    conn: Connection, query: str, limit: int, *, owner: str | None
) -> list[tuple[Conversation, int, bool]]:
    """Conversations whose title or messages contain `query`: title matches first, then by
    number of matching messages, then most recently updated.

    Returns (conversation, number of matching messages, whether the title matched).
    """
    hits = (
        select(messages.c.conversation_id, func.count().label("hits"))
        .where(contains(messages.c.content, query))
        .group_by(messages.c.conversation_id)
        .subquery()
    )
    in_title = contains(conversations.c.title, query)
    hit_count = func.coalesce(hits.c.hits, 0)
    title_flag = case((in_title, 1), else_=0)
    rows = conn.execute(
        select(
            *_CONVERSATION_COLUMNS,
            hit_count.label("hits"),
            title_flag.label("in_title"),
        )
        .select_from(conversations.outerjoin(hits, hits.c.conversation_id == conversations.c.id))
        .where(or_(hits.c.hits.is_not(None), in_title))
        .where(_owned_by(owner))
        .order_by(
            title_flag.desc(),
            hit_count.desc(),
            conversations.c.updated_at.desc(),
            conversations.c.id.desc(),
        )
        .limit(limit)
    )
    return [(_conversation(row), int(row.hits), bool(row.in_title)) for row in rows]


def first_matching_message(conn: Connection, conversation_id: str, query: str) -> tuple[str, str] | None:
    row = conn.execute(
        select(messages.c.id, messages.c.content)
        .where(
            and_(
                messages.c.conversation_id == conversation_id,
                contains(messages.c.content, query),
            )
        )
        .order_by(messages.c.timestamp, messages.c.id)
        .limit(1)
    ).one_or_none()
    return (row.id, row.content) if row else None


def _owned_by(owner: str | None) -> ColumnElement[bool]:
    return conversations.c.owner_id == owner if owner is not None else true()


def totals(conn: Connection, *, owner: str | None) -> tuple[int, int]:
    """(conversations, messages)."""
    row = conn.execute(
        select(func.count(), func.coalesce(func.sum(conversations.c.message_count), 0)).where(
            _owned_by(owner)
        )
    ).one()
    return int(row[0]), int(row[1])


def messages_per_day(conn: Connection, since: datetime, *, owner: str | None) -> dict[str, int]:
    """Message counts by UTC day (`YYYY-MM-DD`) from `since` on."""
    day = func.substr(messages.c.timestamp, 1, 10)
    statement = (
        select(day.label("day"), func.count().label("n"))
        .where(messages.c.timestamp >= format_timestamp(since))
        .group_by(day)
    )
    if owner is not None:
        statement = statement.join(conversations, conversations.c.id == messages.c.conversation_id).where(
            conversations.c.owner_id == owner
        )
    rows = conn.execute(statement)
    return {row.day: int(row.n) for row in rows}


def stored_size(conn: Connection, conversation_id: str) -> int:
    """Characters of content and metadata stored for a conversation: a lower bound of its
    size in bytes, read without loading a message."""
    total = func.coalesce(
        func.sum(func.length(messages.c.content) + func.coalesce(func.length(messages.c.metadata), 0)), 0
    )
    return int(conn.execute(select(total).where(messages.c.conversation_id == conversation_id)).scalar_one())


def all_messages(conn: Connection, conversation_id: str) -> Sequence[Message]:
    return list_messages(conn, conversation_id, None, None)
