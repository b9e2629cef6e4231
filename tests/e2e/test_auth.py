"""The auth attack suite end to end: bearer tokens, forged JWTs, registration, sign-in, throttling,
refresh rotation, sessions, password changes, admin RPCs and secrets that must never leak."""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message as ProtoMessage
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jose import jwt

from crewdb.client import Client
from crewdb.errors import CrewdbError
from crewdb.models import UserRole
from crewdb.services.throttle import ACCOUNT_FREE_FAILURES, ADDRESS_FREE_FAILURES, PAIR_FREE_FAILURES
from crewdb.v1 import conversation_service_pb2 as cpb
from crewdb.v1 import system_service_pb2 as system_pb
from crewdb.v1 import user_service_pb2 as pb
from crewdb.v1.conversation_service_pb2_grpc import ConversationServiceStub
from crewdb.v1.system_service_pb2_grpc import SystemServiceStub
from crewdb.v1.user_service_pb2_grpc import UserServiceStub
from tests.conftest import PASSWORD, TEST_SECRET, RunningServer, settings_in, start_server
from tests.rpc_errors import DETAILS_KEY, RpcFailure, failure

TIMEOUT = 5.0
# Logout, deactivation and the like must reach access tokens within a second; allow two.
REVOCATION_WINDOW = 2.0
NEW_PASSWORD = "a different passphrase entirely"  # noqa: S105 - a test fixture
WRONG_PASSWORD = "not the right passphrase at all"  # noqa: S105 - a test fixture

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

Metadata = tuple[tuple[str, str], ...]


# --- helpers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signed:
    """One session: the token pair that Login (or RefreshToken) returned."""

    access: str
    refresh: str
    user: pb.User

    @property
    def metadata(self) -> Metadata:
        return bearer(self.access)

    @property
    def session_id(self) -> str:
        return str(jwt.get_unverified_claims(self.access)["sid"])


def create_account(server: RunningServer, username: str, role: UserRole = UserRole.USER) -> None:
    """An account with PASSWORD, made the way `crewdb create-admin` makes one (any role)."""
    server.call(server.app.accounts.register(f"{username}@example.com", username, PASSWORD, role=role))


def register(users: UserServiceStub, username: str, password: str = PASSWORD) -> pb.User:
    request = pb.RegisterRequest(email=f"{username}@example.com", username=username, password=password)
    return users.Register(request, timeout=TIMEOUT)


def login(users: UserServiceStub, name: str, password: str = PASSWORD) -> Signed:
    reply = users.Login(pb.LoginRequest(email_or_username=name, password=password), timeout=TIMEOUT)
    return Signed(reply.access_token, reply.refresh_token, reply.user)


def refresh(users: UserServiceStub, refresh_token: str) -> Signed:
    reply = users.RefreshToken(pb.RefreshTokenRequest(refresh_token=refresh_token), timeout=TIMEOUT)
    return Signed(reply.access_token, reply.refresh_token, reply.user)


def me(users: UserServiceStub, access: str) -> pb.User:
    return users.GetMe(pb.GetMeRequest(), metadata=bearer(access), timeout=TIMEOUT)


def bearer(access: str) -> Metadata:
    return (("authorization", f"Bearer {access}"),)


def rpc_failure(call: Callable[[], object]) -> RpcFailure:
    """The failure of `call`, which must fail."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return failure(caught.value)


def assert_fails(call: Callable[[], object], code: grpc.StatusCode, reason: str) -> RpcFailure:
    problem = rpc_failure(call)
    assert (problem.code, problem.reason) == (code, reason), problem.message
    return problem


def assert_refused(users: UserServiceStub, access: str) -> None:
    """The access token no longer works, right now."""
    assert_fails(lambda: me(users, access), UNAUTHENTICATED, "UNAUTHENTICATED")


def assert_refused_soon(users: UserServiceStub, access: str) -> None:
    """The access token stops working within REVOCATION_WINDOW."""
    deadline = time.monotonic() + REVOCATION_WINDOW
    while True:
        try:
            me(users, access)
        except grpc.RpcError as error:
            problem = failure(error)
            assert (problem.code, problem.reason) == (UNAUTHENTICATED, "UNAUTHENTICATED")
            return
        assert time.monotonic() < deadline, "the access token still works after the session ended"
        time.sleep(0.05)


def assert_refresh_refused(users: UserServiceStub, refresh_token: str) -> None:
    assert_fails(lambda: refresh(users, refresh_token), UNAUTHENTICATED, "INVALID_REFRESH_TOKEN")


def assert_invalid_credentials(users: UserServiceStub, name: str, password: str) -> RpcFailure:
    return assert_fails(lambda: login(users, name, password), UNAUTHENTICATED, "INVALID_CREDENTIALS")


def assert_stream_ended(stream: Any, *endings: tuple[grpc.StatusCode, str]) -> None:
    """The stream's next event is its end with one of `endings` (code, reason), not a message."""
    try:
        leaked = next(stream)
    except grpc.RpcError as error:
        problem = failure(error)
        assert (problem.code, problem.reason) in endings, problem.message
    else:
        raise AssertionError(f"the stream went on and delivered {leaked.message.content!r}")


def retry_delay(error: grpc.RpcError) -> float:
    """Seconds of the google.rpc.RetryInfo in the failure's grpc-status-details-bin trailer."""
    assert isinstance(error, grpc.Call)
    raw = dict(error.trailing_metadata() or ())[DETAILS_KEY]
    assert isinstance(raw, bytes)
    for detail in status_pb2.Status.FromString(raw).details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    raise AssertionError("no RetryInfo in the status details")


def throttled(users: UserServiceStub, name: str, password: str = PASSWORD) -> float:
    """Asserts that signing in as `name` is throttled now; returns the RetryInfo delay."""
    with pytest.raises(grpc.RpcError) as caught:
        login(users, name, password)
    problem = failure(caught.value)
    assert (problem.code, problem.reason) == (EXHAUSTED, "TOO_MANY_ATTEMPTS"), problem.message
    return retry_delay(caught.value)


def fail_until_throttled(users: UserServiceStub, names: Callable[[int], str], limit: int = 8) -> int:
    """Wrong passwords for names(0), names(1), ... until the server throttles; returns how many
    attempts were answered INVALID_CREDENTIALS first."""
    for attempt in range(limit):
        try:
            login(users, names(attempt), WRONG_PASSWORD)
        except grpc.RpcError as error:
            problem = failure(error)
            if problem.code == EXHAUSTED:
                assert problem.reason == "TOO_MANY_ATTEMPTS"
                return attempt
            assert (problem.code, problem.reason) == (UNAUTHENTICATED, "INVALID_CREDENTIALS")
        else:
            raise AssertionError("a wrong password signed in")
    raise AssertionError(f"still not throttled after {limit} failed sign-ins")


