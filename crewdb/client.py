"""A typed Python client for crewdb: connect, sign in, and keep a fresh access token on every call.

    from crewdb.client import Client

    with Client("localhost:50051") as crew:
        crew.login("alice", "correct horse battery")
        conversation = crew.conversations.CreateConversation(
            conversation_service_pb2.CreateConversationRequest(title="Trip")
        )

`crew.users`, `crew.conversations`, `crew.tasks` and `crew.vectors` are the generated stubs;
every call through them carries `authorization: Bearer <access token>`. The token is refreshed
shortly before it expires, and once more if the server says it has expired, with the refresh
token (which rotates). What a tRPC client link does for a TypeScript app.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import grpc
from google.rpc import error_details_pb2, status_pb2

from crewdb.v1 import (
    conversation_service_pb2_grpc,
    task_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
    vector_service_pb2_grpc,
)

# Refresh this many seconds before the access token would expire.
REFRESH_MARGIN_SECONDS = 30.0
REFRESH_TIMEOUT = 10.0


class _Tokens(NamedTuple):
    access: str
    refresh: str
    expires_at: float  # time.monotonic() deadline


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class Client:
    """A signed-in connection to crewdb. Thread-safe; close it (or use `with`) when done."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._raw = (
            grpc.secure_channel(target, credentials, options)
            if credentials is not None
            else grpc.insecure_channel(target, options)
        )
        self._auth = user_service_pb2_grpc.UserServiceStub(self._raw)
        self._tokens: _Tokens | None = None
        self._lock = threading.Lock()
        self.channel = grpc.intercept_channel(self._raw, _BearerInterceptor(self))
        self.users = user_service_pb2_grpc.UserServiceStub(self.channel)
        self.conversations = conversation_service_pb2_grpc.ConversationServiceStub(self.channel)
        self.tasks = task_service_pb2_grpc.TaskServiceStub(self.channel)
        self.vectors = vector_service_pb2_grpc.VectorServiceStub(self.channel)

    def register(self, email: str, username: str, password: str) -> user_service_pb2.User:
        request = user_service_pb2.RegisterRequest(email=email, username=username, password=password)
        return self._auth.Register(request)

    def login(self, email_or_username: str, password: str) -> user_service_pb2.User:
        """Signs in; later calls carry the session's access token."""
        reply = self._auth.Login(
            user_service_pb2.LoginRequest(email_or_username=email_or_username, password=password)
        )
        self._keep(reply.access_token, reply.refresh_token, reply.expires_in)
        return reply.user

    def logout(self, *, all_sessions: bool = False) -> None:
        tokens = self._tokens
        if tokens is None:
            return
        self.users.Logout(
            user_service_pb2.LogoutRequest(refresh_token=tokens.refresh, all_sessions=all_sessions)
        )
        self._tokens = None

    @property
    def signed_in(self) -> bool:
        return self._tokens is not None

    def access_token(self) -> str | None:
        """The current access token, refreshed first when it is about to expire."""
        with self._lock:
            tokens = self._tokens
            if tokens is None:
                return None
            if time.monotonic() >= tokens.expires_at - REFRESH_MARGIN_SECONDS:
                self._refresh_locked(tokens)
            return self._tokens.access if self._tokens else None

    def refresh_after_rejection(self, rejected: str) -> str | None:
        """Called when the server refused `rejected`: refresh once (unless another thread
        already did) and return the token to retry with, or None."""
        with self._lock:
            tokens = self._tokens
            if tokens is None:
                return None
            if tokens.access == rejected:
                try:
                    self._refresh_locked(tokens)
                except grpc.RpcError:
                    return None
            return self._tokens.access if self._tokens else None

    def _refresh_locked(self, tokens: _Tokens) -> None:
        try:
            reply = self._auth.RefreshToken(
                user_service_pb2.RefreshTokenRequest(refresh_token=tokens.refresh), timeout=REFRESH_TIMEOUT
            )
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                self._tokens = None  # the session is over: sign in again
            raise  # anything else (the server briefly away): keep the session, try again later
        self._keep(reply.access_token, reply.refresh_token, reply.expires_in)

    def _keep(self, access: str, refresh: str, expires_in: int) -> None:
        self._tokens = _Tokens(access, refresh, time.monotonic() + expires_in)

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class _BearerInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
):
    """Adds the access token to every call; retries a unary call once after a refresh when the
    server answers UNAUTHENTICATED (the token expired in flight)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        token = self._client.access_token()
        outcome = continuation(_with_token(details, token), request)
        # A `.future()` call is still running here: waiting for it to retry would make it
        # blocking, so only finished (blocking) calls are retried.
        if token is None or not outcome.done() or not _unauthenticated(outcome):
            return outcome
        retry_token = self._client.refresh_after_rejection(token)
        return continuation(_with_token(details, retry_token), request) if retry_token else outcome

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(_with_token(details, self._client.access_token()), request)


def _unauthenticated(outcome: Any) -> bool:
    """True when the server refused the access token itself (reason UNAUTHENTICATED), not,
    say, a wrong password (INVALID_CREDENTIALS), which a refresh would not fix."""
    try:
        if outcome.code() != grpc.StatusCode.UNAUTHENTICATED:
            return False
        trailers = dict(outcome.trailing_metadata() or ())
    except Exception:  # noqa: BLE001 - not a finished call: nothing to retry
        return False
    details = trailers.get("grpc-status-details-bin")
    if not isinstance(details, bytes):
        return False
    for detail in status_pb2.Status.FromString(details).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return bool(info.reason == "UNAUTHENTICATED")
    return False


def _with_token(details: grpc.ClientCallDetails, token: str | None) -> grpc.ClientCallDetails:
    metadata = [(k, v) for k, v in (details.metadata or ()) if k != "authorization"]
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    return _ClientCallDetails(
        details.method,
        details.timeout,
        metadata,
        details.credentials,
        getattr(details, "wait_for_ready", None),
        getattr(details, "compression", None),
    )


class _ClientCallDetails(_CallDetails, grpc.ClientCallDetails):  # type: ignore[misc]
    pass
