"""Task queue use cases: validation, legal transitions, leases and retries, and events for watchers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timedelta
from functools import partial
from typing import TypeVar

from crewdb.clock import Clock, format_timestamp, parse_timestamp
from crewdb.db import tasks as store
from crewdb.db.engine import Connection, Database
from crewdb.errors import (
    CrewdbError,
    FailedPreconditionError,
    FieldViolation,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from crewdb.models import JsonObject, Page, Principal, QueueStats, Task, TaskStatus
from crewdb.services.events import on_this_loop
from crewdb.services.pagination import PageTokens, check_page_size, page_size
from crewdb.services.validation import check_id, raise_if

T = TypeVar("T")
log = logging.getLogger(__name__)
TYPE = re.compile(r"[A-Za-z0-9._:/-]{1,100}")
PRIORITY_RANGE = (-1000, 1000)
ATTEMPTS_RANGE = (1, 20)
DEFAULT_ATTEMPTS = 3
LEASE_RANGE = (1, 3600)
DEFAULT_LEASE = 30
MAX_WAIT_SECONDS = 30
DATA_MAX_BYTES = 64 * 1024
METADATA_MAX_BYTES = 16 * 1024
ERROR_MAX_LENGTH = 4000
DEDUP_MAX_LENGTH = 200
WORKER_MAX_LENGTH = 100
TASKS_PAGE = (50, 200)
# Retry backoff: 2, 4, 8 ... seconds after each failed attempt, at most this.
MAX_BACKOFF_SECONDS = 300


def task_not_found(task_id: str) -> NotFoundError:
    return NotFoundError(f"task {task_id!r} not found", reason="TASK_NOT_FOUND")


class TaskEvents:
    """Wakes watchers of a task and claimers waiting for work; event-loop thread only."""

    def __init__(self) -> None:
        self._watchers: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._work = asyncio.Event()
        self.closed = False

    def close(self) -> None:
        """Server shutdown: wakes every watcher and waiting claimer so that each ends now instead
        of holding the drain for the whole grace period; later watches end at once too."""
        self.closed = True
        for watchers in self._watchers.values():
            for event in watchers:
                event.set()
        self._work.set()

    def changed(self, task_ids: list[str], work_ready: bool) -> None:
        for task_id in task_ids:
            for event in self._watchers.get(task_id, ()):
                event.set()
        if work_ready:
            self._work.set()
            self._work = asyncio.Event()  # waiters hold the old one, now set

    def work_event(self) -> asyncio.Event:
        return self._work

    @contextlib.contextmanager
    def watch(self, task_id: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._watchers[task_id].add(event)
        try:
            yield event
        finally:
            self._watchers[task_id].discard(event)
            if not self._watchers[task_id]:
                del self._watchers[task_id]


class TaskService:
    """The task queue."""

    def __init__(self, db: Database, events: TaskEvents, page_tokens: PageTokens, clock: Clock) -> None:
        self._db = db
        self._events = events
        self._tokens = page_tokens
        self._clock = clock

    # --- owners ----------------------------------------------------------------------------

    async def create(
        self,
        caller: Principal,
        *,
        task_type: str,
        priority: int,
        data: JsonObject | None,
        metadata: JsonObject | None,
        run_after: datetime | None,
        dedup_key: str,
        max_attempts: int,
    ) -> Task:
        """Raises: InvalidArgumentError."""
        violations = []
        if not TYPE.fullmatch(task_type):
            violations.append(FieldViolation("type", "1 to 100 characters: letters, digits, . _ - : /"))
        if not PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]:
            violations.append(FieldViolation("priority", "from -1000 to 1000"))
        if data is None:
            violations.append(FieldViolation("data", "required (may be an empty object)"))
        violations += _size("data", data, DATA_MAX_BYTES) + _size("metadata", metadata, METADATA_MAX_BYTES)
        if len(dedup_key) > DEDUP_MAX_LENGTH:
            violations.append(FieldViolation("dedup_key", f"at most {DEDUP_MAX_LENGTH} characters"))
        if max_attempts != 0 and not ATTEMPTS_RANGE[0] <= max_attempts <= ATTEMPTS_RANGE[1]:
            violations.append(FieldViolation("max_attempts", "from 1 to 20, or 0 for 3"))
        raise_if(violations)
        task_id = str(uuid.uuid4())

        def work(conn: Connection) -> Task:
            if dedup_key:
                existing = store.find_by_dedup_key(conn, caller.user_id, dedup_key)
                if existing is not None:
                    return existing
            stamp = format_timestamp(self._clock.now())
            store.insert_task(
                conn,
                {
                    "id": task_id,
                    "type": task_type,
                    "status": TaskStatus.QUEUED.value,
                    "priority": priority,
                    "data": store.encode(data or {}),
                    "metadata": store.encode(metadata),
                    "owner_id": caller.user_id,
                    "created_at": stamp,
                    "updated_at": stamp,
                    "attempts": 0,
                    "max_attempts": max_attempts or DEFAULT_ATTEMPTS,
                    "run_after": format_timestamp(run_after) if run_after else None,
                    "dedup_key": dedup_key or None,
                },
            )
            return _reread(conn, task_id)

        return await self._db.write(work, after_commit=self._announce(lambda _: [task_id], lambda _: True))

    async def get(self, caller: Principal, task_id: str) -> Task:
        """Raises: InvalidArgumentError, NotFoundError."""
        raise_if(check_id("id", task_id))
        found = self._db.read_now(lambda conn: store.get_task(conn, task_id, owner=_scope(caller)))
        if found is None:
            raise task_not_found(task_id)
        return found

    async def list_tasks(
        self, caller: Principal, *, status: TaskStatus | None, task_type: str, size: int, token: str
    ) -> Page[Task]:
        """Newest first. Raises: InvalidArgumentError."""
        raise_if(check_page_size(size))
        limit = page_size(size, default=TASKS_PAGE[0], maximum=TASKS_PAGE[1])
        owner = _scope(caller)
        scope = f"tasks:{owner or '*'}:{status}:{task_type}"
        after = self._tokens.after(scope, token)
        rows = await self._db.read(
            lambda conn: store.list_tasks(
                conn, owner=owner, status=status, task_type=task_type, after=after, limit=limit + 1
            )
        )
        return self._tokens.page(rows, limit, scope, store.task_position)

    async def stats(self, caller: Principal) -> QueueStats:
        counts, oldest = await self._db.read(lambda conn: store.queue_stats(conn, owner=_scope(caller)))
        age = (self._clock.now() - parse_timestamp(oldest)).total_seconds() if oldest else 0.0
        return QueueStats({status: counts.get(status.value, 0) for status in TaskStatus}, max(0.0, age))

    async def cancel(self, caller: Principal, task_id: str) -> Task:
        """A queued task is cancelled at once, a running one asked to stop.

        Raises: InvalidArgumentError, NotFoundError, FailedPreconditionError (INVALID_TRANSITION).
        """
        raise_if(check_id("id", task_id))
        owner = None if caller.is_admin else caller.user_id

        def work(conn: Connection) -> Task:
            task = store.get_task(conn, task_id, owner=owner)
            if task is None:
                if caller.runs_tasks and store.get_task(conn, task_id, owner=None) is not None:
                    raise PermissionDeniedError(f"task {task_id!r} belongs to another account")
                raise task_not_found(task_id)
            now = self._clock.now()
            if task.status is TaskStatus.QUEUED:
                store.finish(conn, task_id, TaskStatus.CANCELLED, now, started_at=None)
            elif task.status is TaskStatus.RUNNING:
                store.request_cancel(conn, task_id, now)
            else:
                raise _invalid_transition(task, "cancel")
            return _reread(conn, task_id)

        return await self._db.write(work, after_commit=self._announce(lambda _: [task_id]))

    async def watch(self, caller: Principal, task_id: str) -> AsyncIterator[Task]:
        """The task now, then after every change, until it finishes.

        Raises: InvalidArgumentError, NotFoundError, UnavailableError (server shutting down).
        """
        task = await self.get(caller, task_id)
        with self._events.watch(task_id) as changed:
            last = None
            while True:
                if task != last:
                    yield task
                    last = task
                if task.status.finished:
                    return
                if self._events.closed:
                    raise UnavailableError("server is shutting down; watch the task again")
                await changed.wait()
                changed.clear()
                task = await self.get(caller, task_id)

    # --- workers ---------------------------------------------------------------------------

    async def claim(
        self, worker_id: str, types: list[str], lease_seconds: int, wait_seconds: int
    ) -> Task | None:
        """The next ready task, leased to `worker_id`; None when none is ready in time.

        Raises: InvalidArgumentError.
        """
        violations = _worker(worker_id) + _lease(lease_seconds)
        violations += [FieldViolation("types", "each a task type") for t in types if not TYPE.fullmatch(t)][
            :1
        ]
        if not 0 <= wait_seconds <= MAX_WAIT_SECONDS:
            violations.append(FieldViolation("wait_seconds", f"from 0 to {MAX_WAIT_SECONDS}"))
        raise_if(violations)
        lease = timedelta(seconds=lease_seconds or DEFAULT_LEASE)
        deadline = asyncio.get_running_loop().time() + wait_seconds
        while True:
            ready = self._events.work_event()

            def work(conn: Connection) -> tuple[Task | None, list[str]]:
                now = self._clock.now()
                recovered = store.recover_expired_leases(conn, now)
                claimed = store.claim(
                    conn, worker_id=worker_id, types=types, now=now, lease_until=now + lease
                )
                return claimed, recovered + ([claimed.id] if claimed else [])

            claimed, _ = await self._db.write(
                work,
                after_commit=self._announce(
                    lambda outcome: outcome[1], lambda outcome: outcome[0] is None and bool(outcome[1])
                ),
            )
            if claimed is not None:
                return claimed
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0 or self._events.closed:  # shutting down: answer "no task" now
                return None
            # Wake on new work, or in a second at most (a delayed task or a lease may come due).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 1.0)):
                    await ready.wait()

    async def heartbeat(self, worker_id: str, task_id: str, progress: float, lease_seconds: int) -> Task:
        """Raises: InvalidArgumentError, NotFoundError, FailedPreconditionError (LEASE_LOST)."""
        violations = check_id("id", task_id) + _worker(worker_id) + _lease(lease_seconds)
        if not 0 <= progress <= 1:
            violations.append(FieldViolation("progress", "from 0 to 1"))
        raise_if(violations)
        lease = timedelta(seconds=lease_seconds or DEFAULT_LEASE)

        def work(conn: Connection) -> Task:
            now = self._clock.now()
            beaten = store.heartbeat(
                conn, task_id, worker_id=worker_id, progress=progress, lease_until=now + lease, now=now
            )
            if beaten is None:
                raise _lease_problem(store.get_task(conn, task_id, owner=None), task_id)
            return beaten

        return await self._db.write(work, after_commit=self._announce(lambda _: [task_id]))

    async def complete(self, worker_id: str, task_id: str, result: JsonObject | None) -> Task:
        """Raises: InvalidArgumentError, NotFoundError, FailedPreconditionError."""
        raise_if(check_id("id", task_id) + _worker(worker_id) + _size("result", result, DATA_MAX_BYTES))

        def work(conn: Connection) -> Task:
            now = self._clock.now()
            task = self._held(conn, task_id, worker_id, now)
            started = format_timestamp(task.started_at) if task.started_at else None
            store.finish(conn, task_id, TaskStatus.COMPLETED, now, started_at=started, result=result or {})
            return _reread(conn, task_id)

        return await self._db.write(work, after_commit=self._announce(lambda _: [task_id]))

    async def fail(self, worker_id: str, task_id: str, error: str, retryable: bool) -> Task:
        """Retries with backoff while attempts are left and the failure is retryable.

        Raises: InvalidArgumentError, NotFoundError, FailedPreconditionError.
        """
        violations = check_id("id", task_id) + _worker(worker_id)
        if not error.strip():
            violations.append(FieldViolation("error", "required"))
        elif len(error) > ERROR_MAX_LENGTH:
            violations.append(FieldViolation("error", f"at most {ERROR_MAX_LENGTH} characters"))
        raise_if(violations)

        def work(conn: Connection) -> tuple[Task, bool]:
            now = self._clock.now()
            task = self._held(conn, task_id, worker_id, now)
            started = format_timestamp(task.started_at) if task.started_at else None
            if task.cancel_requested:
                store.finish(conn, task_id, TaskStatus.CANCELLED, now, started_at=started, error=error)
                return _reread(conn, task_id), False
            if retryable and task.attempts < task.max_attempts:
                backoff = min(MAX_BACKOFF_SECONDS, 2**task.attempts)
                store.requeue(conn, task_id, now + timedelta(seconds=backoff), error, now)
                return _reread(conn, task_id), True
            store.finish(conn, task_id, TaskStatus.FAILED, now, started_at=started, error=error)
            return _reread(conn, task_id), False

        task, _ = await self._db.write(
            work, after_commit=self._announce(lambda _: [task_id], lambda outcome: outcome[1])
        )
        return task

    async def sweep(self, interval: float = 1.0) -> None:
        """Every `interval` seconds, returns expired leases to the queue (or fails or cancels
        them), so that a dead worker's task moves on without waiting for the next claim."""
        while True:
            await asyncio.sleep(interval)
            try:
                if not self._db.read_now(partial(_has_expired_leases, self._clock.now())):
                    continue
                await self._db.write(
                    lambda conn: store.recover_expired_leases(conn, self._clock.now()),
                    after_commit=self._announce(lambda ids: ids, bool),
                )
            except CrewdbError as error:  # the database is away; the next round tries again
                log.warning("lease sweep failed: %s", error.message)

    # --- admins ----------------------------------------------------------------------------

    async def purge(self, statuses: list[TaskStatus], older_than: timedelta | None) -> int:
        """Raises: InvalidArgumentError (unfinished statuses, no or negative `older_than`)."""
        violations = []
        if any(not status.finished for status in statuses):
            violations.append(
                FieldViolation("statuses", "only COMPLETED, FAILED and CANCELLED tasks are purged")
            )
        if older_than is None or older_than < timedelta(0):
            violations.append(FieldViolation("older_than", "required, 0 or more"))
        raise_if(violations)
        chosen = statuses or [TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED]
        before = self._clock.now() - (older_than or timedelta(0))
        return await self._db.write(lambda conn: store.purge(conn, chosen, before))

    # --- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _held(conn: Connection, task_id: str, worker_id: str, now: datetime) -> Task:
        """The task (read once) when `worker_id` holds its lease now; the reason why not otherwise."""
        task = store.get_task(conn, task_id, owner=None)
        if task is None:
            raise task_not_found(task_id)
        lease = task.lease_expires_at
        if (
            task.status is not TaskStatus.RUNNING
            or task.worker_id != worker_id
            or lease is None
            or lease < now
        ):
            raise _lease_problem(task, task_id)
        return task

    def _announce(
        self, ids: Callable[[T], list[str]], work_ready: Callable[[T], bool] = lambda _: False
    ) -> Callable[[T], None]:
        """An after-commit callback (writer thread) that tells this loop's watchers, and
        claimers waiting for work, what changed."""
        changed = on_this_loop(self._events.changed)
        return lambda outcome: changed(ids(outcome), work_ready(outcome))


