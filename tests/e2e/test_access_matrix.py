"""Access control end to end, read from the protos: every RPC's declared access, other users' ids, secrets."""

from __future__ import annotations

import hashlib
import importlib
import logging
import pkgutil
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, message_factory, struct_pb2, text_format
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.rpc import status_pb2
from jose import jwt

import crewdb.v1
from crewdb.api.middleware import access_of
from crewdb.client import Client
from crewdb.models import UserRole
from crewdb.v1 import conversation_service_pb2 as cpb
from crewdb.v1 import options_pb2
from crewdb.v1 import task_service_pb2 as tpb
from crewdb.v1 import user_service_pb2 as upb
from crewdb.v1 import vector_service_pb2 as vpb
from crewdb.v1.system_service_pb2_grpc import SystemServiceStub
from crewdb.v1.user_service_pb2_grpc import UserServiceStub
from crewdb.v1.vector_service_pb2_grpc import VectorServiceStub
from tests.conftest import PASSWORD, TEST_SECRET, RunningServer, settings_in, sign_in, start_server
from tests.rpc_errors import DETAILS_KEY, failure

TIMEOUT = 10.0
# A stream's first message or status; a live watch with nothing to send ends here instead.
STREAM_TIMEOUT = 3.0

OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
# How the middleware words a denial for lack of role ("this needs the admin role"); a denial
# about one object ("task 't' belongs to another account") is worded otherwise.
ROLE_DENIAL = re.compile(r"needs the [a-z ]+ role")
EXPECTED_SERVICES = {
    "crewdb.v1.ConversationService",
    "crewdb.v1.UserService",
    "crewdb.v1.TaskService",
    "crewdb.v1.VectorService",
    "crewdb.v1.SystemService",
}

Metadata = tuple[tuple[str, str], ...]


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


# --- the contract, read from every generated module -----------------------------------------


def declared_services() -> list[ServiceDescriptor]:
    """Every service of every `crewdb.v1.*_pb2` module: a service added later is found here."""
    found: list[ServiceDescriptor] = []
    for module in pkgutil.iter_modules(crewdb.v1.__path__):
        if module.name.endswith("_pb2"):
            generated = importlib.import_module(f"crewdb.v1.{module.name}")
            found.extend(generated.DESCRIPTOR.services_by_name.values())
    return sorted(found, key=lambda service: service.full_name)


SERVICES = declared_services()
METHODS = [method for service in SERVICES for method in service.methods]


@dataclass(frozen=True)
class Outcome:
    """How a call ended: OK, or a status code with crewdb's ErrorInfo reason."""

    code: grpc.StatusCode
    reason: str = ""
    message: str = ""

    @property
    def past_access_control(self) -> bool:
        """True unless the middleware refused the caller: no valid token, or not the role.
        (INVALID_CREDENTIALS for a wrong current password is an answer, not a refusal.)"""
        if self.code is UNAUTHENTICATED and self.reason == "UNAUTHENTICATED":
            return False
        return not self.role_denied

    @property
    def role_denied(self) -> bool:
        return (
            self.code is DENIED
            and self.reason == "PERMISSION_DENIED"
            and bool(ROLE_DENIAL.search(self.message))
        )

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason} {self.message!r}"


def outcome_of(call: Callable[[], object]) -> Outcome:
    try:
        call()
    except grpc.RpcError as error:
        if not isinstance(error, grpc.Call):
            raise
        if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:  # set by the client: no rich status
            return Outcome(error.code(), "", error.details() or "")
        problem = failure(error)
        return Outcome(problem.code, problem.reason, problem.message)
    return Outcome(OK)


def first(stream: Any) -> Message | None:
    """The first message of a server stream (None when it ends without one); then hangs up."""
    try:
        return next(stream)  # type: ignore[no-any-return]
    except StopIteration:
        return None
    finally:
        stream.cancel()


def invoke(channel: grpc.Channel, method: MethodDescriptor, metadata: Metadata) -> Outcome:
    """Calls `method` with its empty request through the generic stub API (unary or stream)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    request = message_factory.GetMessageClass(method.input_type)()
    decode = message_factory.GetMessageClass(method.output_type).FromString
    encode = type(request).SerializeToString
    if method.server_streaming:
        stream = channel.unary_stream(path, request_serializer=encode, response_deserializer=decode)
        return outcome_of(lambda: first(stream(request, metadata=metadata, timeout=STREAM_TIMEOUT)))
    unary = channel.unary_unary(path, request_serializer=encode, response_deserializer=decode)
    return outcome_of(lambda: unary(request, metadata=metadata, timeout=TIMEOUT))


# --- one server with an account of every role -----------------------------------------------

ROLES = {
    "user": UserRole.USER,
    "moderator": UserRole.MODERATOR,
    "worker": UserRole.WORKER,
    "admin": UserRole.ADMIN,
}


@dataclass(frozen=True)
class Matrix:
    server: RunningServer
    channel: grpc.Channel


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    """One server for the whole matrix, with an account per role (named after the role).

    Each test signs in afresh (see `tokens`), so a method that ends sessions cannot spoil
    another test's calls."""
    running, stop = start_server(settings_in(tmp_path_factory.mktemp("access-matrix")))
    try:
        for name, role in ROLES.items():
            running.call(running.app.accounts.register(f"{name}@example.com", name, PASSWORD, role=role))
        with grpc.insecure_channel(running.address) as channel:
            yield Matrix(running, channel)
    finally:
        stop()


