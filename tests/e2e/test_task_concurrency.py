"""TaskService under concurrent workers: every task claimed and completed exactly once."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from crewdb.client import Client
from crewdb.models import UserRole
from crewdb.v1 import task_service_pb2 as pb
from crewdb.v1.task_service_pb2_grpc import TaskServiceStub
from tests.conftest import RunningServer, sign_in
from tests.e2e.test_tasks import TIMEOUT, claim, complete, create, listed, stats, struct, tasks_of

TASKS = 200
WORKERS = 8
# Long enough that no lease expires during the run, so no task may legitimately run twice.
LEASE_SECONDS = 300
JOIN_TIMEOUT = 40.0


@dataclass
class Ledger:
    """What the workers saw, written from many threads under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    claims: list[tuple[str, str]] = field(default_factory=list)  # (task id, worker id)
    completed: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)


def work(stub: TaskServiceStub, worker_id: str, start: threading.Barrier, ledger: Ledger, wait: int) -> None:
    """Claims and completes until a claim comes back empty."""
    try:
        start.wait(TIMEOUT)
        while (task := claim(stub, worker_id, lease_seconds=LEASE_SECONDS, wait_seconds=wait)) is not None:
            with ledger.lock:
                ledger.claims.append((task.id, worker_id))
            done = complete(stub, task.id, worker_id, {"worker": worker_id, "task": task.id})
            assert done.status == pb.TASK_STATUS_COMPLETED
            with ledger.lock:
                ledger.completed.append(task.id)
    except BaseException as error:  # noqa: BLE001 - reported by the test thread
        with ledger.lock:
            ledger.errors.append(error)


@pytest.fixture
def workers(server: RunningServer) -> Iterator[list[Client]]:
    clients = [sign_in(server, f"worker{n}", UserRole.WORKER) for n in range(WORKERS)]
    yield clients
    for worker_client in clients:
        worker_client.close()


class Crew:
    """Worker threads that start together when `go` is called."""

    def __init__(self, workers: list[Client], ledger: Ledger, wait: int = 0) -> None:
        self._start = threading.Barrier(len(workers) + 1)
        self._threads = [
            threading.Thread(
                target=work,
                args=(tasks_of(c), f"w{n}", self._start, ledger, wait),
                name=f"task-worker-{n}",
                daemon=True,
            )
            for n, c in enumerate(workers)
        ]
        for thread in self._threads:
            thread.start()

    def go(self) -> None:
        self._start.wait(TIMEOUT)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(JOIN_TIMEOUT)
            assert not thread.is_alive(), f"{thread.name} is still working"


def assert_each_once(ledger: Ledger, ids: list[str]) -> None:
    assert not ledger.errors, ledger.errors
    claimed = Counter(task_id for task_id, _ in ledger.claims)
    assert [task_id for task_id, count in claimed.items() if count > 1] == [], "claimed twice"
    assert set(claimed) == set(ids), f"{len(set(ids) - set(claimed))} never claimed"
    assert sorted(ledger.completed) == sorted(ids)


def test_concurrent_workers_claim_and_complete_every_task_exactly_once(
    client: Client, workers: list[Client]
) -> None:
    owner = tasks_of(client)
    ids = [create(owner, "batch", data={"n": n}, priority=n % 3).id for n in range(TASKS)]
    ledger = Ledger()
    crew = Crew(workers, ledger)
    crew.go()
    crew.join()

    assert_each_once(ledger, ids)
    assert len(ledger.claims) == TASKS
    assert len({worker_id for _, worker_id in ledger.claims}) > 1, "one worker did everything"

    finished = listed(owner, status=pb.TASK_STATUS_COMPLETED, page_size=200)
    assert sorted(task.id for task in finished) == sorted(ids)
    by_worker = dict(ledger.claims)
    for task in finished:
        assert task.attempts == 1, task
        assert task.worker_id in ("", by_worker[task.id])
        assert task.result == struct({"worker": by_worker[task.id], "task": task.id})
    assert listed(owner, status=pb.TASK_STATUS_QUEUED) == []
    assert listed(owner, status=pb.TASK_STATUS_RUNNING) == []
    counted = stats(tasks_of(workers[0]))
    assert (counted.queued, counted.running, counted.completed, counted.failed, counted.cancelled) == (
        0,
        0,
        TASKS,
        0,
        0,
    )
    assert counted.oldest_queued_age_seconds == 0


def test_waiting_workers_each_get_a_different_task(client: Client, workers: list[Client]) -> None:
    """Workers blocked in ClaimTask(wait_seconds) while tasks arrive: none handed out twice."""
    owner = tasks_of(client)
    ledger = Ledger()
    crew = Crew(workers, ledger, wait=2)
    crew.go()
    ids = [create(owner, "trickle", data={"n": n}).id for n in range(40)]
    crew.join()

    assert_each_once(ledger, ids)
    counted = stats(owner)
    assert (counted.queued, counted.running, counted.completed) == (0, 0, 40)