def _lease_problem(task: Task | None, task_id: str) -> Exception:
    """Why a worker may not change a task it names (missing, finished, or not its lease)."""
    if task is None:
        return task_not_found(task_id)
    lease_ran_out = task.status is TaskStatus.QUEUED or (task.error or "").startswith(store.LEASE_EXPIRED)
    if task.status is not TaskStatus.RUNNING and not lease_ran_out:
        return _invalid_transition(task, "change")
    return FailedPreconditionError(
        f"task {task_id!r} is not leased to this worker (the lease expired or another worker holds it)",
        reason="LEASE_LOST",
    )


def _has_expired_leases(now: datetime, conn: Connection) -> bool:
    return store.has_expired_leases(conn, now)


def _reread(conn: Connection, task_id: str) -> Task:
    found = store.get_task(conn, task_id, owner=None)
    if found is None:
        raise task_not_found(task_id)
    return found


def _invalid_transition(task: Task, action: str) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"task {task.id!r} is {task.status.value}: cannot {action} it", reason="INVALID_TRANSITION"
    )


def _scope(caller: Principal) -> str | None:
    """Workers and admins see every task; others their own."""
    return None if caller.runs_tasks else caller.user_id


def _size(field: str, value: JsonObject | None, limit: int) -> list[FieldViolation]:
    if value is None:
        return []
    if len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()) > limit:
        return [FieldViolation(field, f"at most {limit} bytes as JSON")]
    return []


def _worker(worker_id: str) -> list[FieldViolation]:
    if not worker_id or len(worker_id) > WORKER_MAX_LENGTH:
        return [FieldViolation("worker_id", f"required, at most {WORKER_MAX_LENGTH} characters")]
    return []


def _lease(seconds: int) -> list[FieldViolation]:
    if seconds != 0 and not LEASE_RANGE[0] <= seconds <= LEASE_RANGE[1]:
        return [FieldViolation("lease_seconds", "from 1 to 3600, or 0 for 30")]
    return []
