"""crewdb.client: signs in, attaches the token, and refreshes it without the caller noticing."""

from __future__ import annotations

import grpc
import pytest

from crewdb.client import Client
from crewdb.config import Settings
from crewdb.v1 import conversation_service_pb2 as pb
from crewdb.v1 import user_service_pb2 as upb
from tests.conftest import PASSWORD, start_server


@pytest.fixture
def short_lived(settings: Settings) -> Settings:
    """Access tokens that live 2 s: inside the client's 30 s refresh margin from the start."""
    return settings.replace(access_token_ttl=2)


def test_the_client_refreshes_an_expiring_token_before_calling(short_lived: Settings) -> None:
    running, stop = start_server(short_lived)
    try:
        with Client(running.address) as alice:
            alice.register("alice@example.com", "alice", PASSWORD)
            alice.login("alice", PASSWORD)
            first = alice.access_token()
            second = alice.access_token()
            assert first != second  # each call near expiry rotated the pair
            created = alice.conversations.CreateConversation(
                pb.CreateConversationRequest(title="t"), timeout=5
            )
            assert alice.conversations.GetConversation(pb.GetConversationRequest(id=created.id), timeout=5).id
            sessions = alice.users.ListSessions(upb.ListSessionsRequest(), timeout=5).sessions
            assert len(sessions) == 1  # rotation stays within the one session
    finally:
        stop()


def test_the_client_retries_once_with_a_fresh_token_when_the_server_refuses_the_old(
    settings: Settings,
) -> None:
    running, stop = start_server(settings)
    try:
        with Client(running.address) as alice:
            alice.register("alice@example.com", "alice", PASSWORD)
            alice.login("alice", PASSWORD)
            tokens = alice._tokens
            assert tokens is not None
            # Simulate a token the server no longer accepts while the client thinks it valid.
            alice._tokens = tokens._replace(access=tokens.access[:-4] + "AAAA")
            me = alice.users.GetMe(upb.GetMeRequest(), timeout=5)
            assert me.username == "alice"
            assert alice.access_token() != tokens.access
    finally:
        stop()


def test_a_client_whose_session_ended_reports_unauthenticated(settings: Settings) -> None:
    running, stop = start_server(settings)
    try:
        with Client(running.address) as alice:
            alice.register("alice@example.com", "alice", PASSWORD)
            alice.login("alice", PASSWORD)
            alice.logout()
            assert not alice.signed_in
            with pytest.raises(grpc.RpcError) as caught:
                alice.users.GetMe(upb.GetMeRequest(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stop()
