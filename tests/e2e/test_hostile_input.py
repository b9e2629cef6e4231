"""Hostile input to every RPC of every service: a typed answer, a live server and nothing half-written."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, json_format, message_factory, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crewdb.api.middleware import access_of
from crewdb.client import Client
from crewdb.config import Settings
from crewdb.models import UserRole
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
from tests.conftest import PASSWORD, TEST_SECRET, RunningServer, sign_in, start_server
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
STREAM_SECONDS = 1.0
STREAM_MESSAGES = 3
MAX_REQUEST_BYTES = 4 * 1024 * 1024

HOSTILE = settings(
    max_examples=40,
    deadline=None,
    database=None,
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


class HashEmbedder:
    """A fast stand-in for the embedding model: 16 dimensions derived from a hash of the text.

    The real model embeds a few chunks a second on a test machine, and hostile documents run to
    hundreds of chunks; what is under test here is everything around the model."""

    model = "hash-16"
    dimension = 16

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors = []
        for text in texts:
            raw = [b - 127.5 for b in hashlib.sha256(text.encode("utf-8", "replace")).digest()[:16]]
            norm = math.sqrt(sum(x * x for x in raw))
            vectors.append([x / norm for x in raw])
        return vectors

    def probe(self) -> dict[str, Any]:
        return {"model": self.model, "dimension": self.dimension}

    def close(self) -> None:
        pass


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
            said = conversations.AddMessage(
                conversation_service_pb2.AddMessageRequest(
                    conversation_id=kept.id, role=conversation_service_pb2.MESSAGE_ROLE_USER, content="seed"
                )
            )
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
    folder = tmp_path_factory.mktemp("hostile")
    config = Settings(
        host="127.0.0.1",
        port=0,
        database_path=folder / "app.db",
        vector_db_path=folder / "vectordb",
        health_check_interval=0.2,
        shutdown_grace=1.0,
        jwt_secret=TEST_SECRET,
    )
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


def _finish(call: Any, streaming: bool, timeout: float, request: object, metadata: Metadata) -> None:
    if not streaming:
        call(request, timeout=timeout, metadata=metadata)
        return
    responses = call(request, timeout=timeout, metadata=metadata)
    for _ in itertools.islice(responses, STREAM_MESSAGES):
        pass
    responses.cancel()


def call_typed(world: World, method: MethodDescriptor, request: Message) -> grpc.RpcError | None:
    """Calls `method` through its generated stub; the error it ended with, if any."""
    channel, metadata = world.caller(method)
    stub = STUBS[method.containing_service.name](channel)
    timeout = STREAM_SECONDS if _cut(method, request) else CALL_SECONDS
    try:
        _finish(getattr(stub, method.name), method.server_streaming, timeout, request, metadata)
    except grpc.RpcError as error:
        return error
    return None


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


def _rich(error: grpc.Call) -> bool:
    """Whether crewdb's google.rpc.Status reached the client and agrees with the call's code."""
    raw = dict(error.trailing_metadata() or ()).get(DETAILS_KEY)
    return isinstance(raw, bytes) and status_pb2.Status.FromString(raw).code == error.code().value[0]


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
    if method.containing_service.name == "VectorService":
        allowed.add(C.UNAVAILABLE)
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
    if code != C.INVALID_ARGUMENT or problem.reason == "MALFORMED_REQUEST":
        return
    assert problem.fields, f"{method.full_name} INVALID_ARGUMENT ({problem.message}) names no field"
    names = {field.name for field in method.input_type.fields}
    for path in problem.fields:
        assert _top_field(path) in names, f"{method.full_name} blames {path!r}, not a request field"


def _method_id(method: MethodDescriptor) -> str:
    return f"{method.containing_service.name}.{method.name}"


# --- the tests -------------------------------------------------------------------------------------


def test_every_service_is_called_through_its_generated_stub() -> None:
    services = {method.containing_service.name for method in METHODS}
    assert (
        services
        == set(STUBS)
        == {"ConversationService", "UserService", "TaskService", "VectorService", "SystemService"}
    )


@pytest.mark.parametrize("method", METHODS, ids=_method_id)
def test_hostile_field_values_get_a_typed_answer_and_leave_nothing_half_written(
    world: World, method: MethodDescriptor
) -> None:
    requests = request_messages(method.input_type, world.seed(method.containing_service.name))

    @HOSTILE
    @given(request=requests)
    def answers(request: Message) -> None:
        assert_typed_answer(method, request, call_typed(world, method, request))

    answers()
    world.assert_sound()


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
        error = call_typed(world, ADD_DOCUMENTS, request)
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
        error = call_typed(world, ADD_MESSAGE, request)
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
