"""Conversions between protobuf messages and domain records; protobuf types stop here."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from crewdb.errors import FieldViolation, InvalidArgumentError
from crewdb.models import (
    ChunkHit,
    Conversation,
    ConversationStats,
    Document,
    ExportDocument,
    ExportFormat,
    JsonObject,
    Message,
    MessageRole,
    QueueStats,
    SearchHit,
    SearchMode,
    Session,
    Task,
    TaskStatus,
    User,
    UserRole,
    UserStats,
)
from crewdb.v1 import conversation_service_pb2 as pb
from crewdb.v1 import task_service_pb2 as tasks_pb
from crewdb.v1 import user_service_pb2 as users_pb
from crewdb.v1 import vector_service_pb2 as vectors_pb

_ROLE_TO_PROTO = {
    MessageRole.USER: pb.MESSAGE_ROLE_USER,
    MessageRole.ASSISTANT: pb.MESSAGE_ROLE_ASSISTANT,
    MessageRole.SYSTEM: pb.MESSAGE_ROLE_SYSTEM,
    MessageRole.TOOL: pb.MESSAGE_ROLE_TOOL,
}
_ROLE_FROM_PROTO: dict[int, MessageRole] = {n: role for role, n in _ROLE_TO_PROTO.items()}
_EXPORT_FORMATS: dict[int, ExportFormat] = {
    pb.EXPORT_FORMAT_UNSPECIFIED: ExportFormat.JSON,
    pb.EXPORT_FORMAT_JSON: ExportFormat.JSON,
    pb.EXPORT_FORMAT_MARKDOWN: ExportFormat.MARKDOWN,
}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    # Timestamp.FromDatetime is several times slower, and this runs for every row returned.
    since_epoch = moment - _EPOCH
    return timestamp_pb2.Timestamp(seconds=since_epoch // _SECOND, nanos=since_epoch.microseconds * 1000)


def role_from_proto(number: int) -> MessageRole | None:
    """None for MESSAGE_ROLE_UNSPECIFIED and for numbers this server does not know."""
    return _ROLE_FROM_PROTO.get(number)


def export_format_from_proto(number: int) -> ExportFormat | None:
    return _EXPORT_FORMATS.get(number)


def struct_to_dict(struct: struct_pb2.Struct, field: str = "metadata") -> JsonObject:
    """A Struct as plain JSON; whole numbers come back as ints (Struct only has doubles)."""
    try:
        as_dict = json_format.MessageToDict(struct)
    except ValueError:  # NaN and infinities have no JSON form
        raise InvalidArgumentError.of(
            [FieldViolation(field, "numbers must be finite (no NaN or Infinity)")]
        ) from None
    return _whole_numbers(as_dict)  # type: ignore[no-any-return]


_MAX_EXACT_INT = 2**53


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= _MAX_EXACT_INT:
        return int(value)
    if isinstance(value, dict):
        return {key: _whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(item) for item in value]
    return value


def conversation(record: Conversation) -> pb.Conversation:
    return pb.Conversation(
        id=record.id,
        title=record.title,
        owner_id=record.owner_id or "",
        created_at=timestamp(record.created_at),
        updated_at=timestamp(record.updated_at),
        message_count=record.message_count,
    )


def message(record: Message) -> pb.Message:
    result = pb.Message(
        id=record.id,
        conversation_id=record.conversation_id,
        role=_ROLE_TO_PROTO[record.role],
        content=record.content,
        timestamp=timestamp(record.timestamp),
    )
    if record.metadata is not None:
        result.metadata.SetInParent()  # an empty object is still "set"
        result.metadata.update(record.metadata)
    return result


def search_result(hit: SearchHit) -> pb.SearchResult:
    return pb.SearchResult(
        conversation=conversation(hit.conversation),
        score=hit.score,
        snippet=hit.snippet,
        message_id=hit.message_id or "",
        matching_messages=hit.matching_messages,
    )


def stats(record: ConversationStats) -> pb.ConversationStats:
    return pb.ConversationStats(
        total_conversations=record.total_conversations,
        total_messages=record.total_messages,
        average_messages_per_conversation=record.average_messages_per_conversation,
        messages_per_day=[
            pb.DailyMessageCount(date=day.day.isoformat(), count=day.count) for day in record.messages_per_day
        ],
    )


def export(document: ExportDocument) -> pb.ExportConversationResponse:
    return pb.ExportConversationResponse(
        filename=document.filename, media_type=document.media_type, content=document.content
    )


_USER_ROLE_TO_PROTO = {
    UserRole.USER: users_pb.USER_ROLE_USER,
    UserRole.MODERATOR: users_pb.USER_ROLE_MODERATOR,
    UserRole.ADMIN: users_pb.USER_ROLE_ADMIN,
    UserRole.WORKER: users_pb.USER_ROLE_WORKER,
}
_USER_ROLE_FROM_PROTO: dict[int, UserRole] = {n: role for role, n in _USER_ROLE_TO_PROTO.items()}


def user_role_from_proto(number: int) -> UserRole | None:
    """None for USER_ROLE_UNSPECIFIED and unknown numbers."""
    return _USER_ROLE_FROM_PROTO.get(number)


def user_role_filter(number: int) -> UserRole | None:
    """A role to filter by: None for unset.

    Raises: InvalidArgumentError for a number that is no role.
    """
    role = _USER_ROLE_FROM_PROTO.get(number)
    if role is None and number != users_pb.USER_ROLE_UNSPECIFIED:
        raise InvalidArgumentError.of(
            [FieldViolation("role", "unknown role: use USER, MODERATOR, ADMIN or WORKER")]
        )
    return role


def user(record: User) -> users_pb.User:
    result = users_pb.User(
        id=record.id,
        email=record.email,
        username=record.username,
        role=_USER_ROLE_TO_PROTO[record.role],
        active=record.active,
        created_at=timestamp(record.created_at),
        updated_at=timestamp(record.updated_at),
    )
    if record.last_login_at is not None:
        result.last_login_at.CopyFrom(timestamp(record.last_login_at))
    return result


def session(record: Session) -> users_pb.Session:
    return users_pb.Session(
        id=record.id,
        created_at=timestamp(record.created_at),
        last_used_at=timestamp(record.last_used_at),
        expires_at=timestamp(record.expires_at),
        current=record.current,
    )


def user_stats(record: UserStats) -> users_pb.UserStats:
    return users_pb.UserStats(
        total_users=record.total_users,
        active_users=record.active_users,
        users_by_role=record.users_by_role,
        signups_last_7_days=record.signups_last_7_days,
    )


_TASK_STATUS_TO_PROTO = {
    TaskStatus.QUEUED: tasks_pb.TASK_STATUS_QUEUED,
    TaskStatus.RUNNING: tasks_pb.TASK_STATUS_RUNNING,
    TaskStatus.COMPLETED: tasks_pb.TASK_STATUS_COMPLETED,
    TaskStatus.FAILED: tasks_pb.TASK_STATUS_FAILED,
    TaskStatus.CANCELLED: tasks_pb.TASK_STATUS_CANCELLED,
}
_TASK_STATUS_FROM_PROTO: dict[int, TaskStatus] = {n: status for status, n in _TASK_STATUS_TO_PROTO.items()}


def task_status_filter(number: int, field: str = "status") -> TaskStatus | None:
    """None for unset. Raises: InvalidArgumentError for a number that is no status."""
    status = _TASK_STATUS_FROM_PROTO.get(number)
    if status is None and number != tasks_pb.TASK_STATUS_UNSPECIFIED:
        raise InvalidArgumentError.of([FieldViolation(field, "unknown task status")])
    return status


def task_statuses(numbers: Iterable[int], field: str = "statuses") -> list[TaskStatus]:
    """Raises: InvalidArgumentError for an unset or unknown status."""
    statuses = [_TASK_STATUS_FROM_PROTO.get(number) for number in numbers]
    if any(status is None for status in statuses):
        raise InvalidArgumentError.of([FieldViolation(field, "each a known task status")])
    return [status for status in statuses if status is not None]


# Timestamps crewdb accepts: what google.protobuf.Timestamp allows (years 1 to 9999).
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799
# Durations crewdb accepts: 0 to 100 years.
_MAX_DURATION_SECONDS = 100 * 366 * 24 * 3600


def optional_time(message: Any, name: str) -> datetime | None:
    """A Timestamp field as a datetime, None when unset; a malformed one (nanos outside
    0..999,999,999, a year outside 1..9999) raises InvalidArgumentError naming the field."""
    if not message.HasField(name):
        return None
    value: timestamp_pb2.Timestamp = getattr(message, name)
    if not (_MIN_SECONDS <= value.seconds <= _MAX_SECONDS and 0 <= value.nanos < 1_000_000_000):
        raise InvalidArgumentError.of([FieldViolation(name, "not a valid timestamp (years 1 to 9999)")])
    return value.ToDatetime(tzinfo=UTC)


def optional_duration(message: Any, name: str) -> timedelta | None:
    """A Duration field as a timedelta, None when unset; a negative, malformed or longer than
    100 years one raises InvalidArgumentError naming the field."""
    if not message.HasField(name):
        return None
    value: duration_pb2.Duration = getattr(message, name)
    if not (0 <= value.seconds <= _MAX_DURATION_SECONDS and 0 <= value.nanos < 1_000_000_000):
        raise InvalidArgumentError.of([FieldViolation(name, "must be from 0 to 100 years")])
    return timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)


def optional_struct(message: Any, name: str) -> JsonObject | None:
    """The Struct field `name` of `message` as JSON, or None when unset."""
    return struct_to_dict(getattr(message, name), name) if message.HasField(name) else None


def task(record: Task) -> tasks_pb.Task:
    result = tasks_pb.Task(
        id=record.id,
        type=record.type,
        status=_TASK_STATUS_TO_PROTO[record.status],
        priority=record.priority,
        error=record.error or "",
        owner_id=record.owner_id or "",
        created_at=timestamp(record.created_at),
        duration_ms=record.duration_ms or 0,
        attempts=record.attempts,
        max_attempts=record.max_attempts,
        worker_id=record.worker_id or "",
        progress=record.progress,
        cancel_requested=record.cancel_requested,
        dedup_key=record.dedup_key or "",
    )
    result.data.SetInParent()
    result.data.update(record.data)
    for name in ("result", "metadata"):
        value = getattr(record, name)
        if value is not None:
            getattr(result, name).SetInParent()
            getattr(result, name).update(value)
    for name in ("started_at", "completed_at", "run_after", "lease_expires_at"):
        moment = getattr(record, name)
        if moment is not None:
            getattr(result, name).CopyFrom(timestamp(moment))
    return result


def queue_stats(record: QueueStats) -> tasks_pb.QueueStats:
    return tasks_pb.QueueStats(
        queued=record.counts[TaskStatus.QUEUED],
        running=record.counts[TaskStatus.RUNNING],
        completed=record.counts[TaskStatus.COMPLETED],
        failed=record.counts[TaskStatus.FAILED],
        cancelled=record.counts[TaskStatus.CANCELLED],
        oldest_queued_age_seconds=record.oldest_queued_age_seconds,
    )


_SEARCH_MODES: dict[int, SearchMode] = {
    vectors_pb.SEARCH_MODE_UNSPECIFIED: SearchMode.SEMANTIC,
    vectors_pb.SEARCH_MODE_SEMANTIC: SearchMode.SEMANTIC,
    vectors_pb.SEARCH_MODE_KEYWORD: SearchMode.KEYWORD,
    vectors_pb.SEARCH_MODE_HYBRID: SearchMode.HYBRID,
}


def bounded_batch(requested: int, *, default: int, maximum: int, field: str = "batch_size") -> int:
    """0 means `default`, above `maximum` is clamped; negative raises InvalidArgumentError."""
    if requested < 0:
        raise InvalidArgumentError.of([FieldViolation(field, "must not be negative")])
    return min(requested or default, maximum)


def search_mode(number: int) -> SearchMode:
    """Raises InvalidArgumentError for a mode this server does not know."""
    mode = _SEARCH_MODES.get(number)
    if mode is None:
        raise InvalidArgumentError.of([FieldViolation("mode", f"unknown search mode {number}")])
    return mode


def _struct(value: JsonObject) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def chunk_hit(hit: ChunkHit) -> vectors_pb.ChunkResult:
    return vectors_pb.ChunkResult(
        document_id=hit.document_id,
        chunk_id=f"{hit.document_id}#{hit.chunk_index}",
        text=hit.text,
        score=hit.score,
        metadata=_struct(hit.metadata),
        chunk_index=hit.chunk_index,
        start=hit.start,
        end=hit.end,
        title=hit.title,
    )


def document(record: Document) -> vectors_pb.Document:
    return vectors_pb.Document(
        id=record.id,
        title=record.title,
        metadata=_struct(record.metadata),
        text=record.text,
        chunk_count=record.chunk_count,
        char_count=record.char_count,
        embedding_model=record.embedding_model,
        created_at=timestamp(record.created_at),
        updated_at=timestamp(record.updated_at),
    )