def access_token(channel: grpc.Channel, username: str) -> str:
    request = upb.LoginRequest(email_or_username=username, password=PASSWORD)
    return UserServiceStub(channel).Login(request, timeout=TIMEOUT).access_token


def expired(token: str) -> str:
    """`token`'s claims, correctly signed, but expired a minute ago."""
    now = int(time.time())
    claims = dict(jwt.get_unverified_claims(token), jti=uuid.uuid4().hex, iat=now - 600, exp=now - 60)
    return jwt.encode(claims, TEST_SECRET, algorithm="HS256")


@pytest.fixture
def tokens(matrix: Matrix) -> dict[str, str]:
    """A fresh access token of every role (signed in at once: bcrypt is the slow part)."""
    with ThreadPoolExecutor(len(ROLES)) as pool:
        return dict(zip(ROLES, pool.map(partial(access_token, matrix.channel), ROLES), strict=True))


def test_the_matrix_enumerates_every_service_and_method() -> None:
    assert {service.full_name for service in SERVICES} == EXPECTED_SERVICES
    assert len(METHODS) >= 40, [method.full_name for method in METHODS]
    for service in SERVICES:
        assert len(service.methods) >= 2, service.full_name
    levels = {access_of(method) for method in METHODS}
    assert levels == {
        options_pb2.ACCESS_PUBLIC,
        options_pb2.ACCESS_USER,
        options_pb2.ACCESS_ADMIN,
        options_pb2.ACCESS_WORKER,
    }


def test_a_minted_token_is_refused_for_its_expiry_alone(matrix: Matrix, tokens: dict[str, str]) -> None:
    """The control for the expired token below: the same claims with a future expiry work."""
    now = int(time.time())
    claims = dict(jwt.get_unverified_claims(tokens["user"]), jti=uuid.uuid4().hex, iat=now, exp=now + 300)
    fresh = jwt.encode(claims, TEST_SECRET, algorithm="HS256")
    stub = UserServiceStub(matrix.channel)
    assert stub.GetMe(upb.GetMeRequest(), metadata=bearer(fresh), timeout=TIMEOUT).username == "user"
    stale = outcome_of(
        lambda: stub.GetMe(upb.GetMeRequest(), metadata=bearer(expired(fresh)), timeout=TIMEOUT)
    )
    assert (stale.code, stale.reason) == (UNAUTHENTICATED, "UNAUTHENTICATED")


ALLOWED_ROLES: dict[int, set[str]] = {
    options_pb2.ACCESS_USER: set(ROLES),
    options_pb2.ACCESS_WORKER: {"worker", "admin"},
    options_pb2.ACCESS_ADMIN: {"admin"},
}


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.full_name)
def test_every_method_enforces_the_access_its_proto_declares(
    matrix: Matrix, tokens: dict[str, str], method: MethodDescriptor
) -> None:
    access = access_of(method)
    credentials: dict[str, Metadata] = {
        "no token": (),
        "garbage token": bearer("this-is-not-a-jwt"),
        "expired token": bearer(expired(tokens["user"])),
        **{name: bearer(token) for name, token in tokens.items()},
    }
    outcomes = {name: invoke(matrix.channel, method, metadata) for name, metadata in credentials.items()}
    table = "\n".join(f"  {name}: {outcome}" for name, outcome in outcomes.items())
    for outcome in outcomes.values():
        # An empty request must get a typed answer from a mounted method, never a crash.
        assert outcome.code not in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL), table
        assert outcome.code is not grpc.StatusCode.UNKNOWN, table

    if access == options_pb2.ACCESS_PUBLIC:
        # Public methods ignore credentials: the same answer with any token or none.
        assert all(outcome.past_access_control for outcome in outcomes.values()), table
        answers = {(outcome.code, outcome.reason) for outcome in outcomes.values()}
        assert len(answers) == 1, table
        return
    for name in ("no token", "garbage token", "expired token"):
        assert (outcomes[name].code, outcomes[name].reason) == (UNAUTHENTICATED, "UNAUTHENTICATED"), table
    allowed = ALLOWED_ROLES[access]
    for name in ROLES:
        if name in allowed:
            assert outcomes[name].past_access_control, f"{name} was refused:\n{table}"
        else:
            assert outcomes[name].role_denied, f"{name} was not refused for its role:\n{table}"


