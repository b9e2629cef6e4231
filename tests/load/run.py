"""`make load`: a realistic mix from many concurrent clients against a crewdb server, then a reconciliation.

The server runs in its own process on a temp folder, on loopback; the load runs for a set time
(`--seconds`) and at most `--max-calls` calls. Each virtual user signs in, then loops over a
weighted mix: messages added and read, conversations created and listed, knowledge-base
documents added and searched, tasks created; workers claim and complete tasks; watchers keep
WatchMessages streams open. Afterwards the SQLite file is read directly and every acknowledged
write is looked for: messages, conversation counts, tasks (each completed exactly once, none
lost), documents. Every well-formed call must succeed: the error count must be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import secrets
import sqlite3
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from crewdb.cli import main as crewdb_main
from crewdb.v1 import conversation_service_pb2 as pb
from crewdb.v1 import conversation_service_pb2_grpc as pb_grpc
from crewdb.v1 import task_service_pb2 as tasks_pb
from crewdb.v1 import task_service_pb2_grpc as tasks_grpc
from crewdb.v1 import user_service_pb2 as users_pb
from crewdb.v1 import user_service_pb2_grpc as users_grpc
from crewdb.v1 import vector_service_pb2 as vectors_pb
from crewdb.v1 import vector_service_pb2_grpc as vectors_grpc
from tests.bench.run import LOAD_SECTION, REPORT, process, wait_until_serving
from tests.conftest import free_port

PASSWORD = "load test password, not a common one"  # noqa: S105 - throwaway accounts on a temp database
TOPICS = ["refunds", "shipping", "passwords", "invoices", "backups", "holidays", "parcels", "support"]
Metadata = tuple[tuple[str, str], ...]


@dataclass
class Tally:
    """Everything the clients saw: latencies per call type, errors, and what was acknowledged."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[str] = field(default_factory=Counter)
    messages: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    tasks_created: set[str] = field(default_factory=set)
    tasks_completed: Counter[str] = field(default_factory=Counter)
    documents: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    streamed: int = 0
    seen: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    calls: int = 0

    async def timed(self, name: str, call: Awaitable[Any]) -> Any:
        started = time.perf_counter()
        try:
            result = await call
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            self.errors[f"{name} {code.name if code else error}"] += 1
            return None
        finally:
            self.calls += 1
        self.latencies[name].append(time.perf_counter() - started)
        return result


async def _account(channel: aio.Channel, name: str, tally: Tally) -> tuple[str, Metadata]:
    users = users_grpc.UserServiceStub(channel)
    await users.Register(
        users_pb.RegisterRequest(email=f"{name}@example.com", username=name, password=PASSWORD)
    )
    login = await tally.timed(
        "Login", users.Login(users_pb.LoginRequest(email_or_username=name, password=PASSWORD))
    )
    return login.user.id, (("authorization", f"Bearer {login.access_token}"),)


async def _user(
    index: int, address: str, tally: Tally, stop_at: float, budget: list[int], *, watch: bool
) -> None:
    rng = random.Random(index)
    async with aio.insecure_channel(address) as channel:
        user_id, auth = await _account(channel, f"user{index}", tally)
        chats = pb_grpc.ConversationServiceStub(channel)
        tasks = tasks_grpc.TaskServiceStub(channel)
        vectors = vectors_grpc.VectorServiceStub(channel)
        users = users_grpc.UserServiceStub(channel)
        created = await tally.timed(
            "CreateConversation",
            chats.CreateConversation(pb.CreateConversationRequest(title="load"), metadata=auth),
        )
        conversations = [created.id]
        watcher = asyncio.create_task(_watcher(address, auth, created.id, tally, stop_at)) if watch else None

        async def add_message() -> None:
            target = rng.choice(conversations)
            request = pb.AddMessageRequest(
                conversation_id=target, role=pb.MESSAGE_ROLE_USER, content=f"about {rng.choice(TOPICS)} " * 8
            )
            message = await tally.timed("AddMessage", chats.AddMessage(request, metadata=auth))
            if message is not None:
                tally.messages[target].add(message.id)

        async def list_messages() -> None:
            request = pb.ListMessagesRequest(conversation_id=rng.choice(conversations), page_size=20)
            await tally.timed("ListMessages", chats.ListMessages(request, metadata=auth))

        async def get_conversation() -> None:
            request = pb.GetConversationRequest(id=rng.choice(conversations))
            await tally.timed("GetConversation", chats.GetConversation(request, metadata=auth))

        async def create_conversation() -> None:
            request = pb.CreateConversationRequest(title=f"chat {len(conversations)}")
            made = await tally.timed("CreateConversation", chats.CreateConversation(request, metadata=auth))
            if made is not None:
                conversations.append(made.id)

        async def list_conversations() -> None:
            request = pb.ListConversationsRequest(page_size=20)
            await tally.timed("ListConversations", chats.ListConversations(request, metadata=auth))

        async def add_document() -> None:
            topic = rng.choice(TOPICS)
            document = vectors_pb.DocumentInput(
                id=f"{topic}-{rng.randrange(20)}", text=f"Notes about {topic}. " * rng.randint(5, 60)
            )
            document.metadata.update({"topic": topic})
            request = vectors_pb.AddDocumentsRequest(documents=[document])
            if await tally.timed("AddDocuments", vectors.AddDocuments(request, metadata=auth, timeout=60)):
                tally.documents[user_id].add(document.id)

        async def search() -> None:
            request = vectors_pb.SearchRequest(query=f"what do we say about {rng.choice(TOPICS)}", top_k=5)
            await tally.timed("Search", vectors.Search(request, metadata=auth, timeout=30))

        async def create_task() -> None:
            request = tasks_pb.CreateTaskRequest(type="load")
            request.data.update({"n": rng.randrange(1000)})
            task = await tally.timed("CreateTask", tasks.CreateTask(request, metadata=auth))
            if task is not None:
                tally.tasks_created.add(task.id)

        async def get_me() -> None:
            await tally.timed("GetMe", users.GetMe(users_pb.GetMeRequest(), metadata=auth))

        mix: list[tuple[Callable[[], Awaitable[None]], int]] = [
            (add_message, 30),
            (list_messages, 20),
            (get_conversation, 10),
            (create_conversation, 3),
            (list_conversations, 5),
            (add_document, 2),
            (search, 10),
            (create_task, 12),
            (get_me, 8),
        ]
        actions = [action for action, _ in mix]
        weights = [weight for _, weight in mix]
        while time.monotonic() < stop_at and budget[0] > 0:
            budget[0] -= 1
            await rng.choices(actions, weights)[0]()
        if watcher is not None:
            await watcher


