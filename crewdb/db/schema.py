"""The relational schema as SQLAlchemy Core tables: the one description migrations are checked against.

The five tables of the original design keep their columns and indexes. crewdb's additions
(documented in docs/schema.md, created by migration 0002):
  - conversations.message_count, kept in step by AddMessage, so listings need no COUNT(*);
  - idx_conversations_updated (updated_at, id): keyset pagination of ListConversations;
  - idx_messages_conversation_timestamp (conversation_id, timestamp, id): ListMessages and
    WatchMessages read a conversation's messages in order straight from this index.
And by migration 0006 (task queue): tasks.owner_id, attempts, max_attempts, run_after,
lease_expires_at, worker_id, progress, cancel_requested, dedup_key, updated_at, with
idx_tasks_ready (claim order), idx_tasks_owner_created (a user's listing) and
uq_tasks_owner_dedup (de-duplication keys, per owner).
And by migration 0004 (accounts):
  - conversations.owner_id -> users.id, with idx_conversations_owner_updated for the per-owner
    listing; NULL for conversations stored before accounts existed;
  - refresh_tokens.family_id (the session: every token rotated from one sign-in shares it) and
    refresh_tokens.used_at (when the token was spent; a second use is theft), with
    idx_refresh_tokens_family.
Timestamps are TEXT as `crewdb.clock.format_timestamp` writes them
(`2026-12-03T16:43:09.123456Z`); JSON columns hold JSON objects as TEXT.
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    text,
)

metadata = MetaData()

conversations = Table(
    "conversations",
    metadata,
    Column("id", Text, primary_key=True),
    Column("title", Text),
    Column("created_at", Text, nullable=False),
    Column("updated_at", Text, nullable=False),
    Column("message_count", Integer, nullable=False, server_default=text("0")),
    Column("owner_id", Text, ForeignKey("users.id", ondelete="CASCADE")),
    Index("idx_conversations_updated", "updated_at", "id"),
    Index("idx_conversations_owner_updated", "owner_id", "updated_at", "id"),
)

messages = Table(
    "messages",
    metadata,
    Column("id", Text, primary_key=True),
    Column(
        "conversation_id",
        Text,
        ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("role", Text, nullable=False),
    Column("content", Text, nullable=False),
    Column("timestamp", Text, nullable=False),
    Column("metadata", Text),
    Index("idx_messages_conversation", "conversation_id"),
    Index("idx_messages_conversation_timestamp", "conversation_id", "timestamp", "id"),
)

users = Table(
    "users",
    metadata,
    Column("id", Text, primary_key=True),
    Column("email", Text, nullable=False, unique=True),
    Column("username", Text, nullable=False, unique=True),
    Column("password_hash", Text, nullable=False),
    Column("role", Text, nullable=False, server_default=text("'user'")),
    Column("is_active", Integer, nullable=False, server_default=text("1")),
    Column("created_at", Text, nullable=False),
    Column("updated_at", Text, nullable=False),
    Column("last_login_at", Text),
    Index("idx_users_email", "email"),
    Index("idx_users_username", "username"),
    Index("idx_users_role", "role"),
    Index("idx_users_active", "is_active"),
)

refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    Column("id", Text, primary_key=True),
    Column("user_id", Text, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("token_hash", Text, nullable=False),
    Column("expires_at", Text, nullable=False),
    Column("created_at", Text, nullable=False),
    Column("revoked_at", Text),
    Column("family_id", Text),
    Column("used_at", Text),
    Index("idx_refresh_tokens_user", "user_id"),
    Index("idx_refresh_tokens_hash", "token_hash"),
    Index("idx_refresh_tokens_family", "family_id"),
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", Text, primary_key=True),
    Column("type", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("priority", Integer, server_default=text("0")),
    Column("data", Text, nullable=False),
    Column("result", Text),
    Column("error", Text),
    Column("created_at", Text, nullable=False),
    Column("started_at", Text),
    Column("completed_at", Text),
    Column("duration", Integer),
    Column("metadata", Text),
    Column("owner_id", Text, ForeignKey("users.id", ondelete="CASCADE")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("max_attempts", Integer, nullable=False, server_default=text("3")),
    Column("run_after", Text),
    Column("lease_expires_at", Text),
    Column("worker_id", Text),
    Column("progress", Float, nullable=False, server_default=text("0")),
    Column("cancel_requested", Integer, nullable=False, server_default=text("0")),
    Column("dedup_key", Text),
    Column("updated_at", Text),
    Index("idx_tasks_status", "status"),
    Index("idx_tasks_created", "created_at"),
    # In claim order (priority high to low, then oldest first), so a claim reads one entry.
    Index("idx_tasks_ready", "status", text("priority DESC"), "created_at", "id"),
    Index("idx_tasks_owner_created", "owner_id", "created_at", "id"),
    Index("uq_tasks_owner_dedup", "owner_id", "dedup_key", unique=True),
)

# The knowledge base (migration 0007). `documents` is the source of truth for what exists; the
# chunks' vectors live in ChromaDB, their text also here for keyword search (SQLite FTS5 table
# `document_chunks_fts` over `document_chunks.text`, kept in step by triggers; created by the
# migration, not described here, since it is a SQLite virtual table).
documents = Table(
    "documents",
    metadata,
    Column("owner_id", Text, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("id", Text, primary_key=True),
    Column("title", Text, nullable=False, server_default=text("''")),
    Column("metadata", Text, nullable=False, server_default=text("'{}'")),
    Column("text", Text, nullable=False),
    Column("chunk_count", Integer, nullable=False),
    Column("char_count", Integer, nullable=False),
    # Bumped on every replacement; the chunks in Chroma carry it, so chunks of an older version
    # (left by a replacement that failed half-way) are never returned.
    Column("revision", Integer, nullable=False),
    Column("embedding_model", Text, nullable=False),
    Column("created_at", Text, nullable=False),
    Column("updated_at", Text, nullable=False),
    Index("idx_documents_owner_updated", "owner_id", "updated_at", "id"),
)

document_chunks = Table(
    "document_chunks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("owner_id", Text, nullable=False),
    Column("document_id", Text, nullable=False),
    Column("chunk_index", Integer, nullable=False),
    Column("start_offset", Integer, nullable=False),
    Column("end_offset", Integer, nullable=False),
    Column("text", Text, nullable=False),
    ForeignKeyConstraint(
        ["owner_id", "document_id"], ["documents.owner_id", "documents.id"], ondelete="CASCADE"
    ),
    Index("uq_document_chunks_position", "owner_id", "document_id", "chunk_index", unique=True),
)