# --- other users' ids -------------------------------------------------------------------------


@dataclass(frozen=True)
class Ids:
    """The ids of one account's objects (or of objects that do not exist)."""

    conversation: str
    first_message: str
    task: str
    document: str
    session: str
    refresh_token: str
    user: str


@dataclass
class World:
    server: RunningServer
    alice: Client
    bob: Client
    moderator: Client
    worker: Client
    channel: grpc.Channel

    def intruders(self) -> dict[str, Client]:
        return {"user": self.bob, "moderator": self.moderator, "worker": self.worker}


INTRUDER_ROLES = (
    ("alice", UserRole.USER),
    ("bob", UserRole.USER),
    ("mod", UserRole.MODERATOR),
    ("worker", UserRole.WORKER),
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """alice, bob (users), a moderator and a worker on one server; each test makes its own objects."""
    running, stop = start_server(settings_in(tmp_path_factory.mktemp("cross-user")))
    clients: list[Client] = []
    try:
        for name, role in INTRUDER_ROLES:
            clients.append(sign_in(running, name, role))
        with grpc.insecure_channel(running.address) as channel:
            alice, bob, moderator, worker = clients
            yield World(running, alice, bob, moderator, worker, channel)
    finally:
        for client in clients:
            client.close()
        stop()


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def new_marker() -> str:
    return f"quokka{uuid.uuid4().hex[:10]}"


def document(doc_id: str, text: str, metadata: dict[str, Any]) -> vpb.DocumentInput:
    return vpb.DocumentInput(id=doc_id, title=doc_id, text=text, metadata=struct(metadata))


def make_objects(client: Client, channel: grpc.Channel, username: str, marker: str) -> Ids:
    """A conversation with two messages, a task and a document, all saying `marker`; and a
    second session with its refresh token."""
    conversations = client.conversations
    conversation = conversations.CreateConversation(
        cpb.CreateConversationRequest(title=f"{username} plans {marker}"), timeout=TIMEOUT
    )
    said = [
        conversations.AddMessage(
            cpb.AddMessageRequest(
                conversation_id=conversation.id, role=cpb.MESSAGE_ROLE_USER, content=f"{text} {marker}"
            ),
            timeout=TIMEOUT,
        )
        for text in ("first words", "second words")
    ]
    task = client.tasks.CreateTask(
        tpb.CreateTaskRequest(
            type="report", data=struct({"secret": marker}), metadata=struct({"tag": marker})
        ),
        timeout=TIMEOUT,
    )
    doc_id = f"notes-{marker}"
    client.vectors.AddDocuments(
        vpb.AddDocumentsRequest(
            documents=[
                document(doc_id, f"{username} keeps the launch codes {marker}.", {"owner_tag": marker})
            ]
        ),
        timeout=TIMEOUT,
    )
    login = UserServiceStub(channel).Login(
        upb.LoginRequest(email_or_username=username, password=PASSWORD), timeout=TIMEOUT
    )
    session = str(jwt.get_unverified_claims(login.access_token)["sid"])
    return Ids(conversation.id, said[0].id, task.id, doc_id, session, login.refresh_token, login.user.id)


def missing_ids() -> Ids:
    fake = str(uuid.uuid4())
    return Ids(fake, str(uuid.uuid4()), fake, f"notes-{fake}", fake, "no-such-refresh-token", fake)


def snapshot(client: Client, ids: Ids) -> list[bytes]:
    """Everything the owner sees of her objects, to compare before and after the intruders."""
    conversations, tasks, vectors = client.conversations, client.tasks, client.vectors
    seen: list[Message] = [
        conversations.GetConversation(cpb.GetConversationRequest(id=ids.conversation), timeout=TIMEOUT),
        conversations.ListMessages(
            cpb.ListMessagesRequest(conversation_id=ids.conversation), timeout=TIMEOUT
        ),
        tasks.GetTask(tpb.GetTaskRequest(id=ids.task), timeout=TIMEOUT),
        vectors.GetDocument(vpb.GetDocumentRequest(id=ids.document), timeout=TIMEOUT),
        client.users.GetMe(upb.GetMeRequest(), timeout=TIMEOUT),
    ]
    sessions = client.users.ListSessions(upb.ListSessionsRequest(), timeout=TIMEOUT)
    return [message.SerializeToString(deterministic=True) for message in seen] + sorted(
        s.id.encode() for s in sessions.sessions
    )


Probe = Callable[[Client, Ids], object]


@dataclass(frozen=True)
class Attempt:
    """One call on alice's ids, and how it must end for a plain user, a moderator and a worker."""

    method: str
    probe: Probe
    user: Outcome
    moderator: Outcome
    worker: Outcome
    # Also true of a successful answer (e.g. an upsert under alice's id makes the caller's own).
    accepts: Callable[[Any], bool] = field(default=lambda reply: True)


READ = Outcome(OK)
ROLE = Outcome(DENIED, "PERMISSION_DENIED")
NOT_YOURS = Outcome(DENIED, "PERMISSION_DENIED")
NO_CONVERSATION = Outcome(NOT_FOUND, "CONVERSATION_NOT_FOUND")
NO_TASK = Outcome(NOT_FOUND, "TASK_NOT_FOUND")
NO_DOCUMENT = Outcome(NOT_FOUND, "DOCUMENT_NOT_FOUND")
NO_SESSION = Outcome(NOT_FOUND, "SESSION_NOT_FOUND")
LEASE_LOST = Outcome(PRECONDITION, "LEASE_LOST")


def watch_messages(c: Client, ids: Ids) -> object:
    request = cpb.WatchMessagesRequest(conversation_id=ids.conversation, after_message_id=ids.first_message)
    return first(c.conversations.WatchMessages(request, timeout=STREAM_TIMEOUT))


ATTEMPTS = [
    Attempt(
        "ConversationService.GetConversation",
        lambda c, ids: c.conversations.GetConversation(
            cpb.GetConversationRequest(id=ids.conversation), timeout=TIMEOUT
        ),
        NO_CONVERSATION,
        READ,
        NO_CONVERSATION,
    ),
    Attempt(
        "ConversationService.ListMessages",
        lambda c, ids: c.conversations.ListMessages(
            cpb.ListMessagesRequest(conversation_id=ids.conversation), timeout=TIMEOUT
        ),
        NO_CONVERSATION,
        READ,
        NO_CONVERSATION,
    ),
    Attempt(
        "ConversationService.ExportConversation",
        lambda c, ids: c.conversations.ExportConversation(
            cpb.ExportConversationRequest(id=ids.conversation), timeout=TIMEOUT
        ),
        NO_CONVERSATION,
        READ,
        NO_CONVERSATION,
    ),
    Attempt("ConversationService.WatchMessages", watch_messages, NO_CONVERSATION, READ, NO_CONVERSATION),
    Attempt(
        "ConversationService.UpdateConversationTitle",
        lambda c, ids: c.conversations.UpdateConversationTitle(
            cpb.UpdateConversationTitleRequest(id=ids.conversation, title="taken over"), timeout=TIMEOUT
        ),
        NO_CONVERSATION,
        NOT_YOURS,
        NO_CONVERSATION,
    ),
    Attempt(
        "ConversationService.AddMessage",
        lambda c, ids: c.conversations.AddMessage(
            cpb.AddMessageRequest(
                conversation_id=ids.conversation, role=cpb.MESSAGE_ROLE_USER, content="planted"
            ),
            timeout=TIMEOUT,
        ),
        NO_CONVERSATION,
        NOT_YOURS,
        NO_CONVERSATION,
    ),
    Attempt(
        "ConversationService.DeleteConversation",
        lambda c, ids: c.conversations.DeleteConversation(
            cpb.DeleteConversationRequest(id=ids.conversation), timeout=TIMEOUT
        ),
        NO_CONVERSATION,
        NOT_YOURS,
        NO_CONVERSATION,
    ),
    Attempt(
        "TaskService.GetTask",
        lambda c, ids: c.tasks.GetTask(tpb.GetTaskRequest(id=ids.task), timeout=TIMEOUT),
        NO_TASK,
        NO_TASK,
        READ,  # workers see every task
    ),
    Attempt(
        "TaskService.WatchTask",
        lambda c, ids: first(c.tasks.WatchTask(tpb.WatchTaskRequest(id=ids.task), timeout=STREAM_TIMEOUT)),
        NO_TASK,
        NO_TASK,
        READ,
    ),
    Attempt(
        "TaskService.CancelTask",
        lambda c, ids: c.tasks.CancelTask(tpb.CancelTaskRequest(id=ids.task), timeout=TIMEOUT),
        NO_TASK,
        NO_TASK,
        NOT_YOURS,  # a worker sees the task but may not cancel it
    ),
    Attempt(
        "TaskService.HeartbeatTask",
        lambda c, ids: c.tasks.HeartbeatTask(
            tpb.HeartbeatTaskRequest(id=ids.task, worker_id="intruder", progress=0.5), timeout=TIMEOUT
        ),
        ROLE,
        ROLE,
        LEASE_LOST,
    ),
    Attempt(
        "TaskService.CompleteTask",
        lambda c, ids: c.tasks.CompleteTask(
            tpb.CompleteTaskRequest(id=ids.task, worker_id="intruder", result=struct({"done": True})),
            timeout=TIMEOUT,
        ),
        ROLE,
        ROLE,
        LEASE_LOST,
    ),
    Attempt(
        "TaskService.FailTask",
        lambda c, ids: c.tasks.FailTask(
            tpb.FailTaskRequest(id=ids.task, worker_id="intruder", error="sabotage"), timeout=TIMEOUT
        ),
        ROLE,
        ROLE,
        LEASE_LOST,
    ),
    Attempt(
        "VectorService.GetDocument",
        lambda c, ids: c.vectors.GetDocument(vpb.GetDocumentRequest(id=ids.document), timeout=TIMEOUT),
        NO_DOCUMENT,
        NO_DOCUMENT,
        NO_DOCUMENT,
    ),
    Attempt(
        "VectorService.DeleteDocuments",
        lambda c, ids: c.vectors.DeleteDocuments(
            vpb.DeleteDocumentsRequest(ids=[ids.document]), timeout=TIMEOUT
        ),
        READ,  # unknown ids are ignored: nothing of alice's is deleted (the snapshot shows it)
        READ,
        READ,
        accepts=lambda reply: reply.deleted_count == 0,
    ),
    Attempt(
        "VectorService.DeleteDocuments",
        lambda c, ids: c.vectors.DeleteDocuments(
            vpb.DeleteDocumentsRequest(filter=struct({"owner_tag": ids.document.removeprefix("notes-")})),
            timeout=TIMEOUT,
        ),
        READ,
        READ,
        READ,
        accepts=lambda reply: reply.deleted_count == 0,
    ),
    Attempt(
        "VectorService.AddDocuments",
        lambda c, ids: c.vectors.AddDocuments(
            vpb.AddDocumentsRequest(
                documents=[document(ids.document, "an intruder's own text.", {"k": "v"})]
            ),
            timeout=TIMEOUT,
        ),
        READ,  # the caller's own document of that name: alice's is untouched
        READ,
        READ,
        accepts=lambda reply: not reply.documents[0].replaced,
    ),
    Attempt(
        "UserService.RevokeSession",
        lambda c, ids: c.users.RevokeSession(upb.RevokeSessionRequest(id=ids.session), timeout=TIMEOUT),
        NO_SESSION,
        NO_SESSION,
        NO_SESSION,
    ),
    Attempt(
        "UserService.Logout",
        lambda c, ids: c.users.Logout(upb.LogoutRequest(refresh_token=ids.refresh_token), timeout=TIMEOUT),
        NO_SESSION,
        NO_SESSION,
        NO_SESSION,
    ),
    Attempt(
        "UserService.GetUser",
        lambda c, ids: c.users.GetUser(upb.GetUserRequest(user_id=ids.user), timeout=TIMEOUT),
        ROLE,
        ROLE,
        ROLE,
    ),
    Attempt(
        "UserService.UpdateUserRole",
        lambda c, ids: c.users.UpdateUserRole(
            upb.UpdateUserRoleRequest(user_id=ids.user, role=upb.USER_ROLE_ADMIN), timeout=TIMEOUT
        ),
        ROLE,
        ROLE,
        ROLE,
    ),
    Attempt(
        "UserService.SetUserActive",
        lambda c, ids: c.users.SetUserActive(
            upb.SetUserActiveRequest(user_id=ids.user, active=False), timeout=TIMEOUT
        ),
        ROLE,
        ROLE,
        ROLE,
    ),
]

ID_FIELD = re.compile(r"(^|_)ids?$")
NOT_OBJECT_IDS = {"worker_id"}  # a worker names itself; it is not an object of anyone's


def names_an_object(message: Descriptor, depth: int = 0) -> bool:
    """True when a request (or a message inside it) has a field holding an object id."""
    for candidate in message.fields:
        if ID_FIELD.search(candidate.name) and candidate.name not in NOT_OBJECT_IDS:
            return True
        nested = candidate.message_type
        if nested is None or nested.full_name.startswith("google.") or depth >= 3:
            continue
        if names_an_object(nested, depth + 1):
            return True
    return False


def test_every_method_that_takes_an_object_id_is_tried_on_another_users_ids() -> None:
    taking_ids = {
        f"{method.containing_service.name}.{method.name}"
        for method in METHODS
        if names_an_object(method.input_type)
    }
    assert len(taking_ids) >= 15, taking_ids
    assert taking_ids <= {attempt.method for attempt in ATTEMPTS}


def anonymous(message: str, ids: Ids) -> str:
    values = (ids.conversation, ids.first_message, ids.task, ids.document, ids.session, ids.user)
    for value in sorted(values, key=len, reverse=True):  # `notes-<uuid>` before `<uuid>`
        message = message.replace(value, "<id>")
    return message


def try_attempt(attempt: Attempt, role: str, intruder: Client, alices: Ids, marker: str) -> str:
    """What is wrong with how `attempt` by `intruder` (of `role`) ended; empty when nothing is."""
    expected: Outcome = getattr(attempt, role)
    replies: list[object] = []
    got = outcome_of(lambda: replies.append(attempt.probe(intruder, alices)))
    label = f"{attempt.method} by {role} on alice's ids"
    if (got.code, got.reason) != (expected.code, expected.reason):
        return f"{label}: expected {expected.code.name} {expected.reason}, got {got}"
    if got.code is OK and not attempt.accepts(replies[0]):
        return f"{label}: answered {replies[0]}"
    if marker in anonymous(got.message, alices):  # the id asked for may be echoed; nothing else
        return f"{label}: the answer shows alice's data: {got}"
    if got.code is NOT_FOUND:
        # Exactly the answer for an id that does not exist: nothing tells the two apart.
        missing = missing_ids()
        gone = outcome_of(partial(attempt.probe, intruder, missing))
        if (gone.code, gone.reason, anonymous(gone.message, missing)) != (
            got.code,
            got.reason,
            anonymous(got.message, alices),
        ):
            return f"{label}: {got}, but for a missing id {gone}"
    return ""


def test_other_accounts_get_nothing_from_alices_ids_and_change_nothing(world: World) -> None:
    marker = new_marker()
    alices = make_objects(world.alice, world.channel, "alice", marker)
    before = snapshot(world.alice, alices)
    wrong = [
        problem
        for role, intruder in world.intruders().items()
        for attempt in ATTEMPTS
        if (problem := try_attempt(attempt, role, intruder, alices, marker))
    ]
    assert snapshot(world.alice, alices) == before
    assert not wrong, "\n".join(wrong)


def serialized(reply: Message) -> str:
    return text_format.MessageToString(reply)


def test_listings_and_searches_never_show_another_accounts_objects(world: World) -> None:
    marker, own = new_marker(), new_marker()
    alices = make_objects(world.alice, world.channel, "alice", marker)
    bobs = make_objects(world.bob, world.channel, "bob", own)
    bob = world.bob
    filters: list[dict[str, Any]] = [
        {"owner_tag": marker},
        {"owner_tag": {"$in": [marker, own]}},
        {"$or": [{"owner_tag": marker}, {"owner_tag": {"$ne": "nobody"}}]},
    ]
    searches: list[Message] = [
        bob.vectors.Search(vpb.SearchRequest(query=query, filter=struct(where), mode=mode), timeout=TIMEOUT)
        for query in (marker, "launch codes")
        for where in filters
        for mode in (vpb.SEARCH_MODE_SEMANTIC, vpb.SEARCH_MODE_KEYWORD, vpb.SEARCH_MODE_HYBRID)
    ]
    own_conversations = bob.conversations.ListConversations(
        cpb.ListConversationsRequest(page_size=200), timeout=TIMEOUT
    )
    own_tasks = bob.tasks.ListTasks(tpb.ListTasksRequest(page_size=200), timeout=TIMEOUT)
    own_documents = bob.vectors.ListDocuments(vpb.ListDocumentsRequest(page_size=200), timeout=TIMEOUT)
    listings: dict[str, Message] = {
        "ListConversations": own_conversations,
        "SearchConversations": bob.conversations.SearchConversations(
            cpb.SearchConversationsRequest(query="words", page_size=100), timeout=TIMEOUT
        ),
        "ListTasks": own_tasks,
        "ListDocuments": own_documents,
        "ListSessions": bob.users.ListSessions(upb.ListSessionsRequest(), timeout=TIMEOUT),
    }
    alices_ids = (alices.conversation, alices.first_message, alices.task, alices.session, alices.user)
    for name, reply in [*listings.items(), *(("Search", reply) for reply in searches)]:
        text = serialized(reply)
        assert marker not in text, f"{name} shows alice's objects:\n{text}"
        for alices_id in alices_ids:
            assert alices_id not in text, name
    # the controls: bob's own objects are there
    assert bobs.conversation in serialized(listings["ListConversations"])
    assert bobs.conversation in serialized(listings["SearchConversations"])
    assert bobs.task in serialized(listings["ListTasks"])
    assert bobs.document in serialized(listings["ListDocuments"])
    assert any(own in serialized(reply) for reply in searches)
    found = bob.conversations.SearchConversations(
        cpb.SearchConversationsRequest(query=marker), timeout=TIMEOUT
    )
    assert list(found.results) == []

    # totals count only bob's own
    conversations = bob.conversations.GetConversationStats(cpb.GetConversationStatsRequest(), timeout=TIMEOUT)
    assert conversations.total_conversations == len(own_conversations.conversations)
    queue = bob.tasks.GetQueueStats(tpb.GetQueueStatsRequest(), timeout=TIMEOUT)
    counts = queue.queued + queue.running + queue.completed + queue.failed + queue.cancelled
    assert counts == len(own_tasks.tasks)
    vectors = bob.vectors.GetVectorStats(vpb.GetVectorStatsRequest(), timeout=TIMEOUT)
    assert vectors.documents == len(own_documents.documents)


# --- secrets never leak -------------------------------------------------------------------------

NEW_PASSWORD = "an entirely different passphrase"  # noqa: S105 - a test fixture
WRONG_PASSWORD = "surely not the right passphrase"  # noqa: S105 - a test fixture
# Refused (over 72 bytes): the refusal must not echo it.
OVERLONG_PASSWORD = "overlong-secret-" * 6
TOKEN_FIELDS = ("access_token", "refresh_token")


@dataclass
class Transcript:
    """Everything a client saw: responses, metadata, error messages and details, as text."""

    seen: list[str] = field(default_factory=list)
    access_tokens: list[str] = field(default_factory=list)
    refresh_tokens: list[str] = field(default_factory=list)

    def call(self, rpc: Any, request: Message, metadata: Metadata = ()) -> Any:
        """Calls a unary `rpc` and records what came back; returns the reply (None on failure)."""
        try:
            reply, call = rpc.with_call(request, metadata=metadata, timeout=TIMEOUT)
        except grpc.RpcError as error:
            if not isinstance(error, grpc.Call):
                raise
            self.seen.append(f"{error.code()} {error.details()}")
            self.metadata(error.initial_metadata(), error.trailing_metadata())
            return None
        self.metadata(call.initial_metadata(), call.trailing_metadata())
        carried = type(reply)()
        carried.CopyFrom(reply)
        for name in TOKEN_FIELDS:  # the one place tokens belong: keep them, check the rest
            if name in carried.DESCRIPTOR.fields_by_name and getattr(carried, name):
                tokens = self.access_tokens if name == "access_token" else self.refresh_tokens
                tokens.append(getattr(carried, name))
                carried.ClearField(name)
        self.seen += [serialized(carried), repr(carried.SerializeToString())]
        return reply

    def stream(self, rpc: Any, request: Message, metadata: Metadata = ()) -> int:
        """Reads a server stream to its end and records every message; returns how many came."""
        call = rpc(request, metadata=metadata, timeout=TIMEOUT)
        replies = 0
        try:
            for reply in call:
                self.seen += [serialized(reply), repr(reply.SerializeToString())]
                replies += 1
        except grpc.RpcError as error:
            if not isinstance(error, grpc.Call):
                raise
            self.seen.append(f"{error.code()} {error.details()}")
        self.metadata(call.initial_metadata(), call.trailing_metadata())
        return replies

    def metadata(self, *groups: Any) -> None:
        for group in groups:
            for key, value in group or ():
                if key == DETAILS_KEY:
                    status = status_pb2.Status.FromString(value)
                    self.seen.append(text_format.MessageToString(status))  # Any details expanded
                    self.seen.append(json_format.MessageToJson(status))
                self.seen.append(f"{key}: {value!r}")


def stored_secrets(server: RunningServer) -> tuple[list[str], list[str]]:
    """The users table's password hashes and the refresh_tokens table's token hashes."""
    connection = sqlite3.connect(f"file:{server.settings.database_path}?mode=ro", uri=True)
    try:
        passwords = [row[0] for row in connection.execute("SELECT password_hash FROM users")]
        tokens = [row[0] for row in connection.execute("SELECT token_hash FROM refresh_tokens")]
    finally:
        connection.close()
    return passwords, tokens


USER_READS: dict[str, Callable[[str], Message]] = {
    "GetMe": lambda user_id: upb.GetMeRequest(),
    "ListSessions": lambda user_id: upb.ListSessionsRequest(),
    "ListUsers": lambda user_id: upb.ListUsersRequest(),
    "GetUser": lambda user_id: upb.GetUserRequest(user_id=user_id),
    "GetUserStats": lambda user_id: upb.GetUserStatsRequest(),
}


def test_no_response_error_or_log_line_carries_a_password_token_or_hash(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.call(server.app.accounts.register("root@example.com", "root", PASSWORD, role=UserRole.ADMIN))
    seen = Transcript()
    with grpc.insecure_channel(server.address) as channel:
        users = UserServiceStub(channel)

        def login(name: str, password: str) -> Any:
            return seen.call(users.Login, upb.LoginRequest(email_or_username=name, password=password))

        carol = seen.call(
            users.Register,
            upb.RegisterRequest(email="carol@example.com", username="carol", password=NEW_PASSWORD[::-1]),
        )
        hashes_at_registration, _ = stored_secrets(server)
        first_password = NEW_PASSWORD[::-1]
        assert (
            seen.call(
                users.Register,
                upb.RegisterRequest(email="dave@example.com", username="dave", password=OVERLONG_PASSWORD),
            )
            is None
        )
        assert login("carol", WRONG_PASSWORD) is None
        one, two = login("carol", first_password), login("carol", first_password)
        refreshed = seen.call(users.RefreshToken, upb.RefreshTokenRequest(refresh_token=one.refresh_token))
        change = upb.ChangePasswordRequest(current_password=WRONG_PASSWORD, new_password=NEW_PASSWORD)
        assert seen.call(users.ChangePassword, change, bearer(two.access_token)) is None
        change = upb.ChangePasswordRequest(current_password=first_password, new_password=NEW_PASSWORD)
        assert seen.call(users.ChangePassword, change, bearer(two.access_token)) is not None
        assert seen.call(users.ListSessions, upb.ListSessionsRequest(), bearer(two.access_token)) is not None
        # a spent refresh token, and one whose session the password change ended
        for spent in (one.refresh_token, refreshed.refresh_token):
            assert seen.call(users.RefreshToken, upb.RefreshTokenRequest(refresh_token=spent)) is None
        again = login("carol", NEW_PASSWORD)
        root = login("root", PASSWORD)
        user_service = next(s for s in SERVICES if s.name == "UserService")
        read_methods = {m.name for m in user_service.methods if m.name.startswith(("Get", "List"))}
        assert read_methods == set(USER_READS), "a new UserService read method: add it to USER_READS"
        for name, request in USER_READS.items():
            for caller in (again, root):
                seen.call(getattr(users, name), request(carol.id), bearer(caller.access_token))
        assert (
            seen.call(users.GetUser, upb.GetUserRequest(user_id=carol.id), bearer(root.access_token))
            is not None
        )
        # SystemService reports on the whole server: every method, as an admin and as a user,
        # with a document of carol's in the knowledge base for the vector export to carry.
        document = vpb.DocumentInput(id="notes", text="Carol keeps her notes here.", title="Notes")
        vectors = VectorServiceStub(channel)
        added = vpb.AddDocumentsRequest(documents=[document])
        assert seen.call(vectors.AddDocuments, added, bearer(again.access_token)) is not None
        system = SystemServiceStub(channel)
        system_service = next(s for s in SERVICES if s.name == "SystemService")
        for method in system_service.methods:
            empty = message_factory.GetMessageClass(method.input_type)()
            rpc = getattr(system, method.name)
            for caller in (root, again):
                if method.server_streaming:
                    replies = seen.stream(rpc, empty, bearer(caller.access_token))
                    assert caller is again or replies > 0, f"{method.name} sent nothing"
                elif caller is root:
                    assert seen.call(rpc, empty, bearer(caller.access_token)) is not None, method.name
                else:
                    seen.call(rpc, empty, bearer(caller.access_token))

    password_hashes, token_hashes = stored_secrets(server)
    password_hashes += hashes_at_registration
    refresh_hashes = [hashlib.sha256(token.encode()).hexdigest() for token in seen.refresh_tokens]
    assert set(refresh_hashes) <= set(token_hashes), "crewdb stores refresh tokens some other way"
    assert len(seen.access_tokens) >= 5
    assert len(seen.refresh_tokens) >= 5
    secrets = {
        "a password": [PASSWORD, first_password, NEW_PASSWORD, WRONG_PASSWORD, OVERLONG_PASSWORD],
        "an access token": seen.access_tokens + [token.split(".")[2] for token in seen.access_tokens],
        "a refresh token": seen.refresh_tokens,
        "a refresh token's hash": refresh_hashes + token_hashes,
        "a password hash": ["$2b$", "$2a$", *password_hashes],
        "the token signing secret": [TEST_SECRET],
    }
    records = [f"{record.getMessage()} {vars(record)!r}" for record in caplog.records]
    assert any("INVALID_CREDENTIALS" in line for line in records)  # the calls were logged
    assert any("carol" in text for text in seen.seen)  # and the transcript holds the answers
    assert any("document_chunks" in text for text in seen.seen)  # the health report among them
    assert any("Carol keeps her notes" in text for text in seen.seen)  # and the vector export
    places = {"responses": seen.seen, "logs": [*records, caplog.text]}
    for place, texts in places.items():
        for text in texts:
            for kind, values in secrets.items():
                for secret in values:
                    assert secret not in text, f"{kind} in the {place}: {text[:300]}"
