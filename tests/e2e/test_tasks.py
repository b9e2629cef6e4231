"""TaskService end to end: queueing, claiming, leases, retries, cancel, watch, access and restart."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from crewdb.client import Client
from crewdb.config import Settings
from crewdb.models import UserRole
from crewdb.v1 import task_service_pb2 as pb
from crewdb.v1 import user_service_pb2
from crewdb.v1.task_service_pb2_grpc import TaskServiceStub
from tests.conftest import PASSWORD, TEST_SECRET, RunningServer, sign_in, start_server
from tests.rpc_errors import RpcFailure, failure

TIMEOUT = 5.0
# A WatchTask stream the server never ends still ends here, so a bug cannot hang the suite.
STREAM_DEADLINE = 20.0
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED

QUEUED = pb.TASK_STATUS_QUEUED
RUNNING = pb.TASK_STATUS_RUNNING
COMPLETED = pb.TASK_STATUS_COMPLETED
FAILED = pb.TASK_STATUS_FAILED
CANCELLED = pb.TASK_STATUS_CANCELLED

DATA_LIMIT = 64 * 1024
METADATA_LIMIT = 16 * 1024


# --- helpers -----------------------------------------------------------------------------------


def tasks_of(client: Client) -> TaskServiceStub:
    return TaskServiceStub(client.channel)


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def stamp(moment: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(moment)
    return message


def when(message: timestamp_pb2.Timestamp) -> datetime:
    return message.ToDatetime(tzinfo=UTC)


def now() -> datetime:
    return datetime.now(UTC)


def create(
    stub: TaskServiceStub,
    task_type: str = "email.send",
    *,
    data: dict[str, Any] | None = None,
    **fields: Any,
) -> pb.Task:
    request = pb.CreateTaskRequest(type=task_type, data=struct(data or {}), **fields)
    return stub.CreateTask(request, timeout=TIMEOUT)


def get(stub: TaskServiceStub, task_id: str) -> pb.Task:
    return stub.GetTask(pb.GetTaskRequest(id=task_id), timeout=TIMEOUT)


def claim(stub: TaskServiceStub, worker_id: str = "w1", **fields: Any) -> pb.Task | None:
    """The claimed task, or None when the server answered with no task."""
    reply = stub.ClaimTask(pb.ClaimTaskRequest(worker_id=worker_id, **fields), timeout=TIMEOUT + 30)
    return reply.task if reply.HasField("task") else None


def claimed(stub: TaskServiceStub, worker_id: str = "w1", **fields: Any) -> pb.Task:
    task = claim(stub, worker_id, **fields)
    assert task is not None, "no task was ready"
    return task


def heartbeat(
    stub: TaskServiceStub, task_id: str, worker_id: str = "w1", **fields: Any
) -> pb.HeartbeatTaskResponse:
    request = pb.HeartbeatTaskRequest(id=task_id, worker_id=worker_id, **fields)
    return stub.HeartbeatTask(request, timeout=TIMEOUT)


def complete(
    stub: TaskServiceStub, task_id: str, worker_id: str = "w1", result: dict[str, Any] | None = None
) -> pb.Task:
    request = pb.CompleteTaskRequest(id=task_id, worker_id=worker_id)
    if result is not None:
        request.result.CopyFrom(struct(result))
    return stub.CompleteTask(request, timeout=TIMEOUT)


def fail(
    stub: TaskServiceStub, task_id: str, worker_id: str = "w1", error: str = "boom", *, retryable: bool
) -> pb.Task:
    request = pb.FailTaskRequest(id=task_id, worker_id=worker_id, error=error, retryable=retryable)
    return stub.FailTask(request, timeout=TIMEOUT)


def cancel(stub: TaskServiceStub, task_id: str) -> pb.Task:
    return stub.CancelTask(pb.CancelTaskRequest(id=task_id), timeout=TIMEOUT)


def listed(stub: TaskServiceStub, **fields: Any) -> list[pb.Task]:
    """Every page of ListTasks with `fields`, in order."""
    found: list[pb.Task] = []
    token = ""
    for _ in range(100):
        reply = stub.ListTasks(pb.ListTasksRequest(page_token=token, **fields), timeout=TIMEOUT)
        found.extend(reply.tasks)
        token = reply.next_page_token
        if not token:
            return found
    pytest.fail("ListTasks never reached its last page")


def stats(stub: TaskServiceStub) -> pb.QueueStats:
    return stub.GetQueueStats(pb.GetQueueStatsRequest(), timeout=TIMEOUT)


def purge(stub: TaskServiceStub, older_than: float, *statuses: pb.TaskStatus.ValueType) -> int:
    request = pb.PurgeTasksRequest(statuses=statuses, older_than=duration(older_than))
    return stub.PurgeTasks(request, timeout=TIMEOUT).deleted


def duration(seconds: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromNanoseconds(int(seconds * 1e9))
    return message


def rpc_failure(call: Callable[[], object]) -> RpcFailure:
    """The failure of `call`, which must fail."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return failure(caught.value)


def assert_fails(call: Callable[[], object], code: grpc.StatusCode, reason: str) -> RpcFailure:
    problem = rpc_failure(call)
    assert (problem.code, problem.reason) == (code, reason), problem.message
    return problem


