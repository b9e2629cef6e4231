"""Queries over the task queue; each takes a Connection inside the caller's (write) transaction."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, insert, or_, select, tuple_, update
from sqlalchemy.engine import Connection

from crewdb.clock import format_timestamp, parse_timestamp
from crewdb.db.schema import tasks
from crewdb.models import JsonObject, Task, TaskStatus

Position = tuple[str, str]
# The error recorded when a worker's lease ran out (the start of it: attempts may follow).
LEASE_EXPIRED = "lease expired"

_COLUMNS = (
    tasks.c.id,
    tasks.c.type,
    tasks.c.status,
    tasks.c.priority,
    tasks.c.data,
    tasks.c.result,
    tasks.c.error,
    tasks.c.metadata,
    tasks.c.owner_id,
    tasks.c.created_at,
    tasks.c.started_at,
    tasks.c.completed_at,
    tasks.c.duration,
    tasks.c.attempts,
    tasks.c.max_attempts,
    tasks.c.run_after,
    tasks.c.lease_expires_at,
    tasks.c.worker_id,
    tasks.c.progress,
    tasks.c.cancel_requested,
    tasks.c.dedup_key,
)
_STATUSES = {status.value: status for status in TaskStatus}


def _json(text: str | None) -> JsonObject | None:
    return json.loads(text) if text else None


def _time(text: str | None) -> datetime | None:
    return parse_timestamp(text) if text else None


def _task(row: Any) -> Task:
    return Task(
        id=row.id,
        type=row.type,
        status=_STATUSES[row.status],
        priority=row.priority or 0,
        data=_json(row.data) or {},
        result=_json(row.result),
        error=row.error,
        metadata=_json(row.metadata),
        owner_id=row.owner_id,
        created_at=parse_timestamp(row.created_at),
        started_at=_time(row.started_at),
        completed_at=_time(row.completed_at),
        duration_ms=row.duration,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        run_after=_time(row.run_after),
        worker_id=row.worker_id,
        lease_expires_at=_time(row.lease_expires_at),
        progress=float(row.progress or 0),
        cancel_requested=bool(row.cancel_requested),
        dedup_key=row.dedup_key,
    )


def encode(value: JsonObject | None) -> str | None:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")) if value is not None else None


def task_position(task: Task) -> Position:
    return format_timestamp(task.created_at), task.id


def _owned(owner: str | None) -> Any:
    return tasks.c.owner_id == owner if owner is not None else tasks.c.id.is_not(None)


def insert_task(conn: Connection, values: dict[str, Any]) -> None:
    conn.execute(insert(tasks).values(**values))


def get_task(conn: Connection, task_id: str, *, owner: str | None) -> Task | None:
    row = conn.execute(select(*_COLUMNS).where(tasks.c.id == task_id, _owned(owner))).one_or_none()
    return _task(row) if row else None


def find_by_dedup_key(conn: Connection, owner: str, dedup_key: str) -> Task | None:
    row = conn.execute(
        select(*_COLUMNS).where(tasks.c.owner_id == owner, tasks.c.dedup_key == dedup_key)
    ).one_or_none()
    return _task(row) if row else None


def list_tasks(
    conn: Connection,
    *,
    owner: str | None,
    status: TaskStatus | None,
    task_type: str,
    after: Position | None,
    limit: int,
) -> list[Task]:
    """Newest first."""
    query = select(*_COLUMNS).where(_owned(owner)).order_by(tasks.c.created_at.desc(), tasks.c.id.desc())
    if status is not None:
        query = query.where(tasks.c.status == status.value)
    if task_type:
        query = query.where(tasks.c.type == task_type)
    if after is not None:
        query = query.where(tuple_(tasks.c.created_at, tasks.c.id) < after)
    return [_task(row) for row in conn.execute(query.limit(limit)).all()]


def queue_stats(conn: Connection, *, owner: str | None) -> tuple[dict[str, int], str | None]:
    counts = {
        row.status: int(row.n)
        for row in conn.execute(
            select(tasks.c.status, func.count().label("n")).where(_owned(owner)).group_by(tasks.c.status)
        )
    }
    oldest = conn.execute(
        select(func.min(tasks.c.created_at)).where(_owned(owner), tasks.c.status == TaskStatus.QUEUED.value)
    ).scalar()
    return counts, oldest


def has_expired_leases(conn: Connection, now: datetime) -> bool:
    query = select(tasks.c.id).where(
        tasks.c.status == TaskStatus.RUNNING.value, tasks.c.lease_expires_at < format_timestamp(now)
    )
    return conn.execute(query.limit(1)).first() is not None


def recover_expired_leases(conn: Connection, now: datetime) -> list[str]:
    """Running tasks whose lease ran out go back to the queue, or fail when their attempts are
    spent (cancelled, when cancellation was asked for). Returns the ids that changed."""
    stamp = format_timestamp(now)
    expired = conn.execute(
        select(
            tasks.c.id, tasks.c.attempts, tasks.c.max_attempts, tasks.c.cancel_requested, tasks.c.started_at
        ).where(tasks.c.status == TaskStatus.RUNNING.value, tasks.c.lease_expires_at < stamp)
    ).all()
    for row in expired:
        if row.cancel_requested:
            finish(conn, row.id, TaskStatus.CANCELLED, now, started_at=row.started_at, error=LEASE_EXPIRED)
        elif row.attempts >= row.max_attempts:
            finish(
                conn,
                row.id,
                TaskStatus.FAILED,
                now,
                started_at=row.started_at,
                error=f"{LEASE_EXPIRED}, no attempts left",
            )
        else:
            conn.execute(
                update(tasks)
                .where(tasks.c.id == row.id)
                .values(
                    status=TaskStatus.QUEUED.value,
                    worker_id=None,
                    lease_expires_at=None,
                    error=LEASE_EXPIRED,
                    updated_at=stamp,
                )
            )
    return [row.id for row in expired]


_READY = and_(
    tasks.c.status == TaskStatus.QUEUED.value,
    or_(tasks.c.run_after.is_(None), tasks.c.run_after <= bindparam("p_now")),
)


def _claim_statement(typed: bool) -> Any:
    candidate = select(tasks.c.id).where(_READY)
    if typed:
        candidate = candidate.where(tasks.c.type.in_(bindparam("p_types", expanding=True)))
    candidate = candidate.order_by(tasks.c.priority.desc(), tasks.c.created_at, tasks.c.id).limit(1)
    return (
        update(tasks)
        .where(tasks.c.id == candidate.scalar_subquery(), tasks.c.status == TaskStatus.QUEUED.value)
        .values(
            status=TaskStatus.RUNNING.value,
            worker_id=bindparam("p_worker"),
            attempts=tasks.c.attempts + 1,
            started_at=bindparam("p_now"),
            lease_expires_at=bindparam("p_lease_until"),
            progress=0,
            updated_at=bindparam("p_now"),
        )
        .returning(*_COLUMNS)
    )


# Built once: the claim is the queue's hot path (see crewdb/db/conversations.py on why).
_CLAIM_ANY = _claim_statement(typed=False)
_CLAIM_TYPED = _claim_statement(typed=True)


def claim(
    conn: Connection, *, worker_id: str, types: list[str], now: datetime, lease_until: datetime
) -> Task | None:
    """Hands the next ready task to `worker_id`: one UPDATE ... RETURNING, so two workers can
    never get the same task (on PostgreSQL the subquery would take FOR UPDATE SKIP LOCKED)."""
    params: dict[str, Any] = {
        "p_now": format_timestamp(now),
        "p_worker": worker_id,
        "p_lease_until": format_timestamp(lease_until),
    }
    if types:
        params["p_types"] = types
    row = conn.execute(_CLAIM_TYPED if types else _CLAIM_ANY, params).one_or_none()
    return _task(row) if row else None


def heartbeat(
    conn: Connection, task_id: str, *, worker_id: str, progress: float, lease_until: datetime, now: datetime
) -> Task | None:
    row = conn.execute(
        update(tasks)
        .where(
            tasks.c.id == task_id,
            tasks.c.status == TaskStatus.RUNNING.value,
            tasks.c.worker_id == worker_id,
            tasks.c.lease_expires_at >= format_timestamp(now),
        )
        .values(
            progress=progress,
            lease_expires_at=format_timestamp(lease_until),
            updated_at=format_timestamp(now),
        )
        .returning(*_COLUMNS)
    ).one_or_none()
    return _task(row) if row else None


def finish(
    conn: Connection,
    task_id: str,
    status: TaskStatus,
    now: datetime,
    *,
    started_at: str | None,
    result: JsonObject | None = None,
    error: str | None = None,
) -> None:
    """Marks a task finished; duration is from its last start."""
    duration = None
    if started_at:
        duration = max(0, int((now - parse_timestamp(started_at)).total_seconds() * 1000))
    values: dict[str, Any] = {
        "status": status.value,
        "completed_at": format_timestamp(now),
        "duration": duration,
        "lease_expires_at": None,
        "updated_at": format_timestamp(now),
    }
    if result is not None:
        values["result"] = encode(result)
    if error is not None:
        values["error"] = error
    conn.execute(update(tasks).where(tasks.c.id == task_id).values(**values))


def requeue(conn: Connection, task_id: str, run_after: datetime, error: str, now: datetime) -> None:
    conn.execute(
        update(tasks)
        .where(tasks.c.id == task_id)
        .values(
            status=TaskStatus.QUEUED.value,
            worker_id=None,
            lease_expires_at=None,
            run_after=format_timestamp(run_after),
            error=error,
            updated_at=format_timestamp(now),
        )
    )


def request_cancel(conn: Connection, task_id: str, now: datetime) -> None:
    conn.execute(
        update(tasks)
        .where(tasks.c.id == task_id)
        .values(cancel_requested=1, updated_at=format_timestamp(now))
    )


def purge(conn: Connection, statuses: list[TaskStatus], before: datetime) -> int:
    result = conn.execute(
        delete(tasks).where(
            tasks.c.status.in_([s.value for s in statuses]),
            tasks.c.completed_at < format_timestamp(before),
        )
    )
    return int(result.rowcount)