def stored_hashes(server: RunningServer) -> list[str]:
    """Every bcrypt hash and refresh-token hash in the database file."""
    path: Path = server.settings.database_path
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        passwords = [row[0] for row in connection.execute("SELECT password_hash FROM users")]
        tokens = [row[0] for row in connection.execute("SELECT token_hash FROM refresh_tokens")]
    finally:
        connection.close()
    assert passwords
    assert tokens
    return passwords + tokens


@pytest.fixture
def users(channel: grpc.Channel) -> UserServiceStub:
    """UserService over a channel that sends no token unless a call passes one."""
    return UserServiceStub(channel)


# --- bearer metadata and forged tokens (one shared server: these calls change nothing) -------


@dataclass(frozen=True)
class Shared:
    server: RunningServer
    channel: grpc.Channel
    alice: Signed
    bob: Signed
    moderator: Signed


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """A server with alice and bob (users) and a moderator signed in; tests only read it.

    Module-scoped, unlike conftest's `server`, so that the ~100 refusal cases below need one
    server and three sign-ins instead of one each."""
    running, stop = start_server(settings_in(tmp_path_factory.mktemp("auth-shared")))
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = UserServiceStub(channel)
            create_account(running, "alice")
            create_account(running, "bob")
            create_account(running, "mod", UserRole.MODERATOR)
            yield Shared(running, channel, login(stub, "alice"), login(stub, "bob"), login(stub, "mod"))
    finally:
        stop()


Probe = Callable[[grpc.Channel, Metadata], object]

SIGNED_IN_RPCS: dict[str, Probe] = {
    "CreateConversation": lambda ch, md: ConversationServiceStub(ch).CreateConversation(
        cpb.CreateConversationRequest(title="t"), metadata=md, timeout=TIMEOUT
    ),
    "GetConversation": lambda ch, md: ConversationServiceStub(ch).GetConversation(
        cpb.GetConversationRequest(id="c"), metadata=md, timeout=TIMEOUT
    ),
    "ListConversations": lambda ch, md: ConversationServiceStub(ch).ListConversations(
        cpb.ListConversationsRequest(), metadata=md, timeout=TIMEOUT
    ),
    "SearchConversations": lambda ch, md: ConversationServiceStub(ch).SearchConversations(
        cpb.SearchConversationsRequest(query="q"), metadata=md, timeout=TIMEOUT
    ),
    "GetConversationStats": lambda ch, md: ConversationServiceStub(ch).GetConversationStats(
        cpb.GetConversationStatsRequest(), metadata=md, timeout=TIMEOUT
    ),
    "WatchMessages": lambda ch, md: next(
        ConversationServiceStub(ch).WatchMessages(
            cpb.WatchMessagesRequest(conversation_id="c"), metadata=md, timeout=TIMEOUT
        )
    ),
    "GetMe": lambda ch, md: UserServiceStub(ch).GetMe(pb.GetMeRequest(), metadata=md, timeout=TIMEOUT),
    "Logout": lambda ch, md: UserServiceStub(ch).Logout(
        pb.LogoutRequest(all_sessions=True), metadata=md, timeout=TIMEOUT
    ),
    "ChangePassword": lambda ch, md: UserServiceStub(ch).ChangePassword(
        pb.ChangePasswordRequest(current_password=PASSWORD, new_password=NEW_PASSWORD),
        metadata=md,
        timeout=TIMEOUT,
    ),
    "ListSessions": lambda ch, md: UserServiceStub(ch).ListSessions(
        pb.ListSessionsRequest(), metadata=md, timeout=TIMEOUT
    ),
    "ListUsers": lambda ch, md: UserServiceStub(ch).ListUsers(
        pb.ListUsersRequest(), metadata=md, timeout=TIMEOUT
    ),
    "UpdateUserRole": lambda ch, md: UserServiceStub(ch).UpdateUserRole(
        pb.UpdateUserRoleRequest(user_id="u", role=pb.USER_ROLE_ADMIN), metadata=md, timeout=TIMEOUT
    ),
}

# authorization header values built from a valid access token (None: no header at all)
BAD_AUTHORIZATION: dict[str, Callable[[str], str | None]] = {
    "no token": lambda valid: None,
    "garbage token": lambda valid: "Bearer this-is-not-a-jwt",
    "Bearer with nothing": lambda valid: "Bearer",
    "Basic scheme": lambda valid: f"Basic {valid}",
    "token without a scheme": lambda valid: valid,
}


@pytest.mark.parametrize("header", list(BAD_AUTHORIZATION))
@pytest.mark.parametrize("rpc", list(SIGNED_IN_RPCS))
def test_calls_without_a_valid_bearer_token_are_unauthenticated(
    shared: Shared, rpc: str, header: str
) -> None:
    value = BAD_AUTHORIZATION[header](shared.alice.access)
    metadata: Metadata = () if value is None else (("authorization", value),)
    assert_fails(lambda: SIGNED_IN_RPCS[rpc](shared.channel, metadata), UNAUTHENTICATED, "UNAUTHENTICATED")


def test_the_bearer_scheme_is_case_insensitive(shared: Shared) -> None:
    metadata = (("authorization", f"bearer {shared.alice.access}"),)
    reply = UserServiceStub(shared.channel).GetMe(pb.GetMeRequest(), metadata=metadata, timeout=TIMEOUT)
    assert reply.username == "alice"


