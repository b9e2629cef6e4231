"""Operating crewdb end to end: health probes, the admin health report, `crewdb health`, request ids, logs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import event

from crewdb import logs
from crewdb.cli import main
from crewdb.client import Client
from crewdb.config import Settings
from crewdb.models import UserRole
from crewdb.v1 import conversation_service_pb2 as conversation_pb
from crewdb.v1 import system_service_pb2 as system_pb
from crewdb.v1 import user_service_pb2 as user_pb
from crewdb.v1 import vector_service_pb2 as vector_pb
from crewdb.v1.system_service_pb2_grpc import SystemServiceStub
from crewdb.v1.user_service_pb2_grpc import UserServiceStub
from crewdb.v1.vector_service_pb2_grpc import VectorServiceStub
from tests.conftest import (
    PASSWORD,
    TEST_SECRET,
    RunningServer,
    free_port,
    sign_in,
    start_server,
    wait_serving,
)
from tests.e2e.test_vectors_chroma_server import ChromaServer
from tests.rpc_errors import failure

HOST = "127.0.0.1"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LIVENESS = "liveness"
VECTOR_SERVICE = "crewdb.v1.VectorService"
SYSTEM_SERVICE = "crewdb.v1.SystemService"
# The services that follow SQLite only.
SQLITE_SERVICES = (
    "crewdb.v1.UserService",
    "crewdb.v1.ConversationService",
    "crewdb.v1.TaskService",
    SYSTEM_SERVICE,
)
CREWDB_SERVICES = (*SQLITE_SERVICES, VECTOR_SERVICE)
HEALTH_NAMES = ("", LIVENESS, *CREWDB_SERVICES)
# Checks run every 0.2 s and each may take 1 s: a change must show well within this.
SETTLE = 10.0
DEADLINE = 10.0
# Chroma-server mode with short time limits, so outages are noticed within a few rounds.
CHECK_INTERVAL, CHECK_TIMEOUT, VECTOR_TIMEOUT = 0.2, 1.0, 2.0
REQUEST_ID_KEY = "x-request-id"
GENERATED_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
WRONG_PASSWORD = "not-the-password-Zebra-42!"  # noqa: S105 - a test fixture
GET_HEALTH_REPORT = "/crewdb.v1.SystemService/GetHealthReport"
DOCUMENTS = {
    "bread": "Knead the dough for ten minutes, let it rise for an hour, then bake the loaf at 220 degrees.",
    "tides": "The moon's gravity pulls the oceans, so the sea rises and falls twice a day along the coast.",
}


def _status(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE).status)


def _statuses(channel: grpc.Channel) -> dict[str, int]:
    return {name: _status(channel, name) for name in HEALTH_NAMES}


def _expected(not_serving: tuple[str, ...]) -> dict[str, int]:
    return {name: NOT_SERVING if name in not_serving else SERVING for name in HEALTH_NAMES}


def _wait_for_statuses(channel: grpc.Channel, expected: dict[str, int]) -> None:
    """Polls the health service until every name reports what `expected` says."""
    deadline = time.monotonic() + SETTLE
    while (seen := _statuses(channel)) != expected:
        assert time.monotonic() < deadline, f"health never settled: {seen} (expected {expected})"
        time.sleep(CHECK_INTERVAL / 2)


def _add_documents(vectors: VectorServiceStub) -> int:
    """Adds DOCUMENTS; returns how many chunks they became."""
    request = vector_pb.AddDocumentsRequest(
        documents=[vector_pb.DocumentInput(id=id_, text=text) for id_, text in DOCUMENTS.items()]
    )
    response: vector_pb.AddDocumentsResponse = vectors.AddDocuments(request, timeout=60)
    return sum(document.chunk_count for document in response.documents)


def _report(admin: Client) -> system_pb.HealthReport:
    report: system_pb.HealthReport = SystemServiceStub(admin.channel).GetHealthReport(
        system_pb.GetHealthReportRequest(), timeout=DEADLINE
    )
    return report


def _dependencies(report: system_pb.HealthReport) -> dict[str, system_pb.DependencyHealth]:
    return {dependency.name: dependency for dependency in report.dependencies}


def _details(dependency: system_pb.DependencyHealth) -> dict[str, Any]:
    details: dict[str, Any] = json_format.MessageToDict(dependency.details)
    return details


def _health_command(port: int, service: str, timeout: float = 2) -> int:
    argv = ["health", "--port", str(port), "--service", service, "--timeout", str(timeout)]
    # main() points the root logger at this test's captured stderr; later tests must not write there.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return main(argv, env={"CREWDB_HOST": HOST})
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _trailer(call: grpc.Call, key: str) -> str:
    value = dict(call.trailing_metadata() or ()).get(key)
    assert isinstance(value, str), f"no {key} in the trailers"
    return value


@pytest.fixture
def chroma(tmp_path: Path) -> Iterator[ChromaServer]:
    """A running `chroma run` server on its own port and folder."""
    server = ChromaServer(tmp_path / "chroma", free_port(), tmp_path / "chroma.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def on_chroma(settings: Settings, chroma: ChromaServer) -> Iterator[RunningServer]:
    """crewdb using the Chroma server, checking its dependencies every 0.2 s."""
    running, stop = start_server(
        settings.replace(
            chroma_host=HOST,
            chroma_port=chroma.port,
            vector_timeout=VECTOR_TIMEOUT,
            health_check_interval=CHECK_INTERVAL,
            health_check_timeout=CHECK_TIMEOUT,
        )
    )
    try:
        yield running
    finally:
        stop()


@pytest.fixture
def chroma_down(on_chroma: RunningServer, chroma: ChromaServer) -> RunningServer:
    """crewdb whose Chroma server has stopped, once its health service has noticed."""
    chroma.stop()
    with grpc.insecure_channel(on_chroma.address) as channel:
        _wait_for_statuses(channel, _expected(("", VECTOR_SERVICE)))
    return on_chroma


@pytest.fixture
def admin(server: RunningServer) -> Iterator[Client]:
    signed_in = sign_in(server, "root", UserRole.ADMIN)
    yield signed_in
    signed_in.close()


# --- the grpc.health.v1 service --------------------------------------------------------------


def test_every_health_name_is_serving_on_a_healthy_server_without_a_token(channel: grpc.Channel) -> None:
    assert _statuses(channel) == _expected(())


def test_health_of_an_unknown_name_is_not_found(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _status(channel, "crewdb.v1.NoSuchService")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
def test_a_chroma_outage_turns_readiness_and_vectors_not_serving_and_recovery_restores_them(
    on_chroma: RunningServer, chroma: ChromaServer
) -> None:
    with grpc.insecure_channel(on_chroma.address) as channel:
        _wait_for_statuses(channel, _expected(()))
        chroma.stop()
        _wait_for_statuses(channel, _expected(("", VECTOR_SERVICE)))
        chroma.start()  # same port and folder; crewdb itself is not restarted
        _wait_for_statuses(channel, _expected(()))


@pytest.mark.slow
def test_health_watch_streams_readiness_turning_not_serving_and_back(
    on_chroma: RunningServer, chroma: ChromaServer
) -> None:
    with grpc.insecure_channel(on_chroma.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=60
        )
        try:
            assert next(watch).status == SERVING
            chroma.stop()
            assert next(watch).status == NOT_SERVING
            chroma.start()
            assert next(watch).status == SERVING
        finally:
            watch.cancel()


def test_a_lost_database_turns_every_service_not_serving_but_not_liveness(
    server: RunningServer, channel: grpc.Channel
) -> None:
    server.app.db.close()  # every later query fails, as with a lost database
    _wait_for_statuses(channel, _expected(("", *CREWDB_SERVICES)))


# --- SystemService.GetHealthReport ----------------------------------------------------------


def test_health_report_without_a_token_is_unauthenticated(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        SystemServiceStub(channel).GetHealthReport(system_pb.GetHealthReportRequest(), timeout=DEADLINE)
    problem = failure(caught.value)
    assert (problem.code, problem.reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")


def test_health_report_for_a_plain_user_is_permission_denied(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _report(client)
    problem = failure(caught.value)
    assert (problem.code, problem.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")


def test_health_report_of_a_healthy_server_details_every_dependency(
    server: RunningServer, client: Client, admin: Client
) -> None:
    chunks = _add_documents(client.vectors)
    assert chunks >= len(DOCUMENTS)
    report = _report(admin)

    assert report.verdict == system_pb.VERDICT_HEALTHY
    dependencies = _dependencies(report)
    assert set(dependencies) == {"sqlite", "chroma", "embedder"}
    for dependency in dependencies.values():
        assert dependency.status == system_pb.DEPENDENCY_STATUS_UP, dependency
        assert dependency.latency_ms >= 0
        assert dependency.error == ""
    sqlite = _details(dependencies["sqlite"])
    assert sqlite["rows"]["users"] >= 2  # alice and root
    assert sqlite["page_count"] > 0
    assert sqlite["file_bytes"] > 0
    assert sqlite["path"] == str(server.settings.database_path)
    chroma = _details(dependencies["chroma"])
    assert chroma["mode"] == "embedded"
    assert chroma["version"]
    assert chroma["chunks"] == chunks
    assert chroma["collections"] == 1
    assert chroma["heartbeat_ms"] >= 0
    assert _details(dependencies["embedder"])["model"] == "all-MiniLM-L6-v2-int8"
    assert dict(report.services) == dict.fromkeys(HEALTH_NAMES, "SERVING")
    assert report.uptime_seconds > 0
    assert report.started_at.seconds > 0
    assert report.version


@pytest.mark.slow
def test_health_report_with_chroma_down_is_degraded_and_says_why(chroma_down: RunningServer) -> None:
    with sign_in(chroma_down, "root", UserRole.ADMIN) as admin:
        report = _report(admin)
    assert report.verdict == system_pb.VERDICT_DEGRADED
    dependencies = _dependencies(report)
    assert dependencies["chroma"].status == system_pb.DEPENDENCY_STATUS_DOWN
    assert dependencies["chroma"].error
    # The check is bounded by health_check_timeout, so a dead Chroma never stalls the report.
    assert dependencies["chroma"].latency_ms < (CHECK_TIMEOUT + 1) * 1000
    assert dependencies["sqlite"].status == system_pb.DEPENDENCY_STATUS_UP
    assert dependencies["embedder"].status == system_pb.DEPENDENCY_STATUS_UP
    assert report.services[""] == "NOT_SERVING"
    assert report.services[VECTOR_SERVICE] == "NOT_SERVING"
    assert report.services["crewdb.v1.UserService"] == "SERVING"
    assert report.services[LIVENESS] == "SERVING"


def test_health_report_behind_busy_database_threads_reports_sqlite_up_with_its_details(
    settings: Settings,
) -> None:
    # One reader thread, held by a long read (a search or an export): the report's row counts
    # wait for it, far longer than a check may take, yet SQLite answers its probe and is up.
    running, stop = start_server(settings.replace(db_read_threads=1, health_check_timeout=0.5))
    try:
        with (
            sign_in(running, "root", UserRole.ADMIN) as admin,
            grpc.insecure_channel(running.address) as channel,
        ):
            busy = asyncio.run_coroutine_threadsafe(
                running.app.db.read(lambda _: time.sleep(2)), running.loop
            )
            report = _report(admin)
            # Readiness never queued behind the busy reader either.
            assert _status(channel, "") == SERVING
            busy.result(DEADLINE)
    finally:
        stop()
    sqlite = _dependencies(report)["sqlite"]
    assert (sqlite.status, sqlite.error) == (system_pb.DEPENDENCY_STATUS_UP, "")
    assert sqlite.latency_ms < 500  # the probe's time, not the details'
    assert _details(sqlite)["rows"]["users"] == 1
    assert report.verdict != system_pb.VERDICT_UNHEALTHY  # SQLite, the one that decides that, is up


# --- the health checker -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure_", [RuntimeError("a bug in the check"), asyncio.CancelledError()], ids=["error", "cancelled"]
)
def test_the_health_checker_survives_an_unexpected_failure_in_a_check_and_keeps_checking(
    server: RunningServer,
    channel: grpc.Channel,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    failure_: BaseException,
) -> None:
    caplog.set_level(logging.INFO, logger="crewdb")

    async def broken_heartbeat() -> Any:
        raise failure_

    with monkeypatch.context() as patch:
        patch.setattr(server.app.vectors, "heartbeat", broken_heartbeat)
        # The failing check is marked down: readiness and the vector service turn NOT_SERVING.
        _wait_for_statuses(channel, _expected(("", VECTOR_SERVICE)))
    # ... and logged once, with its traceback, at ERROR.
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and "chroma" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    assert logged[0].exc_info is not None
    # The checker kept going: with the check working again, everything is SERVING.
    _wait_for_statuses(channel, _expected(()))


# --- `crewdb health` --------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["", LIVENESS, "crewdb.v1.ConversationService"])
def test_health_command_exits_0_for_a_serving_name(
    server: RunningServer, service: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _health_command(server.app.port, service) == 0
    assert "status: SERVING" in capsys.readouterr().out


def test_health_command_exits_4_when_the_database_is_lost(
    server: RunningServer, channel: grpc.Channel, capsys: pytest.CaptureFixture[str]
) -> None:
    server.app.db.close()
    _wait_for_statuses(channel, _expected(("", *CREWDB_SERVICES)))
    assert _health_command(server.app.port, "crewdb.v1.ConversationService") == 4
    assert "status: NOT_SERVING" in capsys.readouterr().out


@pytest.mark.slow
def test_health_command_exits_4_for_vectors_while_chroma_is_down(
    chroma_down: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _health_command(chroma_down.app.port, VECTOR_SERVICE) == 4
    assert "status: NOT_SERVING" in capsys.readouterr().out
    assert _health_command(chroma_down.app.port, LIVENESS) == 0


def test_health_command_exits_3_for_an_unknown_service(
    server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _health_command(server.app.port, "crewdb.v1.NoSuchService") == 3
    assert "NOT_FOUND" in capsys.readouterr().err


def test_health_command_exits_2_when_nothing_listens(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    assert _health_command(free_port(), "", timeout=0.5) == 2
    assert time.monotonic() - started < 5
    assert "cannot connect" in capsys.readouterr().err


@pytest.mark.slow
def test_health_command_in_a_subprocess_exits_0_for_a_serving_server(server: RunningServer) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "crewdb", "health", "--port", str(server.app.port)],
        env={**os.environ, "CREWDB_HOST": HOST},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "status: SERVING" in result.stdout


# --- request ids ------------------------------------------------------------------------------


def _create_conversation(client: Client, request_id: str | None = None) -> grpc.Call:
    metadata = ((REQUEST_ID_KEY, request_id),) if request_id is not None else ()
    _, call = client.conversations.CreateConversation.with_call(
        conversation_pb.CreateConversationRequest(title="ops"), metadata=metadata, timeout=DEADLINE
    )
    return call


def test_a_call_gets_its_own_request_id_back_in_the_trailers(client: Client) -> None:
    assert _trailer(_create_conversation(client, "abc-123"), REQUEST_ID_KEY) == "abc-123"


def test_a_call_without_a_request_id_gets_a_generated_one(client: Client) -> None:
    first = _trailer(_create_conversation(client), REQUEST_ID_KEY)
    second = _trailer(_create_conversation(client), REQUEST_ID_KEY)
    assert GENERATED_ID.fullmatch(first)
    assert first != second


def test_a_request_id_of_64_sane_characters_is_kept(client: Client) -> None:
    sent = "a.b_c:d-" + "x" * 56
    assert _trailer(_create_conversation(client, sent), REQUEST_ID_KEY) == sent


@pytest.mark.parametrize("sent", ["has spaces in it", "x" * 65, "semi;colon", 'quo"te'])
def test_an_insane_request_id_is_replaced_by_a_generated_one(client: Client, sent: str) -> None:
    returned = _trailer(_create_conversation(client, sent), REQUEST_ID_KEY)
    assert returned != sent
    assert GENERATED_ID.fullmatch(returned)


def test_a_streaming_call_gets_its_request_id_back_in_the_trailers(admin: Client) -> None:
    stream = SystemServiceStub(admin.channel).ExportVectors(
        system_pb.ExportVectorsRequest(), metadata=((REQUEST_ID_KEY, "export-1"),), timeout=DEADLINE
    )
    assert list(stream) == []  # nobody has stored anything
    assert _trailer(stream, REQUEST_ID_KEY) == "export-1"


@pytest.mark.parametrize("sent", ["trace-404", None])
def test_a_failed_call_carries_its_request_id_in_trailers_and_error_info(
    client: Client, sent: str | None
) -> None:
    metadata = ((REQUEST_ID_KEY, sent),) if sent is not None else ()
    with pytest.raises(grpc.RpcError) as caught:
        client.conversations.GetConversation(
            conversation_pb.GetConversationRequest(id="missing"), metadata=metadata, timeout=DEADLINE
        )
    problem = failure(caught.value)
    assert (problem.code, problem.reason) == (grpc.StatusCode.NOT_FOUND, "CONVERSATION_NOT_FOUND")
    assert isinstance(caught.value, grpc.Call)
    trailed = _trailer(caught.value, REQUEST_ID_KEY)
    assert problem.request_id == trailed
    if sent is not None:
        assert trailed == sent
    else:
        assert GENERATED_ID.fullmatch(trailed)


# --- logs -------------------------------------------------------------------------------------


def _call_records(caplog: pytest.LogCaptureFixture, request_id: str) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == "crewdb.rpc" and getattr(r, "request_id", None) == request_id
    ]


def _user_id(client: Client) -> str:
    me: user_pb.User = client.users.GetMe(user_pb.GetMeRequest(), timeout=DEADLINE)
    return me.id


def test_a_successful_call_logs_one_line_with_method_code_duration_caller_and_request_id(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crewdb.rpc")
    alice_id = _user_id(client)
    _create_conversation(client, "log-me-1")

    records = _call_records(caplog, "log-me-1")
    assert len(records) == 1, [r.getMessage() for r in records]
    record = records[0]
    assert record.levelno == logging.INFO
    assert record.__dict__["method"] == "/crewdb.v1.ConversationService/CreateConversation"
    assert record.__dict__["code"] == "OK"
    assert record.__dict__["reason"] == ""
    assert record.__dict__["duration_ms"] >= 0
    assert record.__dict__["user_id"] == alice_id


def test_a_failed_call_logs_one_line_with_its_code_and_reason(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crewdb.rpc")
    with pytest.raises(grpc.RpcError):
        client.conversations.GetConversation(
            conversation_pb.GetConversationRequest(id="missing"),
            metadata=((REQUEST_ID_KEY, "log-me-404"),),
            timeout=DEADLINE,
        )
    records = _call_records(caplog, "log-me-404")
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].__dict__["code"] == "NOT_FOUND"
    assert records[0].__dict__["reason"] == "CONVERSATION_NOT_FOUND"
    assert records[0].__dict__["method"] == "/crewdb.v1.ConversationService/GetConversation"


def _add_message(client: Client, conversation_id: str, text: str) -> conversation_pb.Message:
    request = conversation_pb.AddMessageRequest(
        conversation_id=conversation_id, role=conversation_pb.MESSAGE_ROLE_USER, content=text
    )
    message: conversation_pb.Message = client.conversations.AddMessage(request, timeout=DEADLINE)
    return message


def test_a_watch_the_client_cancels_still_logs_one_line(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crewdb.rpc")
    conversation = client.conversations.CreateConversation(
        conversation_pb.CreateConversationRequest(title="watched"), timeout=DEADLINE
    )
    first = _add_message(client, conversation.id, "one")
    _add_message(client, conversation.id, "two")
    # Replaying after the first message answers at once: no race with a live message.
    watch = client.conversations.WatchMessages(
        conversation_pb.WatchMessagesRequest(conversation_id=conversation.id, after_message_id=first.id),
        metadata=((REQUEST_ID_KEY, "watch-1"),),
        timeout=DEADLINE,
    )
    next(watch)  # the stream is open on the server
    watch.cancel()  # how a client stops watching
    deadline = time.monotonic() + 3
    while not (records := _call_records(caplog, "watch-1")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(records) == 1, "a cancelled stream left no log line"
    assert records[0].__dict__["method"] == "/crewdb.v1.ConversationService/WatchMessages"
    assert records[0].__dict__["code"] == "CANCELLED"


def test_a_call_log_line_names_the_peer(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="crewdb.rpc")
    _create_conversation(client, "log-peer-1")
    records = _call_records(caplog, "log-peer-1")
    assert len(records) == 1
    assert records[0].__dict__["peer"].startswith("ipv4:127.0.0.1:")
    assert json.loads(logs.JsonLines().format(records[0]))["peer"] == records[0].__dict__["peer"]


def test_log_lines_from_database_threads_carry_the_calls_request_id(
    server: RunningServer, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    statements = logging.getLogger("tests.statements")
    caplog.set_level(logging.INFO, logger="tests.statements")

    def log_statement(*_: Any) -> None:  # runs on whichever thread runs the query
        statements.info("statement on %s", threading.current_thread().name)

    event.listen(server.app.db.engine, "before_cursor_execute", log_statement)
    try:
        _create_conversation(client, "db-write-1")  # a write: the writer thread
        client.conversations.GetConversationStats(  # a scan: a reader thread
            conversation_pb.GetConversationStatsRequest(),
            metadata=((REQUEST_ID_KEY, "db-read-1"),),
            timeout=DEADLINE,
        )
    finally:
        event.remove(server.app.db.engine, "before_cursor_execute", log_statement)
    by_thread: dict[str, set[str]] = {}
    for record in caplog.records:
        thread = str(record.threadName)
        if record.name == "tests.statements" and thread.startswith("crewdb-db-"):
            by_thread.setdefault(thread.rsplit("_", 1)[0], set()).add(record.__dict__["request_id"])
    assert by_thread == {"crewdb-db-write": {"db-write-1"}, "crewdb-db-read": {"db-read-1"}}


def test_log_lines_from_embedding_and_chroma_threads_carry_the_calls_request_id(
    server: RunningServer, client: Client, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = logging.getLogger("tests.threads")
    caplog.set_level(logging.INFO, logger="tests.threads")
    knowledge, store = server.app.knowledge, server.app.vectors

    def logged(work: Any) -> Any:
        def run(*args: Any) -> Any:
            lines.info("work on %s", threading.current_thread().name)
            return work(*args)

        return run

    embedder = knowledge._embedder
    monkeypatch.setattr(embedder, "embed", logged(embedder.embed))
    monkeypatch.setattr(store, "_guarded", logged(store._guarded))
    request = vector_pb.AddDocumentsRequest(
        documents=[vector_pb.DocumentInput(id="d", text="Owls hunt at night.")]
    )
    client.vectors.AddDocuments(request, metadata=((REQUEST_ID_KEY, "vec-add-1"),), timeout=DEADLINE)
    client.vectors.Search(
        vector_pb.SearchRequest(query="nocturnal birds"),
        metadata=((REQUEST_ID_KEY, "vec-search-1"),),
        timeout=DEADLINE,
    )
    by_pool: dict[str, set[str]] = {}
    for record in caplog.records:
        if record.name == "tests.threads":
            pool = str(record.threadName).rsplit("_", 1)[0]
            by_pool.setdefault(pool, set()).add(record.__dict__.get("request_id", ""))
    assert by_pool["crewdb-embed"] == {"vec-add-1"}  # chunking and embedding the upload
    assert by_pool["crewdb-embed-query"] == {"vec-search-1"}
    # The health checker's own Chroma calls (no call, no request id) may run there too.
    assert {"vec-add-1", "vec-search-1"} <= by_pool["crewdb-chroma"]


def _security_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "crewdb.security" and r.levelno == logging.WARNING]


def test_a_failed_sign_in_is_a_security_warning_without_the_password(
    client: Client, channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crewdb.security")
    users = UserServiceStub(channel)
    # The second attempt pastes the password into the name field, as people do.
    for name, password in (("alice", WRONG_PASSWORD), (WRONG_PASSWORD, WRONG_PASSWORD)):
        with pytest.raises(grpc.RpcError) as caught:
            users.Login(
                user_pb.LoginRequest(email_or_username=name, password=password),
                metadata=((REQUEST_ID_KEY, "sign-in-1"),),
                timeout=DEADLINE,
            )
        assert failure(caught.value).reason == "INVALID_CREDENTIALS"
    warnings = _security_warnings(caplog)
    assert len(warnings) == 2, [r.getMessage() for r in warnings]
    for record in warnings:
        assert WRONG_PASSWORD not in record.getMessage()
        assert record.__dict__["request_id"] == "sign-in-1"  # traceable to the call


def test_a_permission_denied_call_is_logged_as_a_security_event(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crewdb.security")
    alice_id = _user_id(client)
    with pytest.raises(grpc.RpcError):
        _report(client)
    messages = [r.getMessage() for r in _security_warnings(caplog)]
    assert any(GET_HEALTH_REPORT in m and alice_id in m for m in messages), messages


def test_no_log_line_shows_a_password_or_a_token(
    server: RunningServer, channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.call(server.app.accounts.register("carol@example.com", "carol", PASSWORD))
    users = UserServiceStub(channel)
    signed_in: user_pb.LoginResponse = users.Login(
        user_pb.LoginRequest(email_or_username="carol", password=PASSWORD), timeout=DEADLINE
    )
    refreshed: user_pb.RefreshTokenResponse = users.RefreshToken(
        user_pb.RefreshTokenRequest(refresh_token=signed_in.refresh_token), timeout=DEADLINE
    )
    bearer = (("authorization", f"Bearer {refreshed.access_token}"),)
    VectorServiceStub(channel).AddDocuments(
        vector_pb.AddDocumentsRequest(documents=[vector_pb.DocumentInput(id="d", text=DOCUMENTS["bread"])]),
        metadata=bearer,
        timeout=60,
    )
    with pytest.raises(grpc.RpcError):
        users.Login(
            user_pb.LoginRequest(email_or_username="carol", password=WRONG_PASSWORD), timeout=DEADLINE
        )

    secrets = {
        "password": PASSWORD,
        "wrong password": WRONG_PASSWORD,
        "access token": signed_in.access_token,
        "refresh token": signed_in.refresh_token,
        "refreshed access token": refreshed.access_token,
        "refreshed refresh token": refreshed.refresh_token,
    }
    assert len(caplog.records) >= 4  # at least one line per call
    formatter = logs.JsonLines()
    for record in caplog.records:
        # The message and every field a JSON line would carry.
        for text in (record.getMessage(), formatter.format(record)):
            for what, secret in secrets.items():
                assert secret not in text, f"the {what} is in a log line: {text}"


# --- log formats ------------------------------------------------------------------------------


def test_json_lines_carry_time_level_logger_message_and_the_call_fields() -> None:
    record = logging.makeLogRecord(
        {
            "name": "crewdb.rpc",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "call %s",
            "args": ("done",),
            "request_id": "r1",
            "method": "/x/Y",
            "code": "OK",
            "duration_ms": 1.5,
            "user_id": "u1",
        }
    )
    entry = json.loads(logs.JsonLines().format(record))
    assert entry["request_id"] == "r1"
    assert entry["method"] == "/x/Y"
    assert entry["code"] == "OK"
    assert entry["duration_ms"] == 1.5
    assert entry["user_id"] == "u1"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "crewdb.rpc"
    assert entry["message"] == "call done"
    assert entry["time"].endswith("+00:00")
    assert "reason" not in entry  # only the fields the record has


def test_json_lines_keep_an_exception_on_the_same_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.makeLogRecord({"msg": "failed", "exc_info": sys.exc_info()})
    line = logs.JsonLines().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert "ValueError: boom" in entry["exception"]
    assert entry["request_id"] == "-"


@pytest.mark.slow
def test_serve_with_json_logs_writes_only_json_lines_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_PATH": str(tmp_path / "app.db"),
        "VECTOR_DB_PATH": str(tmp_path / "vectordb"),
        "CREWDB_PORT": str(port),
        "JWT_SECRET": TEST_SECRET,
        "CREWDB_LOG_FORMAT": "json",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "crewdb", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        address = f"{HOST}:{port}"
        wait_serving(address, process, timeout=30)
        with Client(address) as crew:
            crew.register("json@example.com", "json", PASSWORD)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    entries = []
    for line in stderr.splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
    calls = [e for e in entries if e.get("method") == "/crewdb.v1.UserService/Register"]
    assert len(calls) == 1, entries
    assert calls[0]["code"] == "OK"
    assert calls[0]["request_id"] not in ("", "-")
    assert any(e["message"] == "stopped" for e in entries), entries
