"""The server as operators see it: health, reflection, start-up errors, unexpected failures, SIGTERM."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from crewdb.cli import main
from crewdb.client import Client
from crewdb.config import Settings
from crewdb.server import jwt_secret
from crewdb.v1 import conversation_service_pb2 as pb
from tests.conftest import (
    PASSWORD,
    TEST_SECRET,
    RunningServer,
    free_port,
    sign_in,
    start_server,
    wait_serving,
)
from tests.rpc_errors import failure

SERVICE = "crewdb.v1.ConversationService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _health(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status  # type: ignore[no-any-return]


def test_health_reports_serving_for_the_server_and_each_service(channel: grpc.Channel) -> None:
    assert _health(channel, "") == SERVING
    assert _health(channel, SERVICE) == SERVING


def test_health_of_an_unknown_service_is_not_found(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _health(channel, "no.such.Service")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_turns_not_serving_when_the_database_probe_fails(
    server: RunningServer, channel: grpc.Channel
) -> None:
    server.app.db.close()  # every later query fails, as with a lost database
    deadline = time.monotonic() + 5
    while _health(channel, "") != NOT_SERVING:
        assert time.monotonic() < deadline, "health never turned NOT_SERVING"
        time.sleep(0.05)
    assert _health(channel, SERVICE) == NOT_SERVING


def _reflection_request(
    channel: grpc.Channel, path: str, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    call = channel.stream_stream(
        path,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return next(iter(call(iter([request]), timeout=5)))


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_services_under_v1_and_v1alpha(channel: grpc.Channel, version: str) -> None:
    path = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    reply = _reflection_request(channel, path, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {service.name for service in reply.list_services_response.service}
    assert {
        SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


@pytest.mark.parametrize(
    "symbol", [SERVICE, "grpc.reflection.v1.ServerReflection", "crewdb.v1.AddMessageRequest"]
)
def test_reflection_describes_symbols(channel: grpc.Channel, symbol: str) -> None:
    reply = _reflection_request(
        channel,
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol),
    )
    assert reply.file_descriptor_response.file_descriptor_proto, reply.error_response


def test_reflection_stub_v1alpha_works(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    assert any(s.name == SERVICE for s in next(iter(replies)).list_services_response.service)


def test_a_port_in_use_is_a_clear_startup_error(
    server: RunningServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = {
        "DATABASE_PATH": str(tmp_path / "second.db"),
        "CREWDB_PORT": str(server.app.port),
        "JWT_SECRET": TEST_SECRET,
    }
    assert main(["serve"], env=env) == 1
    assert f"cannot listen on 127.0.0.1:{server.app.port}" in caplog.text
    # The first server still has the port to itself.
    with grpc.insecure_channel(server.address) as channel:
        assert _health(channel, "") == SERVING


def test_a_bad_setting_stops_startup_naming_the_variable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve"], env={"CREWDB_PORT": "99999"}) == 2
    assert "CREWDB_PORT='99999'" in capsys.readouterr().err


def test_an_unexpected_failure_is_internal_with_a_request_id_and_no_traceback(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    running, stop = start_server(settings)
    try:
        with sign_in(running, "alice") as alice:
            stub = alice.conversations
            conversation = stub.CreateConversation(pb.CreateConversationRequest(title="t"))
            # A row this server never writes: a role from outside the enum, as a hand edit or
            # another program could leave behind.
            with sqlite3.connect(settings.database_path) as raw:
                raw.execute(
                    "INSERT INTO messages VALUES "
                    "('m1', ?, 'wizard', 'x', '2026-01-01T00:00:00.000000Z', NULL)",
                    (conversation.id,),
                )
            raw.close()
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListMessages(
                    pb.ListMessagesRequest(conversation_id=conversation.id),
                    metadata=(("x-request-id", "trace-me-123"),),
                )
    finally:
        stop()
    problem = failure(caught.value)
    assert problem.code == grpc.StatusCode.INTERNAL
    assert problem.reason == "INTERNAL"
    assert problem.request_id == "trace-me-123"
    assert "Traceback" not in problem.message
    assert "wizard" not in problem.message
    logged = [r for r in caplog.records if getattr(r, "request_id", None) == "trace-me-123"]
    assert logged, "the failure was not logged with its request id"
    assert logged[0].exc_info is not None


@pytest.mark.slow
def test_serve_subprocess_serves_then_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_PATH": str(tmp_path / "app.db"),
        "VECTOR_DB_PATH": str(tmp_path / "vectordb"),
        "CREWDB_PORT": str(port),
        "JWT_SECRET": TEST_SECRET,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "crewdb", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_serving(f"127.0.0.1:{port}", process, timeout=30)
        with Client(f"127.0.0.1:{port}") as client:
            client.register("smoke@example.com", "smoke", PASSWORD)
            client.login("smoke", PASSWORD)
            stub = client.conversations
            created = stub.CreateConversation(pb.CreateConversationRequest(title="smoke"), timeout=5)
            assert stub.GetConversation(pb.GetConversationRequest(id=created.id), timeout=5).title == "smoke"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "stopped" in stderr


def test_serving_a_configured_database_without_jwt_secret_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"DATABASE_PATH": str(tmp_path / "app.db"), "CREWDB_PORT": "0"}
    assert main(["serve"], env=env) == 1
    assert "JWT_SECRET is not set" in caplog.text


def test_a_short_jwt_secret_is_a_configuration_error_that_does_not_show_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve"], env={"JWT_SECRET": "too-short-secret"}) == 2
    err = capsys.readouterr().err
    assert "JWT_SECRET" in err
    assert "too-short-secret" not in err


def test_embedded_defaults_generate_a_private_secret_once_and_keep_it(tmp_path: Path) -> None:
    settings = Settings(database_path=tmp_path / "data" / "app.db", embedded_defaults=True)
    first = jwt_secret(settings)
    secret_file = tmp_path / "data" / "jwt_secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert len(first) >= 32
    assert jwt_secret(settings) == first


def test_a_password_hashed_at_an_older_cost_is_rehashed_at_sign_in(settings: Settings) -> None:
    running, stop = start_server(settings)
    try:
        sign_in(running, "alice").close()
    finally:
        stop()

    def cost() -> str:
        with sqlite3.connect(settings.database_path) as raw:
            stored = raw.execute("SELECT password_hash FROM users WHERE username='alice'").fetchone()[0]
        raw.close()
        return str(stored).split("$")[2]

    assert cost() == "10"
    running, stop = start_server(settings.replace(bcrypt_rounds=11))
    try:
        with Client(running.address) as alice:
            alice.login("alice", PASSWORD)
    finally:
        stop()
    assert cost() == "11"


# --- the limit on calls in progress ------------------------------------------------------------

WATCH_MESSAGES = "/crewdb.v1.ConversationService/WatchMessages"
GET_CONVERSATION = "/crewdb.v1.ConversationService/GetConversation"
CALL_LIMIT = 10


def _metric(server: RunningServer, name: str, **labels: str) -> float:
    assert server.app.metrics is not None
    value = server.app.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met in {timeout}s"
        time.sleep(0.02)


def test_idle_streams_at_the_call_limit_refuse_new_calls_but_never_health_probes_or_reflection(
    settings: Settings,
) -> None:
    running, stop = start_server(settings.replace(max_concurrent_rpcs=CALL_LIMIT, metrics_port=0))
    watches: list[Any] = []
    try:
        with sign_in(running, "alice") as alice, grpc.insecure_channel(running.address) as channel:
            stub = alice.conversations
            conversation = stub.CreateConversation(pb.CreateConversationRequest(title="t"), timeout=10)
            request = pb.WatchMessagesRequest(conversation_id=conversation.id)
            watches = [stub.WatchMessages(request, timeout=60) for _ in range(CALL_LIMIT)]
            _wait_for(
                lambda: _metric(running, "crewdb_streams_open", method=WATCH_MESSAGES) == CALL_LIMIT,
                "every stream open",
            )

            # Probes and reflection are always answered, however many streams are open.
            for name in ("", "liveness", SERVICE):
                assert _health(channel, name) == SERVING
            health_watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
            assert next(health_watch).status == SERVING
            health_watch.cancel()
            reply = _reflection_request(
                channel,
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                reflection_pb2.ServerReflectionRequest(list_services=""),
            )
            assert SERVICE in {service.name for service in reply.list_services_response.service}

            # One more crewdb call is refused at once, saying why, and counted.
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetConversation(pb.GetConversationRequest(id=conversation.id), timeout=10)
            problem = failure(refused.value)
            assert (problem.code, problem.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_CALLS")
            assert str(CALL_LIMIT) in problem.message
            assert _metric(running, "crewdb_rpc_refused_total", method=GET_CONVERSATION) == 1

            # A stream that ends frees its place.
            watches.pop().cancel()
            _wait_for(
                lambda: _metric(running, "crewdb_streams_open", method=WATCH_MESSAGES) == CALL_LIMIT - 1,
                "the cancelled stream closed",
            )
            found = stub.GetConversation(pb.GetConversationRequest(id=conversation.id), timeout=10)
            assert found.id == conversation.id
    finally:
        for watch in watches:
            watch.cancel()
        stop()


def test_a_second_server_on_the_same_embedded_chroma_refuses_to_start(tmp_path: Path) -> None:
    """Two processes writing one embedded Chroma corrupt it: the second `crewdb serve` on the same
    VECTOR_DB_PATH stops at once with one line naming the first, and starts once the first is gone."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CREWDB_", "CHROMA_"))},
        "DATABASE_PATH": str(tmp_path / "app.db"),
        "VECTOR_DB_PATH": str(tmp_path / "vectordb"),
        "JWT_SECRET": TEST_SECRET,
        "CREWDB_HOST": "127.0.0.1",
    }
    first_port = free_port()
    first = subprocess.Popen(
        [sys.executable, "-m", "crewdb", "serve", "--port", str(first_port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_serving(f"127.0.0.1:{first_port}", first, "liveness", timeout=30)
        second = subprocess.run(
            [sys.executable, "-m", "crewdb", "serve", "--port", str(free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode != 0
        assert "Traceback" not in second.stderr
        assert f"VECTOR_DB_PATH={tmp_path / 'vectordb'} is in use by process {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert first.returncode == 0
    # Gone: the folder is free again.
    settings = Settings(
        host="127.0.0.1",
        port=0,
        database_path=tmp_path / "app.db",
        vector_db_path=tmp_path / "vectordb",
        jwt_secret=TEST_SECRET,
    )
    _, stop = start_server(settings)
    stop()
