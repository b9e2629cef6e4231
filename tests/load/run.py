"""`make load`: a realistic mix from many concurrent clients against a crewdb server, then a reconciliation.

The server runs in its own process on a temp folder, on loopback; the load runs for a set time
(`--seconds`) and at most `--max-calls` calls, every call has a deadline and the whole run a
hard limit. Each virtual user signs in, then loops over a weighted mix: messages added and
read, conversations created and listed, knowledge-base documents added and searched, tasks
created, sign-ins and token refreshes; workers claim and complete tasks; watchers keep
WatchMessages streams open. Afterwards the server is stopped and its files are read directly:
every acknowledged message, task and document is there, counts match (message counts, chunk
counts in SQLite and in Chroma), every task was delivered once and ended completed or still
queued, and every watcher was sent every message of its conversation. Every well-formed call
must succeed: the error count must be 0.
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

import chromadb
import grpc
from chromadb.config import Settings as ChromaSettings
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
COLLECTION = "agent-knowledge"  # the default collection (CHROMA_COLLECTION is not passed on)
TOPICS = ["refunds", "shipping", "passwords", "invoices", "backups", "holidays", "parcels", "support"]
Metadata = tuple[tuple[str, str], ...]


RECONCILED = (
    "every acknowledged write found, counts match (SQLite and Chroma), every task handed out once and "
    "ended completed or queued, every watcher sent every message"
)
CALL_TIMEOUT = 30.0  # seconds any one call may take; a slower one counts as an error
WATCH_CATCH_UP = 10.0  # seconds a watcher may take, after the users stop, to be sent the last messages


@dataclass
class Tally:
    """Everything the clients saw: latencies per call type, errors, and what was acknowledged."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[str] = field(default_factory=Counter)
    messages: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    tasks_created: set[str] = field(default_factory=set)
    tasks_claimed: Counter[str] = field(default_factory=Counter)
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


@dataclass
class Session:
    """One virtual user's sign-in: the bearer metadata, and the refresh token that renews it."""

    user_id: str
    auth: Metadata
    refresh_token: str

    def renew(self, access_token: str, refresh_token: str) -> None:
        self.auth = (("authorization", f"Bearer {access_token}"),)
        self.refresh_token = refresh_token


async def _sign_in(users: users_grpc.UserServiceAsyncStub, name: str, tally: Tally) -> Session | None:
    request = users_pb.LoginRequest(email_or_username=name, password=PASSWORD)
    login = await tally.timed("Login", users.Login(request, timeout=CALL_TIMEOUT))
    if login is None:
        return None
    return Session(login.user.id, (("authorization", f"Bearer {login.access_token}"),), login.refresh_token)


@dataclass
class Load:
    """What the virtual users share: where, until when, how many calls are left, and the watchers."""

    address: str
    tally: Tally
    stop_at: float
    budget: int
    users_done: asyncio.Event = field(default_factory=asyncio.Event)
    watchers: list[asyncio.Task[None]] = field(default_factory=list)
    watched: dict[str, str] = field(default_factory=dict)  # conversation -> the message watched after

    def going(self) -> bool:
        self.budget -= 1
        return time.monotonic() < self.stop_at and self.budget >= 0


