"""Domain records passed between the layers: plain frozen dataclasses, no protobuf, no SQL."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Any, Generic, TypeVar

T = TypeVar("T")

JsonObject = dict[str, Any]


class MessageRole(StrEnum):
    """Who wrote a message; the value is what the database stores."""

    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"
    TOOL = "tool"


class ExportFormat(StrEnum):
    JSON = "json"
    MARKDOWN = "markdown"


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    title: str
    created_at: datetime
    updated_at: datetime
    message_count: int
    # None for conversations stored before accounts existed.
    owner_id: str | None = None


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    conversation_id: str
    role: MessageRole
    content: str
    timestamp: datetime
    metadata: JsonObject | None


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing; `next_page_token` is empty on the last page."""

    items: list[T]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class SearchHit:
    conversation: Conversation
    score: float
    snippet: str
    message_id: str | None
    matching_messages: int


@dataclass(frozen=True, slots=True)
class DailyCount:
    day: date
    count: int


@dataclass(frozen=True, slots=True)
class ConversationStats:
    total_conversations: int
    total_messages: int
    average_messages_per_conversation: float
    messages_per_day: list[DailyCount]


@dataclass(frozen=True, slots=True)
class ExportDocument:
    filename: str
    media_type: str
    content: bytes


class UserRole(StrEnum):
    """What an account may do; the value is what the database stores."""

    USER = "user"
    MODERATOR = "moderator"
    ADMIN = "admin"
    WORKER = "worker"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the signed-in account, its current role, and the session it signed in with."""

    user_id: str
    role: UserRole
    session_id: str

    @property
    def reads_everything(self) -> bool:
        return self.role in (UserRole.MODERATOR, UserRole.ADMIN)

    @property
    def is_admin(self) -> bool:
        return self.role is UserRole.ADMIN

    @property
    def runs_tasks(self) -> bool:
        return self.role in (UserRole.WORKER, UserRole.ADMIN)


@dataclass(frozen=True, slots=True)
class User:
    id: str
    email: str
    username: str
    role: UserRole
    active: bool
    created_at: datetime
    updated_at: datetime
    last_login_at: datetime | None


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime
    current: bool


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int
    user: User


@dataclass(frozen=True, slots=True)
class UserStats:
    total_users: int
    active_users: int
    users_by_role: dict[str, int]
    signups_last_7_days: int


class TaskStatus(StrEnum):
    """Where a task is in its life; the value is what the database stores."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


@dataclass(frozen=True, slots=True)
class Task:
    id: str
    type: str
    status: TaskStatus
    priority: int
    data: JsonObject
    result: JsonObject | None
    error: str | None
    metadata: JsonObject | None
    owner_id: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    duration_ms: int | None
    attempts: int
    max_attempts: int
    run_after: datetime | None
    worker_id: str | None
    lease_expires_at: datetime | None
    progress: float
    cancel_requested: bool
    dedup_key: str | None


@dataclass(frozen=True, slots=True)
class QueueStats:
    counts: dict[TaskStatus, int]
    oldest_queued_age_seconds: float


@dataclass(frozen=True, slots=True)
class Document:
    """A knowledge-base document; `text` is empty in listings."""

    id: str
    owner_id: str
    title: str
    metadata: JsonObject
    text: str
    chunk_count: int
    char_count: int
    revision: int
    embedding_model: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class NewDocument:
    """A document as a caller hands it in, before it is checked and chunked."""

    id: str
    text: str
    title: str
    metadata: JsonObject


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a document: `text == document.text[start:end]`, in characters (code points)."""

    index: int
    start: int
    end: int
    text: str


@dataclass(frozen=True, slots=True)
class AddedDocument:
    id: str
    chunk_count: int
    replaced: bool


class SearchMode(StrEnum):
    SEMANTIC = "semantic"
    KEYWORD = "keyword"
    HYBRID = "hybrid"


@dataclass(frozen=True, slots=True)
class ChunkHit:
    """A chunk found by a knowledge-base search; `score` is in [0, 1], higher is closer."""

    document_id: str
    chunk_index: int
    start: int
    end: int
    text: str
    score: float
    title: str
    metadata: JsonObject


@dataclass(frozen=True, slots=True)
class VectorStats:
    documents: int
    chunks: int
    embedding_model: str
    dimension: int
    collection: str
    distance: str
    chunk_size: int
    chunk_overlap: int
