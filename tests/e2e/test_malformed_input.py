"""Input that never reaches a servicer intact still gets a typed answer, never UNKNOWN."""

from __future__ import annotations

import base64
import math

import grpc
import pytest
from google.protobuf import struct_pb2

from crewdb.models import UserRole
from crewdb.v1 import conversation_service_pb2 as pb
from crewdb.v1 import user_service_pb2 as upb
from crewdb.v1.conversation_service_pb2_grpc import ConversationServiceStub
from crewdb.v1.user_service_pb2_grpc import UserServiceStub
from tests.conftest import RunningServer, sign_in
from tests.rpc_errors import failure

SERVICE = "/crewdb.v1.ConversationService"


def _raw_unary(channel: grpc.Channel, method: str, payload: bytes) -> None:
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"{SERVICE}/{method}")
    call(payload, timeout=5)


@pytest.mark.parametrize(
    ("method", "payload"),
    [
        ("GetConversation", b"\xff\xff\xff"),  # not protobuf at all
        ("CreateConversation", b"\x0a\x02\xff\xfe"),  # title holding invalid UTF-8
        ("AddMessage", b"\x0a\x05abc"),  # a string field cut short
    ],
)
def test_bytes_that_do_not_decode_are_malformed_request(
    channel: grpc.Channel, method: str, payload: bytes
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _raw_unary(channel, method, payload)
    problem = failure(caught.value)
    assert problem.code == grpc.StatusCode.INVALID_ARGUMENT
    assert problem.reason == "MALFORMED_REQUEST"


def test_a_malformed_watch_request_is_malformed_request(channel: grpc.Channel) -> None:
    call: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(f"{SERVICE}/WatchMessages")
    with pytest.raises(grpc.RpcError) as caught:
        next(iter(call(b"\x0a\x02\xff\xfe", timeout=5)))
    assert failure(caught.value).reason == "MALFORMED_REQUEST"


def _nested_struct(levels: int) -> struct_pb2.Struct:
    root = struct_pb2.Struct()
    node = root
    for _ in range(levels - 1):
        node = node.fields["child"].struct_value
    node.fields["leaf"].string_value = "x"
    return root


def test_metadata_nested_past_protobufs_limit_is_malformed_not_unknown(
    conversations: ConversationServiceStub, channel: grpc.Channel
) -> None:
    conversation = conversations.CreateConversation(pb.CreateConversationRequest(title="deep"))
    request = pb.AddMessageRequest(conversation_id=conversation.id, role=pb.MESSAGE_ROLE_USER, content="hi")
    request.metadata.CopyFrom(_nested_struct(60))
    with pytest.raises(grpc.RpcError) as caught:
        _raw_unary(channel, "AddMessage", request.SerializeToString())
    problem = failure(caught.value)
    assert problem.code == grpc.StatusCode.INVALID_ARGUMENT
    assert problem.reason == "MALFORMED_REQUEST"


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_metadata_numbers_must_be_finite(conversations: ConversationServiceStub, number: float) -> None:
    conversation = conversations.CreateConversation(pb.CreateConversationRequest(title="n"))
    request = pb.AddMessageRequest(conversation_id=conversation.id, role=pb.MESSAGE_ROLE_USER, content="hi")
    request.metadata.update({"score": number})
    with pytest.raises(grpc.RpcError) as caught:
        conversations.AddMessage(request, timeout=5)
    problem = failure(caught.value)
    assert problem.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(problem.fields) == {"metadata"}
    listed = conversations.ListMessages(pb.ListMessagesRequest(conversation_id=conversation.id))
    assert list(listed.messages) == []


def test_pages_of_messages_with_large_metadata_fit_a_default_client(
    conversations: ConversationServiceStub, server: RunningServer
) -> None:
    conversation = conversations.CreateConversation(pb.CreateConversationRequest(title="big"))
    blob = "m" * 15_000
    for n in range(300):
        request = pb.AddMessageRequest(
            conversation_id=conversation.id, role=pb.MESSAGE_ROLE_TOOL, content=f"result {n}"
        )
        request.metadata.update({"blob": blob})
        conversations.AddMessage(request, timeout=5)
    seen, token = 0, ""
    while True:
        page = conversations.ListMessages(
            pb.ListMessagesRequest(conversation_id=conversation.id, page_size=1000, page_token=token),
            timeout=10,
        )
        assert page.ByteSize() < 4 * 1024 * 1024
        seen += len(page.messages)
        token = page.next_page_token
        if not token:
            break
    assert seen == 300


def test_a_token_with_a_header_nested_past_the_recursion_limit_is_unauthenticated(
    server: RunningServer,
) -> None:
    header = base64.urlsafe_b64encode(b"[" * 3000).rstrip(b"=").decode()
    token = f"{header}.e30.c2ln"
    users = UserServiceStub(grpc.insecure_channel(server.address))
    with pytest.raises(grpc.RpcError) as caught:
        users.GetMe(upb.GetMeRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=5)
    assert failure(caught.value).code == grpc.StatusCode.UNAUTHENTICATED


def test_admin_calls_with_overlong_ids_or_unknown_roles_are_invalid_argument(server: RunningServer) -> None:
    with sign_in(server, "root", UserRole.ADMIN) as admin:
        for call in (
            lambda: admin.users.GetUser(upb.GetUserRequest(user_id="u" * 100_000), timeout=5),
            lambda: admin.users.SetUserActive(upb.SetUserActiveRequest(user_id="u" * 129), timeout=5),
            lambda: admin.users.RevokeSession(upb.RevokeSessionRequest(id="s" * 129), timeout=5),
            lambda: admin.users.ListUsers(upb.ListUsersRequest(role=99), timeout=5),  # type: ignore[arg-type]
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert failure(caught.value).code == grpc.StatusCode.INVALID_ARGUMENT