async def _user(index: int, load: Load, *, watch: bool) -> None:
    rng = random.Random(index)
    name = f"user{index}"
    tally = load.tally
    async with aio.insecure_channel(load.address) as channel:
        chats = pb_grpc.ConversationServiceStub(channel)
        tasks = tasks_grpc.TaskServiceStub(channel)
        vectors = vectors_grpc.VectorServiceStub(channel)
        users = users_grpc.UserServiceStub(channel)
        registration = users_pb.RegisterRequest(email=f"{name}@example.com", username=name, password=PASSWORD)
        await tally.timed("Register", users.Register(registration, timeout=CALL_TIMEOUT))
        session = await _sign_in(users, name, tally)
        if session is None:
            return
        created = await tally.timed(
            "CreateConversation",
            chats.CreateConversation(
                pb.CreateConversationRequest(title="load"), metadata=session.auth, timeout=CALL_TIMEOUT
            ),
        )
        if created is None:
            return
        conversations = [created.id]
        if watch:
            # The watch replays from a first message, so it misses nothing however late it starts.
            first = await tally.timed(
                "AddMessage",
                chats.AddMessage(
                    pb.AddMessageRequest(
                        conversation_id=created.id, role=pb.MESSAGE_ROLE_SYSTEM, content="hi"
                    ),
                    metadata=session.auth,
                    timeout=CALL_TIMEOUT,
                ),
            )
            if first is None:
                return
            tally.messages[created.id].add(first.id)
            load.watched[created.id] = first.id
            load.watchers.append(asyncio.create_task(_watcher(load, session.auth, created.id)))

        async def add_message() -> None:
            target = rng.choice(conversations)
            request = pb.AddMessageRequest(
                conversation_id=target, role=pb.MESSAGE_ROLE_USER, content=f"about {rng.choice(TOPICS)} " * 8
            )
            message = await tally.timed(
                "AddMessage", chats.AddMessage(request, metadata=session.auth, timeout=CALL_TIMEOUT)
            )
            if message is not None:
                tally.messages[target].add(message.id)

        async def list_messages() -> None:
            request = pb.ListMessagesRequest(conversation_id=rng.choice(conversations), page_size=20)
            await tally.timed(
                "ListMessages", chats.ListMessages(request, metadata=session.auth, timeout=CALL_TIMEOUT)
            )

        async def get_conversation() -> None:
            request = pb.GetConversationRequest(id=rng.choice(conversations))
            await tally.timed(
                "GetConversation", chats.GetConversation(request, metadata=session.auth, timeout=CALL_TIMEOUT)
            )

        async def create_conversation() -> None:
            request = pb.CreateConversationRequest(title=f"chat {len(conversations)}")
            made = await tally.timed(
                "CreateConversation",
                chats.CreateConversation(request, metadata=session.auth, timeout=CALL_TIMEOUT),
            )
            if made is not None:
                conversations.append(made.id)

        async def list_conversations() -> None:
            request = pb.ListConversationsRequest(page_size=20)
            await tally.timed(
                "ListConversations",
                chats.ListConversations(request, metadata=session.auth, timeout=CALL_TIMEOUT),
            )

        async def add_document() -> None:
            topic = rng.choice(TOPICS)
            document = vectors_pb.DocumentInput(
                id=f"{topic}-{rng.randrange(20)}", text=f"Notes about {topic}. " * rng.randint(5, 60)
            )
            document.metadata.update({"topic": topic})
            request = vectors_pb.AddDocumentsRequest(documents=[document])
            if await tally.timed(
                "AddDocuments", vectors.AddDocuments(request, metadata=session.auth, timeout=60)
            ):
                tally.documents[session.user_id].add(document.id)

        async def search() -> None:
            request = vectors_pb.SearchRequest(query=f"what do we say about {rng.choice(TOPICS)}", top_k=5)
            await tally.timed("Search", vectors.Search(request, metadata=session.auth, timeout=CALL_TIMEOUT))

        async def create_task() -> None:
            request = tasks_pb.CreateTaskRequest(type="load")
            request.data.update({"n": rng.randrange(1000)})
            task = await tally.timed(
                "CreateTask", tasks.CreateTask(request, metadata=session.auth, timeout=CALL_TIMEOUT)
            )
            if task is not None:
                tally.tasks_created.add(task.id)

        async def get_me() -> None:
            await tally.timed(
                "GetMe", users.GetMe(users_pb.GetMeRequest(), metadata=session.auth, timeout=CALL_TIMEOUT)
            )

        async def refresh() -> None:
            request = users_pb.RefreshTokenRequest(refresh_token=session.refresh_token)
            renewed = await tally.timed("RefreshToken", users.RefreshToken(request, timeout=CALL_TIMEOUT))
            if renewed is not None:
                session.renew(renewed.access_token, renewed.refresh_token)

        async def sign_in_again() -> None:
            again = await _sign_in(users, name, tally)
            if again is not None:
                session.renew(again.auth[0][1].removeprefix("Bearer "), again.refresh_token)

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
            (refresh, 2),
            (sign_in_again, 1),
        ]
        actions = [action for action, _ in mix]
        weights = [weight for _, weight in mix]
        while load.going():
            await rng.choices(actions, weights)[0]()