async def _worker(index: int, address: str, auth: Metadata, tally: Tally, stop_at: float) -> None:
    async with aio.insecure_channel(address) as channel:
        tasks = tasks_grpc.TaskServiceStub(channel)
        worker_id = f"worker-{index}"
        while time.monotonic() < stop_at + 2:  # drains a little after the users stop
            request = tasks_pb.ClaimTaskRequest(worker_id=worker_id, lease_seconds=60, wait_seconds=1)
            claimed = await tally.timed("ClaimTask", tasks.ClaimTask(request, metadata=auth, timeout=10))
            if claimed is None or not claimed.HasField("task"):
                continue
            done = tasks_pb.CompleteTaskRequest(id=claimed.task.id, worker_id=worker_id)
            if await tally.timed("CompleteTask", tasks.CompleteTask(done, metadata=auth)) is not None:
                tally.tasks_completed[claimed.task.id] += 1


async def _watcher(address: str, auth: Metadata, conversation: str, tally: Tally, stop_at: float) -> None:
    async with aio.insecure_channel(address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        stream = stub.WatchMessages(pb.WatchMessagesRequest(conversation_id=conversation), metadata=auth)
        try:
            async with asyncio.timeout(max(0.1, stop_at - time.monotonic())):
                async for event in stream:
                    tally.streamed += 1
                    tally.seen[conversation].add(event.message.id)
        except TimeoutError:
            pass
        finally:
            stream.cancel()


def _reconcile(database: Path, tally: Tally) -> list[str]:
    """What the database holds against what the clients were told; every problem found."""
    problems: list[str] = []
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        for conversation, ids in tally.messages.items():
            stored = {
                row[0]
                for row in db.execute("SELECT id FROM messages WHERE conversation_id = ?", (conversation,))
            }
            if ids - stored:
                problems.append(f"{len(ids - stored)} acknowledged messages missing in {conversation}")
            count = db.execute(
                "SELECT message_count FROM conversations WHERE id = ?", (conversation,)
            ).fetchone()[0]
            if count != len(stored):
                problems.append(f"conversation {conversation}: message_count {count}, {len(stored)} messages")
        statuses = dict(db.execute("SELECT id, status FROM tasks WHERE type = 'load'").fetchall())
        lost = tally.tasks_created - set(statuses)
        if lost:
            problems.append(f"{len(lost)} acknowledged tasks missing")
        twice = [task for task, times in tally.tasks_completed.items() if times > 1]
        if twice:
            problems.append(f"{len(twice)} tasks completed more than once")
        wrong = [task for task in tally.tasks_completed if statuses.get(task) != "completed"]
        if wrong:
            problems.append(f"{len(wrong)} tasks acknowledged as completed are not completed")
        for owner, ids in tally.documents.items():
            stored = {row[0] for row in db.execute("SELECT id FROM documents WHERE owner_id = ?", (owner,))}
            if ids - stored:
                problems.append(f"{len(ids - stored)} acknowledged documents missing for {owner}")
        for conversation, ids in tally.seen.items():
            stored = {
                row[0]
                for row in db.execute("SELECT id FROM messages WHERE conversation_id = ?", (conversation,))
            }
            if ids - stored:
                problems.append(
                    f"watchers of {conversation} were sent {len(ids - stored)} messages never stored"
                )
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        if integrity != "ok":
            problems.append(f"integrity_check: {integrity}")
    db.close()
    return problems


def _admin(env: dict[str, str]) -> None:
    """An admin (who may claim tasks), made with `crewdb create-admin` as an operator would."""
    stdin = sys.stdin
    sys.stdin = io.StringIO(PASSWORD + "\n")
    try:
        argv = [
            "create-admin",
            "--email",
            "load-admin@example.com",
            "--username",
            "loadadmin",
            "--password-stdin",
        ]
        with redirect_stdout(io.StringIO()):
            assert crewdb_main(argv, env) == 0
    finally:
        sys.stdin = stdin


async def run(args: argparse.Namespace) -> tuple[Tally, list[str], float]:
    tally = Tally()
    with tempfile.TemporaryDirectory() as data:
        port = free_port()
        env = {
            **os.environ,
            "DATABASE_PATH": f"{data}/app.db",
            "VECTOR_DB_PATH": f"{data}/vectordb",
            "CREWDB_PORT": str(port),
            "CREWDB_LOG_LEVEL": "WARNING",
            "JWT_SECRET": secrets.token_urlsafe(48),
        }
        await asyncio.to_thread(_admin, env)  # create-admin runs its own event loop
        address = f"127.0.0.1:{port}"
        with process([sys.executable, "-m", "crewdb", "serve"], env=env):
            await wait_until_serving(address, health=True)
            async with aio.insecure_channel(address) as channel:
                login = await users_grpc.UserServiceStub(channel).Login(
                    users_pb.LoginRequest(email_or_username="loadadmin", password=PASSWORD)
                )
                admin: Metadata = (("authorization", f"Bearer {login.access_token}"),)
            started = time.monotonic()
            stop_at = started + args.seconds
            budget = [args.max_calls]
            await asyncio.gather(
                *(
                    _user(i, address, tally, stop_at, budget, watch=i < args.watchers)
                    for i in range(args.users)
                ),
                *(_worker(i, address, admin, tally, stop_at) for i in range(args.workers)),
            )
            elapsed = time.monotonic() - started
        problems = _reconcile(Path(data) / "app.db", tally)
    return tally, problems, elapsed


def report(tally: Tally, problems: list[str], elapsed: float, args: argparse.Namespace) -> str:
    total = sum(len(v) for v in tally.latencies.values())
    lines = [
        LOAD_SECTION,
        "",
        f"{args.users} users ({min(args.watchers, args.users)} also watching their first conversation), "
        f"{args.workers} workers, for "
        f"{elapsed:.0f} s against one server process (tests/load/run.py), on "
        f"{os.cpu_count()} cores; run at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Sustained: {total / elapsed:,.0f} calls/s in all; errors: {sum(tally.errors.values())}; "
        f"reconciliation: {'every acknowledged write found, counts match' if not problems else 'FAILED'}.",
        "",
        "| call | calls | per second | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, latencies in sorted(tally.latencies.items()):
        ordered = sorted(latencies)
        p50 = ordered[len(ordered) // 2] * 1000
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
        lines.append(f"| {name} | {len(ordered):,} | {len(ordered) / elapsed:,.1f} | {p50:.1f} | {p99:.1f} |")
    lines += [
        "",
        f"Tasks: {len(tally.tasks_created):,} created, {sum(tally.tasks_completed.values()):,} completed "
        f"(none twice, none lost); {tally.streamed:,} messages streamed to watchers.",
    ]
    if tally.errors:
        lines += ["", "Errors:", *(f"- {name}: {count}" for name, count in tally.errors.most_common())]
    if problems:
        lines += ["", "Reconciliation problems:", *(f"- {problem}" for problem in problems)]
    return "\n".join(lines) + "\n"


def write_section(section: str) -> None:
    """Replaces the load section of docs/benchmarks.md (make bench keeps it)."""
    text = REPORT.read_text() if REPORT.exists() else "# Benchmarks\n"
    head = text.split(LOAD_SECTION)[0].rstrip() + "\n\n"
    REPORT.write_text(head + section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-calls", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--watchers", type=int, default=8, help="users that also watch their conversation")
    parser.add_argument("--no-write", action="store_true", help="print only; keep docs/benchmarks.md")
    args = parser.parse_args()
    tally, problems, elapsed = asyncio.run(run(args))
    section = report(tally, problems, elapsed, args)
    print(section)
    if not args.no_write:
        write_section(section)
    if problems or tally.errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
