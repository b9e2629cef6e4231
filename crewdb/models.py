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