async def _worker(index: int, address: str, auth: Metadata, tally: Tally, stop_at: float) -> None:
    async with aio.insecure_channel(address) as channel:
        tasks = tasks_grpc.TaskServiceStub(channel)
        worker_id = f"worker-{index}"
        while time.monotonic() < stop_at + 2:  # drains a little after the users stop
            request = tasks_pb.ClaimTaskRequest(worker_id=worker_id, lease_seconds=60, wait_seconds=1)
            started = time.perf_counter()
            claimed = await tally.timed("ClaimTask", tasks.ClaimTask(request, metadata=auth, timeout=10))
            if claimed is None or not claimed.HasField("task"):
                # An empty claim waited for work (up to wait_seconds): not a latency of claiming.
                if claimed is not None:
                    tally.latencies["ClaimTask"].pop()
                    tally.latencies["ClaimTask (none ready, long poll)"].append(time.perf_counter() - started)
                continue
            tally.tasks_claimed[claimed.task.id] += 1
            done = tasks_pb.CompleteTaskRequest(id=claimed.task.id, worker_id=worker_id)
            if (
                await tally.timed(
                    "CompleteTask", tasks.CompleteTask(done, metadata=auth, timeout=CALL_TIMEOUT)
                )
                is not None
            ):
                tally.tasks_completed[claimed.task.id] += 1