def eventually(check: Callable[[], bool], timeout: float = TIMEOUT, message: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, message or "condition never held"
        time.sleep(0.05)


def user_id(client: Client) -> str:
    return client.users.GetMe(user_service_pb2.GetMeRequest(), timeout=TIMEOUT).id


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def alice(client: Client) -> TaskServiceStub:
    return tasks_of(client)


@pytest.fixture
def bob_client(server: RunningServer) -> Iterator[Client]:
    with sign_in(server, "bob") as signed_in:
        yield signed_in


@pytest.fixture
def bob(bob_client: Client) -> TaskServiceStub:
    return tasks_of(bob_client)


@pytest.fixture
def worker(server: RunningServer) -> Iterator[TaskServiceStub]:
    with sign_in(server, "worker1", UserRole.WORKER) as signed_in:
        yield tasks_of(signed_in)


@pytest.fixture
def admin(server: RunningServer) -> Iterator[TaskServiceStub]:
    with sign_in(server, "root", UserRole.ADMIN) as signed_in:
        yield tasks_of(signed_in)


# --- create, get, list -------------------------------------------------------------------------


def test_create_stores_data_metadata_owner_and_defaults(client: Client, alice: TaskServiceStub) -> None:
    data = {"to": "bob@example.com", "n": 3.5, "ok": True, "none": None, "tags": ["a", 1], "deep": {"x": {}}}
    metadata = {"source": "agent-7", "trace": ["t1"]}
    before = now()
    created = create(alice, "email.send", data=data, metadata=struct(metadata))

    assert created.id
    assert created.type == "email.send"
    assert created.status == QUEUED
    assert (created.priority, created.max_attempts, created.attempts) == (0, 3, 0)
    assert created.owner_id == user_id(client)
    assert created.data == struct(data)
    assert created.metadata == struct(metadata)
    assert before - timedelta(seconds=1) <= when(created.created_at) <= now() + timedelta(seconds=1)
    assert not created.HasField("result")
    assert (created.error, created.worker_id, created.progress, created.cancel_requested) == (
        "",
        "",
        0,
        False,
    )
    assert get(alice, created.id) == created


def test_create_keeps_priority_max_attempts_and_run_after(alice: TaskServiceStub) -> None:
    later = now() + timedelta(hours=1)
    created = create(alice, "report:build/v2", priority=-1000, max_attempts=20, run_after=stamp(later))
    assert (created.priority, created.max_attempts) == (-1000, 20)
    assert abs(when(created.run_after) - later) < timedelta(milliseconds=1)
    assert get(alice, created.id) == created


def test_size_limits_count_utf8_bytes_of_the_json(alice: TaskServiceStub, worker: TaskServiceStub) -> None:
    # 40,000 bytes of UTF-8 (under 64 KiB) and 12,000 (under 16 KiB); escaped as \u00e9 they
    # would be three times as long, which is not how the task is serialized or stored.
    data = {"text": "\u00e9" * 20_000}
    metadata = {"note": "\u00e9" * 6_000}
    created = create(alice, "intl", data=data, metadata=struct(metadata))
    assert get(alice, created.id).data == struct(data)
    claimed(worker)
    assert complete(worker, created.id, result=data).result == struct(data)


def test_a_missing_task_is_not_found(alice: TaskServiceStub) -> None:
    assert_fails(lambda: get(alice, str(uuid.uuid4())), NOT_FOUND, "TASK_NOT_FOUND")


def test_dedup_key_returns_the_first_task_for_the_same_account_only(
    alice: TaskServiceStub, bob: TaskServiceStub
) -> None:
    first = create(alice, data={"n": 1}, dedup_key="invoice-42")
    again = create(alice, data={"n": 2}, dedup_key="invoice-42")
    assert again.id == first.id
    assert again.data == struct({"n": 1})
    assert again.dedup_key == "invoice-42"

    bobs = create(bob, data={"n": 3}, dedup_key="invoice-42")
    assert bobs.id != first.id
    assert bobs.data == struct({"n": 3})
    other_key = create(alice, data={"n": 4}, dedup_key="invoice-43")
    assert other_key.id != first.id
    assert [task.id for task in listed(alice)] == [other_key.id, first.id]


def test_list_is_newest_first_and_filters_by_status_and_type(
    alice: TaskServiceStub, worker: TaskServiceStub
) -> None:
    a = create(alice, "a")
    b = create(alice, "b")
    c = create(alice, "a")
    d = create(alice, "b")
    running = claimed(worker, types=["b"])
    assert running.id == b.id

    assert [task.id for task in listed(alice)] == [d.id, c.id, b.id, a.id]
    assert [task.id for task in listed(alice, type="a")] == [c.id, a.id]
    assert [task.id for task in listed(alice, status=QUEUED)] == [d.id, c.id, a.id]
    assert [task.id for task in listed(alice, status=RUNNING)] == [b.id]
    assert [task.id for task in listed(alice, status=QUEUED, type="b")] == [d.id]
    assert listed(alice, status=COMPLETED) == []
    assert listed(alice, type="c") == []


def test_list_pages_through_every_task_once(alice: TaskServiceStub) -> None:
    ids = [create(alice, "page", data={"i": i}).id for i in range(7)]
    pages: list[list[str]] = []
    token = ""
    while True:
        reply = alice.ListTasks(pb.ListTasksRequest(page_size=3, page_token=token), timeout=TIMEOUT)
        pages.append([task.id for task in reply.tasks])
        token = reply.next_page_token
        if not token:
            break
        assert len(pages) < 10
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [task_id for page in pages for task_id in page] == ids[::-1]

    filtered = alice.ListTasks(pb.ListTasksRequest(page_size=2, type="page"), timeout=TIMEOUT)
    assert [task.id for task in filtered.tasks] == ids[:-3:-1]
    rest = alice.ListTasks(
        pb.ListTasksRequest(page_size=50, type="page", page_token=filtered.next_page_token), timeout=TIMEOUT
    )
    assert [task.id for task in rest.tasks] == ids[-3::-1]
    assert rest.next_page_token == ""


# --- validation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """A running task held by worker `w1`, and stubs for each role."""

    alice: TaskServiceStub
    worker: TaskServiceStub
    admin: TaskServiceStub
    running: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One server for the whole table: signing in three accounts per case would cost seconds.
    Every case is refused, and checks that the held task was left alone."""
    path = tmp_path_factory.mktemp("validation")
    settings = Settings(
        host="127.0.0.1",
        port=0,
        database_path=path / "app.db",
        vector_db_path=path / "vectordb",
        shutdown_grace=1.0,
        jwt_secret=TEST_SECRET,
    )
    running, stop = start_server(settings)
    try:
        with (
            sign_in(running, "alice") as alice,
            sign_in(running, "worker", UserRole.WORKER) as worker,
            sign_in(running, "root", UserRole.ADMIN) as admin,
        ):
            task = create(tasks_of(alice), "held")
            assert claimed(tasks_of(worker), lease_seconds=3600).id == task.id
            yield World(tasks_of(alice), tasks_of(worker), tasks_of(admin), task.id)
    finally:
        stop()


def _create(**fields: Any) -> Callable[[World], object]:
    fields.setdefault("type", "ok")
    fields.setdefault("data", struct({}))
    return lambda w: w.alice.CreateTask(pb.CreateTaskRequest(**fields), timeout=TIMEOUT)


def _claim(**fields: Any) -> Callable[[World], object]:
    fields.setdefault("worker_id", "w2")
    return lambda w: w.worker.ClaimTask(pb.ClaimTaskRequest(**fields), timeout=TIMEOUT)


def _heartbeat(**fields: Any) -> Callable[[World], object]:
    fields.setdefault("worker_id", "w1")
    return lambda w: w.worker.HeartbeatTask(pb.HeartbeatTaskRequest(id=w.running, **fields), timeout=TIMEOUT)


def _complete(**fields: Any) -> Callable[[World], object]:
    fields.setdefault("worker_id", "w1")
    return lambda w: w.worker.CompleteTask(pb.CompleteTaskRequest(id=w.running, **fields), timeout=TIMEOUT)


def _fail(**fields: Any) -> Callable[[World], object]:
    fields.setdefault("worker_id", "w1")
    return lambda w: w.worker.FailTask(pb.FailTaskRequest(id=w.running, **fields), timeout=TIMEOUT)


def _list(**fields: Any) -> Callable[[World], object]:
    return lambda w: w.alice.ListTasks(pb.ListTasksRequest(**fields), timeout=TIMEOUT)


def _purge(**fields: Any) -> Callable[[World], object]:
    return lambda w: w.admin.PurgeTasks(pb.PurgeTasksRequest(**fields), timeout=TIMEOUT)


def _big(limit: int) -> struct_pb2.Struct:
    return struct({"blob": "x" * (limit + 1)})


INVALID_REQUESTS: dict[str, tuple[Callable[[World], object], str]] = {
    "create: empty type": (_create(type=""), "type"),
    "create: type with a space": (_create(type="send email"), "type"),
    "create: type with a bang": (_create(type="send!"), "type"),
    "create: type of 101 characters": (_create(type="t" * 101), "type"),
    "create: priority 1001": (_create(priority=1001), "priority"),
    "create: priority -1001": (_create(priority=-1001), "priority"),
    "create: max_attempts 21": (_create(max_attempts=21), "max_attempts"),
    "create: max_attempts -1": (_create(max_attempts=-1), "max_attempts"),
    "create: data over 64 KiB": (_create(data=_big(DATA_LIMIT)), "data"),
    "create: metadata over 16 KiB": (_create(metadata=_big(METADATA_LIMIT)), "metadata"),
    "create: dedup_key of 201 characters": (_create(dedup_key="k" * 201), "dedup_key"),
    "claim: empty worker_id": (_claim(worker_id=""), "worker_id"),
    "claim: worker_id of 101 characters": (_claim(worker_id="w" * 101), "worker_id"),
    "claim: lease_seconds 3601": (_claim(lease_seconds=3601), "lease_seconds"),
    "claim: lease_seconds -1": (_claim(lease_seconds=-1), "lease_seconds"),
    "claim: wait_seconds 31": (_claim(wait_seconds=31), "wait_seconds"),
    "claim: wait_seconds -1": (_claim(wait_seconds=-1), "wait_seconds"),
    "heartbeat: empty worker_id": (_heartbeat(worker_id=""), "worker_id"),
    "heartbeat: lease_seconds 3601": (_heartbeat(lease_seconds=3601), "lease_seconds"),
    "heartbeat: lease_seconds -1": (_heartbeat(lease_seconds=-1), "lease_seconds"),
    "heartbeat: progress 1.5": (_heartbeat(progress=1.5), "progress"),
    "heartbeat: progress -0.1": (_heartbeat(progress=-0.1), "progress"),
    "complete: result over 64 KiB": (_complete(result=_big(DATA_LIMIT)), "result"),
    "fail: without error": (_fail(error=""), "error"),
    "fail: error of 4001 characters": (_fail(error="e" * 4001), "error"),
    "list: negative page_size": (_list(page_size=-1), "page_size"),
    "purge: without older_than": (_purge(), "older_than"),
    "purge: negative older_than": (_purge(older_than=duration(-1)), "older_than"),
    "purge: QUEUED": (_purge(statuses=[QUEUED], older_than=duration(0)), "statuses"),
    "purge: RUNNING": (_purge(statuses=[COMPLETED, RUNNING], older_than=duration(0)), "statuses"),
}


@pytest.mark.parametrize("case", list(INVALID_REQUESTS))
def test_invalid_request_is_invalid_argument_naming_the_field(world: World, case: str) -> None:
    call, field = INVALID_REQUESTS[case]
    problem = assert_fails(lambda: call(world), INVALID, "INVALID_ARGUMENT")
    assert field in problem.fields, problem.fields
    held = get(world.worker, world.running)  # nothing was changed on the way
    assert (held.status, held.worker_id, held.progress) == (RUNNING, "w1", 0)


def test_create_without_data_is_invalid_argument(alice: TaskServiceStub) -> None:
    problem = assert_fails(
        lambda: alice.CreateTask(pb.CreateTaskRequest(type="ok"), timeout=TIMEOUT),
        INVALID,
        "INVALID_ARGUMENT",
    )
    assert set(problem.fields) == {"data"}


@pytest.mark.parametrize("token", ["garbage", "eyJhIjoxfQ", "x" * 500])
def test_a_bad_page_token_is_invalid_argument(alice: TaskServiceStub, token: str) -> None:
    create(alice)
    problem = rpc_failure(lambda: alice.ListTasks(pb.ListTasksRequest(page_token=token), timeout=TIMEOUT))
    assert problem.code == INVALID
    # The contract lists INVALID_ARGUMENT; the other services say INVALID_PAGE_TOKEN for this.
    assert problem.reason in {"INVALID_ARGUMENT", "INVALID_PAGE_TOKEN"}
    assert set(problem.fields) == {"page_token"}


def test_limits_themselves_are_accepted(alice: TaskServiceStub, worker: TaskServiceStub) -> None:
    high = create(alice, "t" * 100, priority=1000, max_attempts=1, dedup_key="k" * 200)
    create(alice, "a.b_c-d:e/f", priority=-1000, max_attempts=20)
    task = claimed(worker, "w" * 100, lease_seconds=3600)
    assert task.id == high.id
    heartbeat(worker, task.id, "w" * 100, progress=1.0, lease_seconds=1)
    failed = fail(worker, task.id, "w" * 100, "e" * 4000, retryable=True)
    assert failed.status == FAILED  # max_attempts 1: no attempt left
    assert failed.error == "e" * 4000


# --- ordering ----------------------------------------------------------------------------------


def test_higher_priority_is_claimed_first_and_equals_in_creation_order(
    alice: TaskServiceStub, worker: TaskServiceStub
) -> None:
    created = [create(alice, "job", priority=p, data={"i": i}) for i, p in enumerate([0, 5, 5, -1, 10, 0])]
    order = [claimed(worker).id for _ in created]
    expected = [created[i].id for i in (4, 1, 2, 0, 5, 3)]
    assert order == expected
    assert claim(worker) is None


def test_a_task_is_not_claimed_before_run_after(alice: TaskServiceStub, worker: TaskServiceStub) -> None:
    ready_at = now() + timedelta(seconds=1.2)
    delayed = create(alice, "later", run_after=stamp(ready_at), priority=100)
    ready = create(alice, "now")
    assert claimed(worker).id == ready.id
    assert claim(worker) is None
    time.sleep(max((ready_at - now()).total_seconds(), 0) + 0.2)
    assert claimed(worker).id == delayed.id


def test_claim_takes_only_the_given_types(alice: TaskServiceStub, worker: TaskServiceStub) -> None:
    email = create(alice, "email.send", priority=10)
    report = create(alice, "report:build")
    thumb = create(alice, "image/thumb")
    assert claimed(worker, types=["report:build"]).id == report.id
    assert claim(worker, types=["report:build", "nothing"]) is None
    assert claimed(worker, types=["image/thumb", "email.send"]).id == email.id
    assert claimed(worker).id == thumb.id


def test_claim_with_nothing_ready_returns_no_task(alice: TaskServiceStub, worker: TaskServiceStub) -> None:
    assert claim(worker) is None
    create(alice, "x", run_after=stamp(now() + timedelta(hours=1)))
    started = time.monotonic()
    assert claim(worker) is None
    assert time.monotonic() - started < 1.0  # without wait_seconds it answers at once


def test_a_waiting_claim_gets_a_task_created_while_it_waits(
    alice: TaskServiceStub, worker: TaskServiceStub
) -> None:
    result: queue.Queue[tuple[pb.Task | None, float]] = queue.Queue()

    def wait() -> None:
        started = time.monotonic()
        result.put((claim(worker, wait_seconds=2), time.monotonic() - started))

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    time.sleep(0.5)
    created = create(alice, "late")
    task, waited = result.get(timeout=TIMEOUT)
    thread.join(TIMEOUT)
    assert task is not None, "the waiting claim returned no task"
    assert task.id == created.id
    assert 0.4 <= waited < 1.9, waited


def test_a_waiting_claim_gets_a_delayed_task_once_it_is_ready(
    alice: TaskServiceStub, worker: TaskServiceStub
) -> None:
    created = create(alice, "later", run_after=stamp(now() + timedelta(seconds=1)))
    started = time.monotonic()
    task = claim(worker, wait_seconds=3)
    assert task is not None, "the waiting claim missed the task that became ready during the wait"
    assert task.id == created.id
    assert 0.8 <= time.monotonic() - started < 2.5


def test_a_waiting_claim_with_nothing_ready_returns_no_task_after_the_wait(worker: TaskServiceStub) -> None:
    started = time.monotonic()
    assert claim(worker, wait_seconds=1) is None
    assert 0.9 <= time.monotonic() - started < 3.0


# --- lifecycle ---------------------------------------------------------------------------------


def test_claim_heartbeat_complete(alice: TaskServiceStub, worker: TaskServiceStub) -> None:
    created = create(alice, "work", data={"n": 1})
    task = claimed(worker, "w1")  # lease_seconds 0 means 30
    assert task.id == created.id
    assert (task.status, task.worker_id, task.attempts) == (RUNNING, "w1", 1)
    assert task.data == created.data
    started_at = when(task.started_at)
    assert abs(started_at - now()) < timedelta(seconds=2)
    assert abs(when(task.lease_expires_at) - (started_at + timedelta(seconds=30))) < timedelta(seconds=2)

    beat = heartbeat(worker, task.id, "w1", progress=0.25, lease_seconds=120)
    assert beat.cancel_requested is False
    assert when(beat.lease_expires_at) > when(task.lease_expires_at) + timedelta(seconds=60)
    seen = get(alice, task.id)
    assert (seen.status, seen.progress) == (RUNNING, 0.25)
    assert seen.lease_expires_at == beat.lease_expires_at

    done = complete(worker, task.id, "w1", {"sent": True, "ids": [1, 2]})
    assert done.status == COMPLETED
    assert done.result == struct({"sent": True, "ids": [1, 2]})
    assert done.started_at == task.started_at
    assert when(done.completed_at) >= started_at
    assert done.duration_ms >= 0
    assert done.duration_ms == pytest.approx(
        (when(done.completed_at) - started_at).total_seconds() * 1000, abs=2
    )
    assert done.attempts == 1
    assert get(alice, task.id) == done
    assert claim(worker) is None


def test_a_retryable_failure_with_attempts_left_queues_again_after_a_backoff(
    alice: TaskServiceStub, worker: TaskServiceStub
) -> None:
    created = create(alice, "flaky", max_attempts=2)
    claimed(worker)
    failed_at = now()
    retried = fail(worker, created.id, error="smtp timeout", retryable=True)
    assert (retried.status, retried.error, retried.attempts) == (QUEUED, "smtp timeout", 1)
    backoff = (when(retried.run_after) - failed_at).total_seconds()
    assert 1.0 <= backoff <= 3.0, backoff  # the first backoff is 2 seconds
    assert not retried.worker_id
    assert claim(worker) is None  # waiting out the backoff

    eventually(lambda: claim(worker, "w2") is not None, timeout=4, message="never handed out again")
    again = get(alice, created.id)
    assert (again.status, again.attempts, again.worker_id) == (RUNNING, 2, "w2")

    last = fail(worker, created.id, "w2", "smtp timeout again", retryable=True)
    assert (last.status, last.error, last.attempts) == (FAILED, "smtp timeout again", 2)
    assert last.HasField("completed_at")
    assert claim(worker) is None


def test_a_non_retryable_failure_fails_at_once(alice: TaskServiceStub, worker: TaskServiceStub) -> None:
    created = create(alice, "doomed", max_attempts=5)
    claimed(worker)
    failed = fail(worker, created.id, error="bad input", retryable=False)
    assert (failed.status, failed.error, failed.attempts) == (FAILED, "bad input", 1)
    assert failed.HasField("completed_at")
    assert failed.duration_ms >= 0
    assert claim(worker) is None


def test_another_workers_calls_are_lease_lost(alice: TaskServiceStub, worker: TaskServiceStub) -> None:
    created = create(alice)
    claimed(worker, "w1")
    assert_fails(lambda: heartbeat(worker, created.id, "w2"), PRECONDITION, "LEASE_LOST")
    assert_fails(lambda: complete(worker, created.id, "w2"), PRECONDITION, "LEASE_LOST")
    assert_fails(lambda: fail(worker, created.id, "w2", retryable=False), PRECONDITION, "LEASE_LOST")
    still = get(alice, created.id)
    assert (still.status, still.worker_id) == (RUNNING, "w1")
    assert complete(worker, created.id, "w1").status == COMPLETED


def test_calls_after_the_lease_expired_and_another_worker_claimed_are_lease_lost(
    alice: TaskServiceStub, worker: TaskServiceStub
) -> None:
    created = create(alice)
    claimed(worker, "w1", lease_seconds=1)
    time.sleep(1.3)
    taken = claimed(worker, "w2")
    assert (taken.id, taken.attempts) == (created.id, 2)
    assert_fails(lambda: heartbeat(worker, created.id, "w1"), PRECONDITION, "LEASE_LOST")
    assert_fails(lambda: complete(worker, created.id, "w1"), PRECONDITION, "LEASE_LOST")
    assert_fails(lambda: fail(worker, created.id, "w1", retryable=True), PRECONDITION, "LEASE_LOST")
    assert complete(worker, created.id, "w2", {"by": "w2"}).result == struct({"by": "w2"})


def test_finishing_a_finished_task_is_failed_precondition(
    alice: TaskServiceStub, worker: TaskServiceStub
) -> None:
    created = create(alice)
    claimed(worker)
    done = complete(worker, created.id, result={"once": True})
    for call in (
        lambda: complete(worker, created.id, result={"twice": True}),
        lambda: fail(worker, created.id, retryable=False),
        lambda: heartbeat(worker, created.id),
    ):
        problem = rpc_failure(call)
        assert problem.code == PRECONDITION, problem.message
        # Not running any more: INVALID_TRANSITION reads best, LEASE_LOST is defensible.
        assert problem.reason in {"INVALID_TRANSITION", "LEASE_LOST"}
    assert get(alice, created.id) == done


def test_worker_calls_on_a_missing_task_are_not_found(worker: TaskServiceStub) -> None:
    missing = str(uuid.uuid4())
    for call in (
        lambda: heartbeat(worker, missing),
        lambda: complete(worker, missing),
        lambda: fail(worker, missing, retryable=True),
    ):
        assert_fails(call, NOT_FOUND, "TASK_NOT_FOUND")


# --- lease expiry ------------------------------------------------------------------------------


def test_an_expired_lease_hands_the_task_out_again_until_attempts_run_out(
    alice: TaskServiceStub, worker: TaskServiceStub
) -> None:
    created = create(alice, "slow", max_attempts=2)
    first = claimed(worker, "w1", lease_seconds=1)
    assert first.attempts == 1
    assert claim(worker, "w2") is None  # held, and the lease is still good
    time.sleep(1.5)
    second = claimed(worker, "w2", lease_seconds=1)
    assert (second.id, second.attempts, second.worker_id) == (created.id, 2, "w2")
    time.sleep(1.5)

    def failed() -> bool:
        assert claim(worker, "w3") is None, "handed out beyond max_attempts"
        return get(alice, created.id).status == FAILED

    eventually(failed, timeout=3, message="the task did not fail after its last lease expired")
    final = get(alice, created.id)
    assert final.attempts == 2
    assert final.HasField("completed_at")


def test_calls_after_the_lease_expired_are_lease_lost_even_if_nobody_claimed_it(
    alice: TaskServiceStub, worker: TaskServiceStub
) -> None:
    created = create(alice)
    claimed(worker, "w1", lease_seconds=1)
    time.sleep(1.3)
    assert_fails(lambda: heartbeat(worker, created.id, "w1"), PRECONDITION, "LEASE_LOST")
    assert_fails(lambda: complete(worker, created.id, "w1"), PRECONDITION, "LEASE_LOST")
    again = claimed(worker, "w2")
    assert (again.id, again.attempts) == (created.id, 2)


@pytest.mark.parametrize(
    ("max_attempts", "after_sweep"), [(3, QUEUED), (1, FAILED)], ids=["requeued", "failed"]
)
def test_calls_after_the_lease_expired_and_the_task_was_swept_back_are_lease_lost(
    alice: TaskServiceStub, worker: TaskServiceStub, max_attempts: int, after_sweep: int
) -> None:
    created = create(alice, "slow", max_attempts=max_attempts)
    claimed(worker, "w1", lease_seconds=1)
    time.sleep(1.3)
    assert claim(worker, "w2", types=["other"]) is None  # a claim that finds the lapsed lease
    assert get(alice, created.id).status == after_sweep
    # For w1 nothing changed but the lease running out: the contract's LEASE_LOST.
    assert_fails(lambda: heartbeat(worker, created.id, "w1"), PRECONDITION, "LEASE_LOST")
    assert_fails(lambda: complete(worker, created.id, "w1"), PRECONDITION, "LEASE_LOST")
    assert_fails(lambda: fail(worker, created.id, "w1", retryable=True), PRECONDITION, "LEASE_LOST")


def test_a_heartbeat_keeps_the_lease(alice: TaskServiceStub, worker: TaskServiceStub) -> None:
    created = create(alice)
    claimed(worker, "w1", lease_seconds=1)
    for _ in range(3):
        time.sleep(0.5)
        heartbeat(worker, created.id, "w1", lease_seconds=1)
        assert claim(worker, "w2") is None
    assert complete(worker, created.id, "w1").attempts == 1


# --- cancel ------------------------------------------------------------------------------------


def test_cancelling_a_queued_task_cancels_it_at_once(alice: TaskServiceStub, worker: TaskServiceStub) -> None:
    created = create(alice)
    cancelled = cancel(alice, created.id)
    assert cancelled.status == CANCELLED
    assert cancelled.HasField("completed_at")
    assert get(alice, created.id) == cancelled
    assert claim(worker) is None


def test_cancelling_a_running_task_is_seen_on_the_next_heartbeat(
    alice: TaskServiceStub, worker: TaskServiceStub
) -> None:
    created = create(alice, max_attempts=5)
    claimed(worker)
    assert heartbeat(worker, created.id).cancel_requested is False
    requested = cancel(alice, created.id)
    assert (requested.status, requested.cancel_requested) == (RUNNING, True)
    assert heartbeat(worker, created.id, progress=0.5).cancel_requested is True
    assert get(alice, created.id).cancel_requested is True

    stopped = fail(worker, created.id, error="cancelled by owner", retryable=True)
    assert stopped.status == CANCELLED  # RUNNING -> CANCELLED after a request; never queued again
    assert claim(worker) is None


def test_a_task_cancelled_while_queued_has_no_error(alice: TaskServiceStub) -> None:
    created = create(alice)
    cancelled = cancel(alice, created.id)
    assert cancelled.error == ""  # "the last failure's message; empty when there was none"
    assert get(alice, created.id).error == ""


@pytest.mark.parametrize("finish", ["complete", "fail", "cancel"])
def test_cancelling_a_finished_task_is_invalid_transition(
    alice: TaskServiceStub, worker: TaskServiceStub, finish: str
) -> None:
    created = create(alice)
    if finish == "cancel":
        cancel(alice, created.id)
    else:
        claimed(worker)
        if finish == "complete":
            complete(worker, created.id)
        else:
            fail(worker, created.id, retryable=False)
    before = get(alice, created.id)
    assert_fails(lambda: cancel(alice, created.id), PRECONDITION, "INVALID_TRANSITION")
    assert get(alice, created.id) == before


# --- watch -------------------------------------------------------------------------------------


class Watcher:
    """One WatchTask stream, read on its own thread so the test can wait with timeouts."""

    def __init__(self, stub: TaskServiceStub, task_id: str) -> None:
        self.call = stub.WatchTask(pb.WatchTaskRequest(id=task_id), timeout=STREAM_DEADLINE)
        self.error: grpc.RpcError | None = None
        self._received: queue.Queue[pb.Task] = queue.Queue()
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self._received.put(response.task)
        except grpc.RpcError as error:
            self.error = error
        finally:
            self._ended.set()

    def next(self, timeout: float = TIMEOUT) -> pb.Task:
        try:
            return self._received.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no update within {timeout}s: {self.error}")

    def assert_ended_cleanly(self, timeout: float = TIMEOUT) -> None:
        assert self._ended.wait(timeout), "the stream is still open after the task finished"
        if self.error is not None:
            pytest.fail(f"the stream failed: {failure(self.error)}")
        assert self._received.empty(), f"unexpected update: {self._received.get_nowait()}"

    def close(self) -> None:
        self.call.cancel()
        self._thread.join(TIMEOUT)


def test_watch_yields_the_current_state_then_each_change_and_ends(
    alice: TaskServiceStub, worker: TaskServiceStub
) -> None:
    created = create(alice, "watched")
    watcher = Watcher(alice, created.id)
    try:
        first = watcher.next()
        assert (first.id, first.status) == (created.id, QUEUED)

        claimed(worker, "w1")
        running = watcher.next()
        assert (running.status, running.worker_id, running.attempts) == (RUNNING, "w1", 1)

        heartbeat(worker, created.id, "w1", progress=0.6)
        progressed = watcher.next()
        assert (progressed.status, progressed.progress) == (RUNNING, 0.6)

        complete(worker, created.id, "w1", {"answer": 42})
        done = watcher.next()
        assert (done.status, done.result) == (COMPLETED, struct({"answer": 42}))
        watcher.assert_ended_cleanly()
    finally:
        watcher.close()


@pytest.mark.parametrize("finish", ["cancel", "fail"])
def test_watch_ends_after_cancel_or_failure(
    alice: TaskServiceStub, worker: TaskServiceStub, finish: str
) -> None:
    created = create(alice)
    watcher = Watcher(alice, created.id)
    try:
        assert watcher.next().status == QUEUED
        if finish == "cancel":
            cancel(alice, created.id)
            assert watcher.next().status == CANCELLED
        else:
            claimed(worker)
            assert watcher.next().status == RUNNING
            fail(worker, created.id, error="nope", retryable=False)
            last = watcher.next()
            assert (last.status, last.error) == (FAILED, "nope")
        watcher.assert_ended_cleanly()
    finally:
        watcher.close()


def test_watching_a_finished_task_yields_it_and_ends(alice: TaskServiceStub) -> None:
    created = create(alice)
    cancelled = cancel(alice, created.id)
    watcher = Watcher(alice, created.id)
    try:
        assert watcher.next() == cancelled
        watcher.assert_ended_cleanly()
    finally:
        watcher.close()


def test_watching_another_users_or_a_missing_task_is_not_found(
    alice: TaskServiceStub, bob: TaskServiceStub
) -> None:
    created = create(alice)
    for task_id in (created.id, str(uuid.uuid4())):
        stream = bob.WatchTask(pb.WatchTaskRequest(id=task_id), timeout=TIMEOUT)
        assert_fails(partial(next, stream), NOT_FOUND, "TASK_NOT_FOUND")


# --- access ------------------------------------------------------------------------------------


WORKER_CALLS: dict[str, Callable[[TaskServiceStub, str], object]] = {
    "ClaimTask": lambda s, _: claim(s),
    "HeartbeatTask": heartbeat,
    "CompleteTask": complete,
    "FailTask": lambda s, task_id: fail(s, task_id, retryable=False),
}


@pytest.mark.parametrize("role", [UserRole.USER, UserRole.MODERATOR])
def test_worker_calls_are_permission_denied_without_the_worker_role(
    server: RunningServer, worker: TaskServiceStub, role: UserRole
) -> None:
    with sign_in(server, f"plain-{role.value}", role) as someone:
        stub = tasks_of(someone)
        created = create(stub)
        queued = create(stub)
        claimed(worker, "w1")
        for rpc, call in WORKER_CALLS.items():
            problem = rpc_failure(partial(call, stub, created.id))
            assert (problem.code, problem.reason) == (DENIED, "PERMISSION_DENIED"), rpc
        assert get(stub, created.id).status == RUNNING
        assert get(stub, queued.id).status == QUEUED


def test_a_worker_sees_every_task_and_an_admin_can_work_too(
    alice: TaskServiceStub, bob: TaskServiceStub, worker: TaskServiceStub, admin: TaskServiceStub
) -> None:
    alices = create(alice, "a")
    bobs = create(bob, "b")
    assert get(worker, alices.id) == alices
    assert get(worker, bobs.id) == bobs
    assert [task.id for task in listed(worker)] == [bobs.id, alices.id]
    assert stats(worker).queued == 2
    assert stats(alice).queued == 1

    task = claimed(admin, "admin-worker", types=["b"])
    assert task.id == bobs.id
    assert complete(admin, task.id, "admin-worker").status == COMPLETED


def test_another_users_task_is_not_found_like_a_missing_one(
    alice: TaskServiceStub, bob: TaskServiceStub
) -> None:
    created = create(alice, data={"secret": "alice's"})
    missing = str(uuid.uuid4())
    for call in (get, cancel):
        theirs = assert_fails(partial(call, bob, created.id), NOT_FOUND, "TASK_NOT_FOUND")
        absent = assert_fails(partial(call, bob, missing), NOT_FOUND, "TASK_NOT_FOUND")
        assert theirs.message.replace(created.id, "<id>") == absent.message.replace(missing, "<id>")
    assert listed(bob) == []
    assert stats(bob).queued == 0
    assert get(alice, created.id) == created


def test_an_admin_may_cancel_any_task(alice: TaskServiceStub, admin: TaskServiceStub) -> None:
    created = create(alice)
    assert cancel(admin, created.id).status == CANCELLED


def test_calls_without_a_token_are_unauthenticated(channel: grpc.Channel) -> None:
    stub = TaskServiceStub(channel)
    assert_fails(lambda: create(stub), UNAUTHENTICATED, "UNAUTHENTICATED")
    assert_fails(lambda: claim(stub), UNAUTHENTICATED, "UNAUTHENTICATED")


@pytest.mark.parametrize("who", ["alice", "worker"])
def test_purge_is_permission_denied_except_for_admins(
    alice: TaskServiceStub, worker: TaskServiceStub, who: str
) -> None:
    stub = alice if who == "alice" else worker
    created = create(alice)
    cancel(alice, created.id)
    assert_fails(lambda: purge(stub, 0), DENIED, "PERMISSION_DENIED")
    assert get(alice, created.id).status == CANCELLED


def test_purge_deletes_only_finished_tasks_older_than_older_than(
    alice: TaskServiceStub, worker: TaskServiceStub, admin: TaskServiceStub
) -> None:
    def finished(status: int) -> str:
        task = create(alice, "old")
        if status == CANCELLED:
            cancel(alice, task.id)
            return task.id
        assert claimed(worker, types=["old"]).id == task.id
        if status == COMPLETED:
            complete(worker, task.id)
        else:
            fail(worker, task.id, retryable=False)
        return task.id

    old = {status: finished(status) for status in (COMPLETED, FAILED, CANCELLED)}
    running = create(alice, "keep").id
    assert claimed(worker, types=["keep"]).id == running
    queued = create(alice, "keep").id
    time.sleep(1.0)
    new = {status: finished(status) for status in (COMPLETED, FAILED, CANCELLED)}

    assert purge(admin, 3600) == 0
    assert purge(admin, 0.5, COMPLETED) == 1
    assert_fails(lambda: get(alice, old[COMPLETED]), NOT_FOUND, "TASK_NOT_FOUND")
    assert get(alice, old[FAILED]).status == FAILED
    assert purge(admin, 0.5) == 2  # the old failed and cancelled ones
    for task_id in (old[FAILED], old[CANCELLED]):
        assert_fails(partial(get, alice, task_id), NOT_FOUND, "TASK_NOT_FOUND")
    for status, task_id in new.items():
        assert get(alice, task_id).status == status
    assert get(alice, running).status == RUNNING
    assert get(alice, queued).status == QUEUED
    assert purge(admin, 0) == 3
    assert get(alice, running).status == RUNNING
    assert get(alice, queued).status == QUEUED
    assert {task.id for task in listed(alice)} == {running, queued}


# --- stats -------------------------------------------------------------------------------------


def test_queue_stats_count_per_status(alice: TaskServiceStub, worker: TaskServiceStub) -> None:
    empty = stats(alice)
    assert (empty.queued, empty.running, empty.completed, empty.failed, empty.cancelled) == (0, 0, 0, 0, 0)
    assert empty.oldest_queued_age_seconds == 0

    ids = [create(alice, data={"i": i}).id for i in range(7)]
    for task_id in ids[:4]:
        assert claimed(worker).id == task_id
    complete(worker, ids[0])
    fail(worker, ids[1], retryable=False)
    cancel(alice, ids[4])
    time.sleep(0.2)

    counted = stats(alice)
    assert (counted.queued, counted.running, counted.completed, counted.failed, counted.cancelled) == (
        2,
        2,
        1,
        1,
        1,
    )
    assert 0.2 <= counted.oldest_queued_age_seconds < 30
    everyone = stats(worker)  # only alice has tasks, so the worker counts the same
    assert (everyone.queued, everyone.running, everyone.completed, everyone.failed) == (2, 2, 1, 1)

    for task_id in ids[5:]:
        cancel(alice, task_id)
    assert stats(alice).oldest_queued_age_seconds == 0


# --- restart -----------------------------------------------------------------------------------


def test_tasks_survive_a_restart_and_a_running_lease_keeps_counting(settings: Settings) -> None:
    first, stop_first = start_server(settings)
    try:
        with (
            sign_in(first, "alice") as alice_client,
            sign_in(first, "worker", UserRole.WORKER) as worker_client,
        ):
            alice, worker = tasks_of(alice_client), tasks_of(worker_client)
            queued = create(alice, "q", data={"kept": [1, 2]}, metadata=struct({"m": 1}), dedup_key="once")
            done = create(alice, "d")
            claimed(worker, types=["d"])
            complete(worker, done.id, result={"r": "ok"})
            running = create(alice, "r")
            claimed(worker, "w1", types=["r"], lease_seconds=4)
            before = {task_id: get(alice, task_id) for task_id in (queued.id, done.id, running.id)}
    finally:
        stop_first()

    second, stop_second = start_server(settings)
    try:
        with Client(second.address) as alice_client, Client(second.address) as worker_client:
            alice_client.login("alice", PASSWORD)
            worker_client.login("worker", PASSWORD)
            alice, worker = tasks_of(alice_client), tasks_of(worker_client)
            after = {task_id: get(alice, task_id) for task_id in before}
            assert after == before
            assert after[running.id].status == RUNNING
            assert create(alice, "q", dedup_key="once").id == queued.id

            assert claim(worker, "w2", types=["r"]) is None  # the lease is still good
            expires = when(before[running.id].lease_expires_at)
            time.sleep(max((expires - now()).total_seconds(), 0) + 0.3)
            again = claimed(worker, "w2", types=["r"])
            assert (again.id, again.attempts) == (running.id, 2)
            assert claimed(worker, "w2").id == queued.id
    finally:
        stop_second()


def test_a_dead_workers_task_goes_back_to_the_queue_without_waiting_for_a_claim(
    alice: TaskServiceStub, worker: TaskServiceStub
) -> None:
    task = create(alice)
    claimed(worker, "w1", lease_seconds=1)
    # No one claims again: the server's own sweep returns the task once the lease runs out.
    eventually(lambda: get(alice, task.id).status == pb.TASK_STATUS_QUEUED, timeout=4)
    assert get(alice, task.id).error == "lease expired"


def test_a_worker_may_see_but_not_cancel_another_accounts_task(
    alice: TaskServiceStub, worker: TaskServiceStub
) -> None:
    task = create(alice)
    assert get(worker, task.id).id == task.id
    assert_fails(lambda: cancel(worker, task.id), grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    assert get(alice, task.id).status == pb.TASK_STATUS_QUEUED