def test_health_check_needs_no_token(shared: Shared) -> None:
    stub = health_pb2_grpc.HealthStub(shared.channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_public_methods_ignore_a_bad_token(server: RunningServer, users: UserServiceStub) -> None:
    create_account(server, "alice")
    reply = users.Login(
        pb.LoginRequest(email_or_username="alice", password=PASSWORD),
        metadata=(("authorization", "Bearer garbage"),),
        timeout=TIMEOUT,
    )
    assert reply.user.username == "alice"


# --- forged access tokens --------------------------------------------------------------------

ANOTHER_SECRET = "another-secret-that-is-just-as-long-0123456789abcdef"  # noqa: S105 - a test fixture
DROP = object()


@dataclass(frozen=True)
class Victim:
    """alice's real session, and bob's id to impersonate."""

    access: str
    refresh: str
    bob_id: str

    def claims(self, **changes: object) -> dict[str, Any]:
        """alice's real claims, with `changes` applied (DROP removes a claim)."""
        claims = dict(jwt.get_unverified_claims(self.access))
        claims["jti"] = uuid.uuid4().hex  # a token never seen, so no cache can answer for it
        for name, value in changes.items():
            if value is DROP:
                claims.pop(name)
            else:
                claims[name] = value
        return claims


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def sign(claims: dict[str, Any], secret: str = TEST_SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def alg_none(claims: dict[str, Any], signature: str = "") -> str:
    """An unsigned JWT built by hand: header {"alg":"none"} + claims + `signature` (empty)."""
    return f"{b64url_json({'alg': 'none', 'typ': 'JWT'})}.{b64url_json(claims)}.{signature}"


def with_payload(token: str, **changes: object) -> str:
    """`token` with claims changed in its payload and its original header and signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    return f"{header}.{b64url_json(claims)}.{signature}"


def _now() -> int:
    return int(time.time())


FORGERIES: dict[str, Callable[[Victim], str]] = {
    "signed with another secret": lambda v: sign(v.claims(), secret=ANOTHER_SECRET),
    "alg none": lambda v: alg_none(v.claims()),
    "alg none with the real signature kept": lambda v: alg_none(v.claims(), v.access.split(".")[2]),
    "HS512 with the server secret": lambda v: sign(v.claims(), algorithm="HS512"),
    "expired": lambda v: sign(v.claims(iat=_now() - 1000, exp=_now() - 60)),
    "wrong issuer": lambda v: sign(v.claims(iss="someone-else")),
    "no issuer": lambda v: sign(v.claims(iss=DROP)),
    "wrong audience": lambda v: sign(v.claims(aud="another.service.v1")),
    "no audience": lambda v: sign(v.claims(aud=DROP)),
    "typ refresh": lambda v: sign(v.claims(typ="refresh")),
    "no typ": lambda v: sign(v.claims(typ=DROP)),
    "no expiry": lambda v: sign(v.claims(exp=DROP)),
    "unknown session": lambda v: sign(v.claims(sid=str(uuid.uuid4()))),
    "another user's id on this session": lambda v: sign(v.claims(sub=v.bob_id)),
    "sub tampered, signature kept": lambda v: with_payload(v.access, sub=v.bob_id),
    "role tampered, signature kept": lambda v: with_payload(v.access, role="admin"),
    "signature cut short": lambda v: v.access[:-6],
    "refresh token as bearer": lambda v: v.refresh,
}


@pytest.fixture(scope="module")
def victim(shared: Shared) -> Victim:
    return Victim(shared.alice.access, shared.alice.refresh, shared.bob.user.id)


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_forged_access_token_is_unauthenticated(shared: Shared, victim: Victim, forgery: str) -> None:
    token = FORGERIES[forgery](victim)
    stub = UserServiceStub(shared.channel)
    conversations = ConversationServiceStub(shared.channel)
    assert_fails(
        lambda: stub.GetMe(pb.GetMeRequest(), metadata=bearer(token), timeout=TIMEOUT),
        UNAUTHENTICATED,
        "UNAUTHENTICATED",
    )
    assert_fails(
        lambda: conversations.ListConversations(
            cpb.ListConversationsRequest(), metadata=bearer(token), timeout=TIMEOUT
        ),
        UNAUTHENTICATED,
        "UNAUTHENTICATED",
    )


def test_a_token_made_like_the_servers_is_accepted(shared: Shared, victim: Victim) -> None:
    """The control for the forgeries: with the right secret and claims a hand-made token works,
    so each forgery above fails for its one defect."""
    token = sign(victim.claims(iat=_now(), exp=_now() + 300))
    assert me(UserServiceStub(shared.channel), token).username == "alice"


def test_the_role_claim_is_not_trusted(shared: Shared, victim: Victim) -> None:
    """Even a validly signed token claiming `admin` gets only the account's stored role."""
    token = sign(victim.claims(role="admin"))
    stub = UserServiceStub(shared.channel)
    assert_fails(
        lambda: stub.ListUsers(pb.ListUsersRequest(), metadata=bearer(token), timeout=TIMEOUT),
        DENIED,
        "PERMISSION_DENIED",
    )


# --- registration ----------------------------------------------------------------------------


def test_register_creates_an_active_account_with_the_user_role(users: UserServiceStub) -> None:
    user = register(users, "alice")
    assert (user.username, user.email, user.role, user.active) == (
        "alice",
        "alice@example.com",
        pb.USER_ROLE_USER,
        True,
    )
    assert user.id
    assert not user.HasField("last_login_at")


def test_register_ignores_a_role_smuggled_in_as_an_unknown_field(channel: grpc.Channel) -> None:
    request = pb.RegisterRequest(email="eve@example.com", username="eve", password=PASSWORD)
    role_admin = b"\x20\x03"  # field 4 (varint) = 3, as if RegisterRequest had `UserRole role = 4`
    raw_register: grpc.UnaryUnaryMultiCallable[bytes, pb.User] = channel.unary_unary(
        "/crewdb.v1.UserService/Register", response_deserializer=pb.User.FromString
    )
    user = raw_register(request.SerializeToString() + role_admin, timeout=TIMEOUT)
    assert user.role == pb.USER_ROLE_USER
    assert login(UserServiceStub(channel), "eve").user.role == pb.USER_ROLE_USER


def test_a_taken_email_or_username_is_already_exists_in_any_case(users: UserServiceStub) -> None:
    register(users, "alice")
    taken_email = pb.RegisterRequest(email="ALICE@Example.COM", username="alice2", password=PASSWORD)
    assert_fails(
        lambda: users.Register(taken_email, timeout=TIMEOUT), grpc.StatusCode.ALREADY_EXISTS, "EMAIL_TAKEN"
    )
    taken_name = pb.RegisterRequest(email="other@example.com", username="Alice", password=PASSWORD)
    assert_fails(
        lambda: users.Register(taken_name, timeout=TIMEOUT), grpc.StatusCode.ALREADY_EXISTS, "USERNAME_TAKEN"
    )


BAD_PASSWORDS = {
    "7 characters": "short7c",
    "80 ASCII characters": "a" * 80,
    "30 three-byte characters": "\u20ac" * 30,  # 90 bytes in UTF-8
    "very common": "password123",
    "very common in capitals": "PASSWORD123",
    "the username": "Longusername",
    "the email": "longusername@example.com",
}


@pytest.mark.parametrize("case", list(BAD_PASSWORDS))
def test_register_refuses_a_weak_or_oversized_password(users: UserServiceStub, case: str) -> None:
    request = pb.RegisterRequest(
        email="longusername@example.com", username="longusername", password=BAD_PASSWORDS[case]
    )
    problem = assert_fails(lambda: users.Register(request, timeout=TIMEOUT), INVALID, "INVALID_ARGUMENT")
    assert set(problem.fields) == {"password"}


def test_passwords_at_the_limits_are_accepted(users: UserServiceStub) -> None:
    register(users, "eight", "8chars!!")
    register(users, "seventytwo", "\u20ac" * 24)  # exactly 72 bytes
    assert login(users, "seventytwo", "\u20ac" * 24).user.username == "seventytwo"


@pytest.mark.parametrize(
    ("email", "username", "fields"),
    [
        ("not-an-email", "fine_name", {"email"}),
        ("two@@example.com", "fine_name", {"email"}),
        ("x" * 250 + "@example.com", "fine_name", {"email"}),
        ("fine@example.com", "ab", {"username"}),
        ("fine@example.com", "has space", {"username"}),
        ("fine@example.com", "x" * 33, {"username"}),
        ("fine@example.com", "semi;colon", {"username"}),
        ("nope", "a", {"email", "username"}),
        ("", "", {"email", "username", "password"}),
    ],
)
def test_register_names_each_bad_field(
    users: UserServiceStub, email: str, username: str, fields: set[str]
) -> None:
    password = "" if "password" in fields else PASSWORD
    request = pb.RegisterRequest(email=email, username=username, password=password)
    problem = assert_fails(lambda: users.Register(request, timeout=TIMEOUT), INVALID, "INVALID_ARGUMENT")
    assert set(problem.fields) == fields


# --- sign-in ---------------------------------------------------------------------------------


def test_login_by_email_or_username_in_any_case(users: UserServiceStub) -> None:
    created = register(users, "alice")
    for name in ("alice", "ALICE", "Alice@Example.COM", "  alice@example.com "):
        signed = login(users, name)
        assert signed.user.id == created.id
        assert me(users, signed.access).id == created.id
    reply = users.Login(pb.LoginRequest(email_or_username="alice", password=PASSWORD), timeout=TIMEOUT)
    assert (reply.token_type, reply.expires_in) == ("Bearer", 15 * 60)
    assert reply.user.HasField("last_login_at")


def test_wrong_password_unknown_account_and_deactivated_account_get_the_same_answer(
    server: RunningServer, users: UserServiceStub
) -> None:
    create_account(server, "root", UserRole.ADMIN)
    register(users, "alice")
    bob = register(users, "bob")
    root = login(users, "root")
    users.SetUserActive(
        pb.SetUserActiveRequest(user_id=bob.id, active=False), metadata=root.metadata, timeout=TIMEOUT
    )
    answers = [
        assert_invalid_credentials(users, "alice", WRONG_PASSWORD),
        assert_invalid_credentials(users, "nobody", PASSWORD),
        assert_invalid_credentials(users, "nobody@example.com", PASSWORD),
        assert_invalid_credentials(users, "bob", PASSWORD),  # the right password
    ]
    assert len({answer.message for answer in answers}) == 1


def test_login_with_empty_fields_is_invalid_argument(users: UserServiceStub) -> None:
    problem = assert_fails(lambda: login(users, "  ", ""), INVALID, "INVALID_ARGUMENT")
    assert set(problem.fields) == {"email_or_username", "password"}


def test_a_longer_password_than_the_real_one_does_not_sign_in(users: UserServiceStub) -> None:
    real = "\u20ac" * 24  # exactly 72 bytes, the longest allowed
    register(users, "alice", real)
    problem = rpc_failure(lambda: login(users, "alice", real + "and then some"))
    assert (problem.code, problem.reason) in {
        (UNAUTHENTICATED, "INVALID_CREDENTIALS"),
        (INVALID, "INVALID_ARGUMENT"),
    }


# --- throttling ------------------------------------------------------------------------------


def test_repeated_failures_throttle_an_account_even_for_the_right_password(users: UserServiceStub) -> None:
    register(users, "alice")
    free = fail_until_throttled(users, lambda _: "alice")
    assert free == 5
    delay = throttled(users, "alice", PASSWORD)
    assert 0 < delay <= 15 * 60
    throttled(users, "ALICE@example.com", PASSWORD)  # the address is throttled as well


@pytest.mark.parametrize(
    ("failing", "free"),
    [
        ("on the account", PAIR_FREE_FAILURES),
        ("on other accounts from the same address", ADDRESS_FREE_FAILURES),
    ],
)
def test_the_attempt_after_the_free_failures_is_throttled(
    users: UserServiceStub, failing: str, free: int
) -> None:
    register(users, "alice")
    for n in range(free):
        name = "alice" if failing == "on the account" else f"guess{n}"
        assert_invalid_credentials(users, name, WRONG_PASSWORD)
    assert throttled(users, "alice", PASSWORD) > 0


def test_an_address_is_throttled_across_accounts(users: UserServiceStub) -> None:
    register(users, "bob")
    register(users, "carol")
    for n in range(4):
        assert_invalid_credentials(users, f"guess{n}", WRONG_PASSWORD)
    login(users, "bob")  # four failures from this address are not throttled yet
    free = 4 + fail_until_throttled(users, lambda n: f"another-guess{n}", limit=ADDRESS_FREE_FAILURES + 2)
    assert free == ADDRESS_FREE_FAILURES
    assert throttled(users, "carol", PASSWORD) > 0  # never failed itself: the address is throttled


def test_throttling_delays_grow_and_then_let_the_owner_in(users: UserServiceStub) -> None:
    register(users, "alice")
    fail_until_throttled(users, lambda _: "alice")
    first = throttled(users, "alice", WRONG_PASSWORD)
    time.sleep(first + 0.05)
    assert_invalid_credentials(users, "alice", WRONG_PASSWORD)
    second = throttled(users, "alice", PASSWORD)
    assert second > first
    time.sleep(second + 0.05)
    assert login(users, "alice").user.username == "alice"


def test_failures_by_email_and_by_username_count_for_the_same_account(server: RunningServer) -> None:
    """Failures alternating between the account's username and email, each from a new address
    (called on the server's Accounts directly, since every test client shares 127.0.0.1), are
    counted for one account: past its free failures, any address that already failed against it
    waits, whichever name it uses, while an address that never failed still gets in."""
    create_account(server, "alice")
    accounts = server.app.accounts
    for n in range(ACCOUNT_FREE_FAILURES):
        name = "alice" if n % 2 else "alice@example.com"
        with pytest.raises(CrewdbError) as caught:
            server.call(accounts.login(name, WRONG_PASSWORD, f"ipv4:10.0.0.{n + 1}"))
        assert caught.value.reason == "INVALID_CREDENTIALS"
    for name in ("alice", "alice@example.com"):
        with pytest.raises(CrewdbError) as caught:
            server.call(accounts.login(name, PASSWORD, "ipv4:10.0.0.1"))
        assert caught.value.reason == "TOO_MANY_ATTEMPTS"
    signed_in = server.call(accounts.login("alice", PASSWORD, "ipv4:10.0.1.1"))
    assert signed_in.user.username == "alice"


# --- refresh ---------------------------------------------------------------------------------


def test_refresh_returns_a_new_pair_and_spends_the_old_refresh_token(
    server: RunningServer, users: UserServiceStub
) -> None:
    create_account(server, "alice")
    first = login(users, "alice")
    reply = users.RefreshToken(pb.RefreshTokenRequest(refresh_token=first.refresh), timeout=TIMEOUT)
    assert (reply.token_type, reply.expires_in, reply.user.username) == ("Bearer", 15 * 60, "alice")
    second = Signed(reply.access_token, reply.refresh_token, reply.user)
    assert second.access != first.access
    assert second.refresh != first.refresh
    assert second.session_id == first.session_id
    assert me(users, second.access).username == "alice"
    third = refresh(users, second.refresh)  # the new one is good for one more rotation
    assert me(users, third.access).username == "alice"


def test_reusing_a_spent_refresh_token_ends_its_whole_session(
    server: RunningServer, users: UserServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    create_account(server, "alice")
    stolen = login(users, "alice")
    other = login(users, "alice")
    rotated = refresh(users, stolen.refresh)
    with caplog.at_level(logging.WARNING, logger="crewdb.security"):
        assert_refresh_refused(users, stolen.refresh)
    assert any(
        "reused" in record.getMessage() for record in caplog.records if record.name == "crewdb.security"
    )
    assert_refresh_refused(users, rotated.refresh)
    assert_refused_soon(users, rotated.access)
    assert_refused_soon(users, stolen.access)
    assert me(users, other.access).username == "alice"
    assert me(users, refresh(users, other.refresh).access).username == "alice"


def test_refresh_with_anything_but_a_refresh_token_is_refused(
    server: RunningServer, users: UserServiceStub
) -> None:
    create_account(server, "alice")
    signed = login(users, "alice")
    assert_refresh_refused(users, "not-a-refresh-token")
    assert_refresh_refused(users, signed.access)
    problem = assert_fails(lambda: refresh(users, ""), INVALID, "INVALID_ARGUMENT")
    assert set(problem.fields) == {"refresh_token"}
    assert me(users, refresh(users, signed.refresh).access).username == "alice"


# --- logout ----------------------------------------------------------------------------------


def test_logout_ends_that_session_at_once(server: RunningServer, users: UserServiceStub) -> None:
    create_account(server, "alice")
    ending = login(users, "alice")
    staying = login(users, "alice")
    users.Logout(pb.LogoutRequest(refresh_token=ending.refresh), metadata=ending.metadata, timeout=TIMEOUT)
    assert_refused(users, ending.access)
    assert_refresh_refused(users, ending.refresh)
    assert me(users, staying.access).username == "alice"
    sessions = users.ListSessions(pb.ListSessionsRequest(), metadata=staying.metadata, timeout=TIMEOUT)
    assert [s.id for s in sessions.sessions] == [staying.session_id]


def test_logout_all_sessions_ends_every_session(server: RunningServer, users: UserServiceStub) -> None:
    create_account(server, "alice")
    sessions = [login(users, "alice") for _ in range(3)]
    users.Logout(pb.LogoutRequest(all_sessions=True), metadata=sessions[0].metadata, timeout=TIMEOUT)
    for session in sessions:
        assert_refused(users, session.access)
        assert_refresh_refused(users, session.refresh)


def test_logout_with_another_users_refresh_token_is_not_found_and_ends_nothing(
    server: RunningServer, users: UserServiceStub
) -> None:
    create_account(server, "alice")
    create_account(server, "bob")
    alice, bob = login(users, "alice"), login(users, "bob")
    for token in (bob.refresh, "no-such-refresh-token"):
        request = pb.LogoutRequest(refresh_token=token)
        logout = partial(users.Logout, request, metadata=alice.metadata, timeout=TIMEOUT)
        assert_fails(logout, NOT_FOUND, "SESSION_NOT_FOUND")
    problem = assert_fails(
        lambda: users.Logout(pb.LogoutRequest(), metadata=alice.metadata, timeout=TIMEOUT),
        INVALID,
        "INVALID_ARGUMENT",
    )
    assert set(problem.fields) == {"refresh_token"}
    assert me(users, bob.access).username == "bob"
    assert me(users, refresh(users, bob.refresh).access).username == "bob"
    assert me(users, alice.access).username == "alice"


# --- password change -------------------------------------------------------------------------


def change_password(users: UserServiceStub, session: Signed, current: str, new: str) -> None:
    request = pb.ChangePasswordRequest(current_password=current, new_password=new)
    users.ChangePassword(request, metadata=session.metadata, timeout=TIMEOUT)


def test_change_password_refuses_a_wrong_current_or_a_bad_new_password(
    server: RunningServer, users: UserServiceStub
) -> None:
    create_account(server, "alice")
    session = login(users, "alice")
    assert_fails(
        lambda: change_password(users, session, WRONG_PASSWORD, NEW_PASSWORD),
        UNAUTHENTICATED,
        "INVALID_CREDENTIALS",
    )
    for new in ("password123", PASSWORD, "short", "alice@example.com"):
        problem = assert_fails(
            partial(change_password, users, session, PASSWORD, new),
            INVALID,
            "INVALID_ARGUMENT",
        )
        assert set(problem.fields) == {"new_password"}, new
    assert me(users, session.access).username == "alice"
    assert login(users, "alice").user.username == "alice"  # the password is unchanged


def test_change_password_ends_the_other_sessions_and_keeps_this_one(
    server: RunningServer, users: UserServiceStub
) -> None:
    create_account(server, "alice")
    current = login(users, "alice")
    other = login(users, "alice")
    change_password(users, current, PASSWORD, NEW_PASSWORD)
    assert_refused(users, other.access)
    assert_refresh_refused(users, other.refresh)
    assert me(users, current.access).username == "alice"
    assert me(users, refresh(users, current.refresh).access).username == "alice"
    assert login(users, "alice", NEW_PASSWORD).user.username == "alice"
    assert_invalid_credentials(users, "alice", PASSWORD)


# --- sessions --------------------------------------------------------------------------------


def test_list_sessions_shows_each_login_once_and_marks_the_callers(
    server: RunningServer, users: UserServiceStub
) -> None:
    create_account(server, "alice")
    create_account(server, "bob")
    first = login(users, "alice")
    refreshed = refresh(users, first.refresh)  # still the first session
    second = login(users, "alice")
    login(users, "bob")
    reply = users.ListSessions(pb.ListSessionsRequest(), metadata=second.metadata, timeout=TIMEOUT)
    assert sorted(s.id for s in reply.sessions) == sorted([refreshed.session_id, second.session_id])
    assert [s.id for s in reply.sessions if s.current] == [second.session_id]
    for session in reply.sessions:
        assert session.created_at.ToDatetime() <= session.last_used_at.ToDatetime()
        assert session.expires_at.ToDatetime() > session.last_used_at.ToDatetime()


def test_revoke_session_ends_ones_own_and_not_another_users(
    server: RunningServer, users: UserServiceStub
) -> None:
    create_account(server, "alice")
    create_account(server, "bob")
    alice, spare = login(users, "alice"), login(users, "alice")
    bob = login(users, "bob")

    def revoke(caller: Signed, session_id: str) -> None:
        request = pb.RevokeSessionRequest(id=session_id)
        users.RevokeSession(request, metadata=caller.metadata, timeout=TIMEOUT)

    assert_fails(lambda: revoke(bob, alice.session_id), NOT_FOUND, "SESSION_NOT_FOUND")
    assert_fails(lambda: revoke(bob, str(uuid.uuid4())), NOT_FOUND, "SESSION_NOT_FOUND")
    problem = assert_fails(lambda: revoke(bob, ""), INVALID, "INVALID_ARGUMENT")
    assert set(problem.fields) == {"id"}
    assert me(users, alice.access).username == "alice"
    revoke(alice, spare.session_id)
    assert_refused(users, spare.access)
    assert_refresh_refused(users, spare.refresh)
    assert me(users, alice.access).username == "alice"


# --- open streams ----------------------------------------------------------------------------


def test_deactivation_ends_an_open_watch_stream(
    server: RunningServer, channel: grpc.Channel, users: UserServiceStub
) -> None:
    create_account(server, "root", UserRole.ADMIN)
    create_account(server, "alice")
    root, alice = login(users, "root"), login(users, "alice")
    conversations = ConversationServiceStub(channel)

    def add(session: Signed, conversation_id: str, text: str) -> cpb.Message:
        request = cpb.AddMessageRequest(
            conversation_id=conversation_id, role=cpb.MESSAGE_ROLE_USER, content=text
        )
        return conversations.AddMessage(request, metadata=session.metadata, timeout=TIMEOUT)

    conversation = conversations.CreateConversation(
        cpb.CreateConversationRequest(title="mine"), metadata=alice.metadata, timeout=TIMEOUT
    )
    first = add(alice, conversation.id, "one")
    watch = conversations.WatchMessages(
        cpb.WatchMessagesRequest(conversation_id=conversation.id, after_message_id=first.id),
        metadata=alice.metadata,
        timeout=10,
    )
    try:
        add(alice, conversation.id, "two")
        assert next(watch).message.content == "two"  # the stream is open and authorized
        deactivate = pb.SetUserActiveRequest(user_id=alice.user.id, active=False)
        users.SetUserActive(deactivate, metadata=root.metadata, timeout=TIMEOUT)
        assert_refused(users, alice.access)
        time.sleep(REVOCATION_WINDOW * 0.75)  # past the second a revocation may take
        add(root, conversation.id, "said after alice was deactivated")
        assert_stream_ended(watch, (UNAUTHENTICATED, "UNAUTHENTICATED"))
    finally:
        watch.cancel()


# --- admin -----------------------------------------------------------------------------------

AdminProbe = Callable[[UserServiceStub, Metadata, str], object]

ADMIN_RPCS: dict[str, AdminProbe] = {
    "ListUsers": lambda s, md, uid: s.ListUsers(pb.ListUsersRequest(), metadata=md, timeout=TIMEOUT),
    "GetUser": lambda s, md, uid: s.GetUser(pb.GetUserRequest(user_id=uid), metadata=md, timeout=TIMEOUT),
    "UpdateUserRole": lambda s, md, uid: s.UpdateUserRole(
        pb.UpdateUserRoleRequest(user_id=uid, role=pb.USER_ROLE_ADMIN), metadata=md, timeout=TIMEOUT
    ),
    "SetUserActive": lambda s, md, uid: s.SetUserActive(
        pb.SetUserActiveRequest(user_id=uid, active=False), metadata=md, timeout=TIMEOUT
    ),
    "GetUserStats": lambda s, md, uid: s.GetUserStats(pb.GetUserStatsRequest(), metadata=md, timeout=TIMEOUT),
}


@pytest.mark.parametrize("rpc", list(ADMIN_RPCS))
def test_admin_rpcs_are_permission_denied_for_users_and_moderators(shared: Shared, rpc: str) -> None:
    stub = UserServiceStub(shared.channel)
    for caller in (shared.alice, shared.moderator):
        for target in (caller.user.id, shared.bob.user.id):
            assert_fails(
                partial(ADMIN_RPCS[rpc], stub, caller.metadata, target),
                DENIED,
                "PERMISSION_DENIED",
            )
    assert me(stub, shared.bob.access).active  # nothing was changed
    assert me(stub, shared.alice.access).role == pb.USER_ROLE_USER


def list_users(users: UserServiceStub, admin: Signed, **fields: Any) -> pb.ListUsersResponse:
    return users.ListUsers(pb.ListUsersRequest(**fields), metadata=admin.metadata, timeout=TIMEOUT)


def names(reply: pb.ListUsersResponse) -> list[str]:
    return [user.username for user in reply.users]


def test_an_admin_lists_filters_pages_and_counts_users(server: RunningServer, users: UserServiceStub) -> None:
    create_account(server, "root", UserRole.ADMIN)
    root = login(users, "root")
    alice = register(users, "alice")
    bob = register(users, "bob")
    create_account(server, "mod", UserRole.MODERATOR)
    users.SetUserActive(
        pb.SetUserActiveRequest(user_id=bob.id, active=False), metadata=root.metadata, timeout=TIMEOUT
    )

    assert names(list_users(users, root)) == ["mod", "bob", "alice", "root"]  # newest first
    assert names(list_users(users, root, role=pb.USER_ROLE_MODERATOR)) == ["mod"]
    assert names(list_users(users, root, active=False)) == ["bob"]
    assert names(list_users(users, root, active=True)) == ["mod", "alice", "root"]
    assert names(list_users(users, root, query="ALI")) == ["alice"]
    assert names(list_users(users, root, query="example.com", role=pb.USER_ROLE_USER)) == ["bob", "alice"]
    assert names(list_users(users, root, query="%")) == []  # literal, not a wildcard

    seen: list[str] = []
    token = ""
    while True:
        page = list_users(users, root, page_size=3, page_token=token)
        assert len(page.users) <= 3
        seen += names(page)
        token = page.next_page_token
        if not token:
            break
        other_filter_token = token
    assert seen == ["mod", "bob", "alice", "root"]
    problem = assert_fails(
        lambda: list_users(users, root, page_token=other_filter_token, active=True),
        INVALID,
        "INVALID_PAGE_TOKEN",
    )
    assert set(problem.fields) == {"page_token"}
    problem = assert_fails(lambda: list_users(users, root, page_size=-1), INVALID, "INVALID_ARGUMENT")
    assert set(problem.fields) == {"page_size"}

    got = users.GetUser(pb.GetUserRequest(user_id=alice.id), metadata=root.metadata, timeout=TIMEOUT)
    assert (got.id, got.username, got.role, got.active) == (alice.id, "alice", pb.USER_ROLE_USER, True)
    assert_fails(
        lambda: users.GetUser(
            pb.GetUserRequest(user_id="no-such-user"), metadata=root.metadata, timeout=TIMEOUT
        ),
        NOT_FOUND,
        "USER_NOT_FOUND",
    )

    stats = users.GetUserStats(pb.GetUserStatsRequest(), metadata=root.metadata, timeout=TIMEOUT)
    assert (stats.total_users, stats.active_users, stats.signups_last_7_days) == (4, 3, 4)
    assert dict(stats.users_by_role) == {"user": 2, "moderator": 1, "admin": 1, "worker": 0}


def test_a_role_change_takes_effect_at_once(server: RunningServer, users: UserServiceStub) -> None:
    create_account(server, "root", UserRole.ADMIN)
    root = login(users, "root")
    alice = login_new(server, users, "alice")

    def set_role(user_id: str, role: pb.UserRole.ValueType) -> pb.User:
        request = pb.UpdateUserRoleRequest(user_id=user_id, role=role)
        return users.UpdateUserRole(request, metadata=root.metadata, timeout=TIMEOUT)

    assert set_role(alice.user.id, pb.USER_ROLE_ADMIN).role == pb.USER_ROLE_ADMIN
    assert names(list_users(users, alice)) == ["alice", "root"]  # her old token, her new role
    set_role(alice.user.id, pb.USER_ROLE_USER)
    assert_fails(lambda: list_users(users, alice), DENIED, "PERMISSION_DENIED")
    problem = assert_fails(
        lambda: set_role(alice.user.id, pb.USER_ROLE_UNSPECIFIED), INVALID, "INVALID_ARGUMENT"
    )
    assert set(problem.fields) == {"role"}
    assert_fails(lambda: set_role("no-such-user", pb.USER_ROLE_USER), NOT_FOUND, "USER_NOT_FOUND")


def login_new(
    server: RunningServer, users: UserServiceStub, username: str, role: UserRole = UserRole.USER
) -> Signed:
    create_account(server, username, role)
    return login(users, username)


def test_the_last_active_admin_cannot_be_demoted_or_deactivated(
    server: RunningServer, users: UserServiceStub
) -> None:
    root = login_new(server, users, "root", UserRole.ADMIN)
    alice = login_new(server, users, "alice")

    def set_role(caller: Signed, user_id: str, role: pb.UserRole.ValueType) -> pb.User:
        request = pb.UpdateUserRoleRequest(user_id=user_id, role=role)
        return users.UpdateUserRole(request, metadata=caller.metadata, timeout=TIMEOUT)

    def set_active(caller: Signed, user_id: str, active: bool) -> pb.User:
        request = pb.SetUserActiveRequest(user_id=user_id, active=active)
        return users.SetUserActive(request, metadata=caller.metadata, timeout=TIMEOUT)

    root_id, alice_id = root.user.id, alice.user.id
    for change in (
        lambda: set_role(root, root_id, pb.USER_ROLE_USER),
        lambda: set_role(root, root_id, pb.USER_ROLE_MODERATOR),
        lambda: set_active(root, root_id, False),
    ):
        assert_fails(change, grpc.StatusCode.FAILED_PRECONDITION, "LAST_ADMIN")
    assert me(users, root.access).role == pb.USER_ROLE_ADMIN

    set_role(root, alice_id, pb.USER_ROLE_ADMIN)
    set_active(root, alice_id, False)  # an inactive admin does not count
    assert_fails(
        lambda: set_role(root, root_id, pb.USER_ROLE_USER), grpc.StatusCode.FAILED_PRECONDITION, "LAST_ADMIN"
    )
    set_active(root, alice_id, True)
    alice = login(users, "alice")  # deactivation ended her session
    assert set_role(alice, root_id, pb.USER_ROLE_USER).role == pb.USER_ROLE_USER
    assert_fails(lambda: list_users(users, root), DENIED, "PERMISSION_DENIED")
    assert_fails(
        lambda: set_active(alice, alice_id, False), grpc.StatusCode.FAILED_PRECONDITION, "LAST_ADMIN"
    )
    assert_fails(
        lambda: set_role(alice, alice_id, pb.USER_ROLE_USER),
        grpc.StatusCode.FAILED_PRECONDITION,
        "LAST_ADMIN",
    )


def test_deactivation_ends_every_session_at_once_and_login_then_fails(
    server: RunningServer, users: UserServiceStub
) -> None:
    root = login_new(server, users, "root", UserRole.ADMIN)
    alice = login_new(server, users, "alice")
    spare = login(users, "alice")
    wrong = assert_invalid_credentials(users, "alice", WRONG_PASSWORD)
    request = pb.SetUserActiveRequest(user_id=alice.user.id, active=False)
    assert not users.SetUserActive(request, metadata=root.metadata, timeout=TIMEOUT).active
    for session in (alice, spare):
        assert_refused(users, session.access)
        assert_refresh_refused(users, session.refresh)
    assert assert_invalid_credentials(users, "alice", PASSWORD).message == wrong.message
    request = pb.SetUserActiveRequest(user_id=alice.user.id, active=True)
    assert users.SetUserActive(request, metadata=root.metadata, timeout=TIMEOUT).active
    assert me(users, login(users, "alice").access).username == "alice"
    assert_refused(users, alice.access)  # reactivation does not revive old sessions


# --- secrets ---------------------------------------------------------------------------------


def test_no_response_carries_a_password_hash_or_a_refresh_token_hash(
    server: RunningServer, channel: grpc.Channel, users: UserServiceStub
) -> None:
    root = login_new(server, users, "root", UserRole.ADMIN)
    created = register(users, "alice")
    alice_id = created.id
    responses: list[ProtoMessage] = [created, register(users, "bob")]
    for _ in range(2):
        responses.append(
            users.Login(pb.LoginRequest(email_or_username="alice", password=PASSWORD), timeout=TIMEOUT)
        )
    alice = login(users, "alice")
    responses.append(users.RefreshToken(pb.RefreshTokenRequest(refresh_token=alice.refresh), timeout=TIMEOUT))
    responses += [
        me(users, root.access),
        users.ListSessions(pb.ListSessionsRequest(), metadata=root.metadata, timeout=TIMEOUT),
        list_users(users, root),
        users.GetUser(pb.GetUserRequest(user_id=alice_id), metadata=root.metadata, timeout=TIMEOUT),
        users.UpdateUserRole(
            pb.UpdateUserRoleRequest(user_id=alice_id, role=pb.USER_ROLE_MODERATOR),
            metadata=root.metadata,
            timeout=TIMEOUT,
        ),
        users.SetUserActive(
            pb.SetUserActiveRequest(user_id=alice_id, active=True), metadata=root.metadata, timeout=TIMEOUT
        ),
        users.GetUserStats(pb.GetUserStatsRequest(), metadata=root.metadata, timeout=TIMEOUT),
        # SystemService reports on the whole server, the users table included.
        SystemServiceStub(channel).GetHealthReport(
            system_pb.GetHealthReportRequest(), metadata=root.metadata, timeout=TIMEOUT
        ),
    ]
    hashes = stored_hashes(server)
    assert len(hashes) >= 3 + 5  # three passwords; five refresh tokens, one of them spent
    for response in responses:
        wire, text = response.SerializeToString(), str(response)
        assert b"$2b$" not in wire
        assert TEST_SECRET not in text, type(response).__name__
        for hashed in hashes:
            assert hashed.encode() not in wire, type(response).__name__
            assert hashed not in text, type(response).__name__


def test_logs_never_carry_passwords_tokens_or_the_secret(
    server: RunningServer, users: UserServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    register(users, "alice")
    assert_invalid_credentials(users, "alice", WRONG_PASSWORD)
    assert_invalid_credentials(users, "nobody", WRONG_PASSWORD)
    first = login(users, "alice")
    second = refresh(users, first.refresh)
    assert_refresh_refused(users, first.refresh)  # reuse: logged as a security event
    third = login(users, "alice")
    change_password(users, third, PASSWORD, NEW_PASSWORD)
    fourth = login(users, "alice", NEW_PASSWORD)
    secrets = [PASSWORD, WRONG_PASSWORD, NEW_PASSWORD, TEST_SECRET, *stored_hashes(server)]
    for session in (first, second, third, fourth):
        # a token's signature alone would be enough to spot a leaked token
        secrets += [session.access, session.access.split(".")[2], session.refresh]
    logged = [
        f"{record.name} {record.getMessage()} {record.args!r} {record.exc_text or ''}"
        for record in caplog.records
    ]
    assert any("INVALID_CREDENTIALS" in line for line in logged)  # the server did log these calls
    for line in logged:
        for secret in secrets:
            assert secret not in line, f"a secret was logged: {line[:200]}"


# --- the Python client -----------------------------------------------------------------------


def test_the_client_does_not_refresh_and_resend_a_wrong_current_password(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crewdb.rpc")
    before = client.access_token()
    request = pb.ChangePasswordRequest(current_password=WRONG_PASSWORD, new_password=NEW_PASSWORD)
    assert_fails(
        lambda: client.users.ChangePassword(request, timeout=TIMEOUT), UNAUTHENTICATED, "INVALID_CREDENTIALS"
    )
    attempts = [r for r in caplog.records if "ChangePassword" in r.getMessage()]
    assert len(attempts) == 1
    assert client.access_token() == before


def test_the_client_signs_in_and_sends_its_token(server: RunningServer) -> None:
    create_account(server, "alice")
    with Client(server.address) as crew:
        assert not crew.signed_in
        assert crew.login("alice", PASSWORD).username == "alice"
        assert crew.users.GetMe(pb.GetMeRequest(), timeout=TIMEOUT).username == "alice"
        crew.logout()
        assert not crew.signed_in
        assert_fails(
            lambda: crew.users.GetMe(pb.GetMeRequest(), timeout=TIMEOUT), UNAUTHENTICATED, "UNAUTHENTICATED"
        )


# --- concurrency -----------------------------------------------------------------------------


def test_two_concurrent_refreshes_of_one_token_leave_at_most_one_live_pair(
    server: RunningServer, users: UserServiceStub
) -> None:
    """With no grace window, a token spent twice at once must not give two working sessions."""
    create_account(server, "alice")
    signed = login(users, "alice")
    results: list[Signed | RpcFailure] = []
    lock = threading.Lock()
    start = threading.Barrier(2)

    def spend() -> None:
        start.wait(TIMEOUT)
        try:
            outcome: Signed | RpcFailure = refresh(users, signed.refresh)
        except grpc.RpcError as error:
            outcome = failure(error)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=spend) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    pairs = [r for r in results if isinstance(r, Signed)]
    refusals = [r for r in results if isinstance(r, RpcFailure)]
    assert len(pairs) == 1
    assert [(r.code, r.reason) for r in refusals] == [(UNAUTHENTICATED, "INVALID_REFRESH_TOKEN")]