async def _watcher(load: Load, auth: Metadata, conversation: str) -> None:
    """Watches until the users stop and it has been sent every acknowledged message (or gives up)."""
    tally, users_done = load.tally, load.users_done
    async with aio.insecure_channel(load.address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        request = pb.WatchMessagesRequest(
            conversation_id=conversation, after_message_id=load.watched[conversation]
        )
        stream = stub.WatchMessages(request, metadata=auth)
        seen = tally.seen[conversation]
        seen.add(load.watched[conversation])  # acknowledged before the watch: it is not sent again

        async def watch() -> None:
            async for event in stream:
                tally.streamed += 1
                seen.add(event.message.id)
                if users_done.is_set() and tally.messages[conversation] <= seen:
                    return

        async def give_up() -> None:
            await users_done.wait()
            await asyncio.sleep(WATCH_CATCH_UP)

        watching, deadline = asyncio.create_task(watch()), asyncio.create_task(give_up())
        try:
            await asyncio.wait([watching, deadline], return_when=asyncio.FIRST_COMPLETED)
        finally:
            deadline.cancel()
            watching.cancel()
            stream.cancel()


def _reconcile(data: Path, tally: Tally) -> list[str]:
    """What the server's files hold against what the clients were told; every problem found."""
    problems: list[str] = []
    with sqlite3.connect(f"file:{data / 'app.db'}?mode=ro", uri=True) as db:
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
        problems += _task_problems(tally, statuses)
        problems += _document_problems(db, data / "vectordb", tally)
        for conversation, seen in tally.seen.items():
            stored = {
                row[0]
                for row in db.execute("SELECT id FROM messages WHERE conversation_id = ?", (conversation,))
            }
            if seen - stored:
                problems.append(
                    f"watchers of {conversation} were sent {len(seen - stored)} messages never stored"
                )
            if tally.messages[conversation] - seen:
                missed = len(tally.messages[conversation] - seen)
                problems.append(f"watchers of {conversation} were never sent {missed} acknowledged messages")
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        if integrity != "ok":
            problems.append(f"integrity_check: {integrity}")
    db.close()
    return problems


def _task_problems(tally: Tally, statuses: dict[str, str]) -> list[str]:
    """Each acknowledged task stored, handed out at most once, and ended completed or still queued."""
    problems: list[str] = []
    if lost := tally.tasks_created - set(statuses):
        problems.append(f"{len(lost)} acknowledged tasks missing")
    if twice := [task for task, times in tally.tasks_claimed.items() if times > 1]:
        problems.append(f"{len(twice)} tasks delivered to workers more than once")
    if wrong := [task for task in tally.tasks_completed if statuses.get(task) != "completed"]:
        problems.append(f"{len(wrong)} tasks acknowledged as completed are not completed")
    if stuck := Counter(s for s in statuses.values() if s not in ("completed", "queued")):
        problems.append(f"tasks neither completed nor queued after the drain: {dict(stuck)}")
    if unclaimed := {t for t, s in statuses.items() if s == "completed"} - set(tally.tasks_claimed):
        problems.append(f"{len(unclaimed)} tasks completed that no worker was handed")
    return problems


def _document_problems(db: sqlite3.Connection, vectordb: Path, tally: Tally) -> list[str]:
    """Acknowledged documents stored, and SQLite's chunks exactly the ones Chroma holds."""
    problems: list[str] = []
    expected: dict[str, set[str]] = defaultdict(set)
    for owner, doc, count, revision in db.execute(
        "SELECT owner_id, id, chunk_count, revision FROM documents"
    ).fetchall():
        expected[owner] |= {f"{doc}#{i}@{revision}" for i in range(count)}
        rows = db.execute(
            "SELECT count(*) FROM document_chunks WHERE owner_id = ? AND document_id = ?", (owner, doc)
        ).fetchone()[0]
        if rows != count:
            problems.append(f"document {doc} of {owner}: chunk_count {count}, {rows} chunk rows")
    for owner, ids in tally.documents.items():
        stored = {row[0] for row in db.execute("SELECT id FROM documents WHERE owner_id = ?", (owner,))}
        if ids - stored:
            problems.append(f"{len(ids - stored)} acknowledged documents missing for {owner}")
    chroma = chromadb.PersistentClient(str(vectordb), settings=ChromaSettings(anonymized_telemetry=False))
    held = {c.name: set(c.get(include=[])["ids"]) for c in chroma.list_collections()}
    for owner, keys in expected.items():
        in_chroma = held.get(f"{COLLECTION}.{owner}", set())
        if keys != in_chroma:
            problems.append(
                f"Chroma and SQLite disagree for {owner}: {len(keys - in_chroma)} chunks missing in Chroma, "
                f"{len(in_chroma - keys)} stray"
            )
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
            **{k: v for k, v in os.environ.items() if not k.startswith(("CREWDB_", "CHROMA_"))},
            "CREWDB_HOST": "127.0.0.1",  # loopback only, whatever the shell says
            "CREWDB_PORT": str(port),
            "DATABASE_PATH": f"{data}/app.db",
            "VECTOR_DB_PATH": f"{data}/vectordb",
            "CREWDB_LOG_LEVEL": "WARNING",
            "JWT_SECRET": secrets.token_urlsafe(48),
        }
        await asyncio.to_thread(_admin, env)  # create-admin runs its own event loop
        address = f"127.0.0.1:{port}"
        with process([sys.executable, "-m", "crewdb", "serve"], env=env):
            await wait_until_serving(address, health=True)
            async with aio.insecure_channel(address) as channel:
                login = await users_grpc.UserServiceStub(channel).Login(
                    users_pb.LoginRequest(email_or_username="loadadmin", password=PASSWORD),
                    timeout=CALL_TIMEOUT,
                )
                admin: Metadata = (("authorization", f"Bearer {login.access_token}"),)
            started = time.monotonic()
            load = Load(address, tally, started + args.seconds, args.max_calls)

            async def users_then_watchers() -> None:
                await asyncio.gather(*(_user(i, load, watch=i < args.watchers) for i in range(args.users)))
                load.users_done.set()  # every acknowledgement is in: the watchers catch up, then end
                await asyncio.gather(*load.watchers)

            # A hard limit on the whole run: the calls' own deadlines, the drain and the catch-up.
            async with asyncio.timeout(args.seconds + CALL_TIMEOUT + WATCH_CATCH_UP + 60):
                await asyncio.gather(
                    users_then_watchers(),
                    *(_worker(i, address, admin, tally, load.stop_at) for i in range(args.workers)),
                )
            elapsed = time.monotonic() - started
        problems = _reconcile(Path(data), tally)
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
        f"reconciliation: {RECONCILED if not problems else 'FAILED'}.",
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
        f"Tasks: {len(tally.tasks_created):,} created, {sum(tally.tasks_claimed.values()):,} handed to "
        f"workers, {sum(tally.tasks_completed.values()):,} completed; "
        f"{tally.streamed:,} messages streamed to watchers.",
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
    # At most 30: registrations are limited to 30 per address per 10 minutes.
    parser.add_argument("--users", type=int, default=16, choices=range(1, 31), metavar="1..30")
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
