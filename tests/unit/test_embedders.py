"""Embedders: the in-process MiniLM model, and HttpEmbedder against a real local Ollama/OpenAI server."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from crewdb.errors import UnavailableError
from crewdb.vectors.embedders import (
    EMBEDDER_UNAVAILABLE,
    PROBE_TIMEOUT,
    HttpEmbedder,
    LocalEmbedder,
    Vector,
)


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _norm(vector: Sequence[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


# --- LocalEmbedder -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local() -> Iterator[LocalEmbedder]:
    """One loaded model for the whole module."""
    embedder = LocalEmbedder()
    embedder.warm_up()
    yield embedder
    embedder.close()


SAMPLES = [
    "Hi",
    "The cat sits on the mat.",
    "Quarterly tax filings for small businesses are due at the end of April in most states.",
    "Ein kurzer deutscher Satz über das Wetter.",
    "数据库中的向量搜索",
    " ".join(f"token{i}" for i in range(60)),
    "",
]


def test_local_vectors_are_384_long_and_unit_length(local: LocalEmbedder) -> None:
    vectors = local.embed(SAMPLES)
    assert len(vectors) == len(SAMPLES)
    assert local.dimension == 384
    for vector in vectors:
        assert len(vector) == 384
        assert all(math.isfinite(x) for x in vector)
        assert _norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_local_batch_gives_the_same_vectors_as_one_text_at_a_time(local: LocalEmbedder) -> None:
    # Texts of different lengths share a padded batch; padding must not change any of them.
    batched = local.embed(SAMPLES)
    for text, vector in zip(SAMPLES, batched, strict=True):
        (alone,) = local.embed([text])
        assert _cosine(vector, alone) > 0.9999, text


def test_local_paraphrases_score_higher_than_unrelated_texts(local: LocalEmbedder) -> None:
    cat, paraphrase, unrelated = local.embed(
        [
            "The cat sits on the mat.",
            "A cat is sitting on a rug.",
            "Quarterly tax filings are due in April.",
        ]
    )
    assert _cosine(cat, paraphrase) > _cosine(cat, unrelated) + 0.3


def test_local_empty_list_gives_no_vectors(local: LocalEmbedder) -> None:
    assert local.embed([]) == []


def test_local_texts_longer_than_256_tokens_are_cut_not_refused(local: LocalEmbedder) -> None:
    head = " ".join(f"word{i}" for i in range(400))
    long_a, long_b, short = local.embed([head + " apples", head + " a different ending", "short"])
    for vector in (long_a, long_b):
        assert len(vector) == 384
        assert _norm(vector) == pytest.approx(1.0, abs=1e-5)
    # Everything past the 256th token is cut, so the two endings make no difference.
    assert _cosine(long_a, long_b) > 0.9999
    assert _cosine(long_a, short) < 0.9


def test_local_embedder_reports_its_model_name() -> None:
    assert LocalEmbedder().model == "all-MiniLM-L6-v2-int8"


# --- LocalEmbedder with a fake model: failures of the tokenizer and the ONNX session -------------


@dataclass
class FakeEncoding:
    ids: list[int]


@dataclass
class FakeModel:
    """Stands in for the tokenizer and the ONNX session; each part fails when told to."""

    tokenizer_error: BaseException | None = None
    session_error: Exception | None = None
    load_errors: list[Exception] = field(default_factory=list)
    hidden_value: float = 1.0
    width: int = 384
    loads: int = 0
    runs: int = 0

    def load(self, threads: int) -> tuple[Any, Any]:
        self.loads += 1
        if self.load_errors:
            raise self.load_errors.pop(0)
        return self, self

    def encode_batch(self, texts: list[str]) -> list[FakeEncoding]:
        if self.tokenizer_error is not None:
            raise self.tokenizer_error
        return [FakeEncoding(list(range(1, len(text.split()) + 3))) for text in texts]

    def run(self, names: list[str], inputs: dict[str, Any]) -> list[Any]:
        self.runs += 1
        if self.session_error is not None:
            raise self.session_error
        rows, tokens = inputs["input_ids"].shape
        return [np.full((rows, tokens, self.width), self.hidden_value, dtype=np.float32)]


def _fake_local(model: FakeModel) -> LocalEmbedder:
    return LocalEmbedder(loader=model.load)


def test_local_fake_model_gives_unit_vectors() -> None:
    # The fake is good enough to embed: the failures below are the fake's doing, nothing else.
    vectors = _fake_local(FakeModel()).embed(["one", "two words"])
    assert [len(v) for v in vectors] == [384, 384]
    assert all(_norm(v) == pytest.approx(1.0, abs=1e-5) for v in vectors)


class PanicException(BaseException):
    """What a Rust panic inside `tokenizers` raises: PyO3's PanicException, a BaseException."""


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(FakeModel(tokenizer_error=Exception("Truncation error")), id="tokenizer"),
        pytest.param(FakeModel(tokenizer_error=TypeError("bad input")), id="tokenizer-type-error"),
        pytest.param(FakeModel(tokenizer_error=PanicException("rust panicked")), id="tokenizer-panic"),
        pytest.param(FakeModel(session_error=RuntimeError("ONNXRuntimeError: bad shape")), id="session"),
        pytest.param(FakeModel(hidden_value=float("nan")), id="nan-output"),
        pytest.param(FakeModel(width=12), id="wrong-width"),
    ],
)
def test_local_tokenizer_or_session_failures_are_unavailable(model: FakeModel) -> None:
    embedder = _fake_local(model)
    with pytest.raises(UnavailableError) as raised:
        embedder.embed(["some text", "more"])
    assert raised.value.reason == EMBEDDER_UNAVAILABLE
    assert "all-MiniLM-L6-v2-int8" in raised.value.message


def test_local_model_that_fails_to_load_is_unavailable_and_loads_on_a_later_call() -> None:
    model = FakeModel(load_errors=[RuntimeError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF")])
    embedder = _fake_local(model)
    with pytest.raises(UnavailableError) as raised:
        embedder.embed(["text"])
    assert raised.value.reason == EMBEDDER_UNAVAILABLE
    assert "cannot load" in raised.value.message
    assert len(embedder.embed(["text"])) == 1
    assert model.loads == 2


def test_local_probe_does_not_load_the_model_until_something_is_embedded() -> None:
    model = FakeModel()
    embedder = _fake_local(model)

    details = embedder.probe()

    assert details == {"model": "all-MiniLM-L6-v2-int8", "dimension": 384, "loaded": False}
    assert (model.loads, model.runs) == (0, 0)
    embedder.embed(["load it now"])
    assert embedder.probe()["loaded"] is True
    assert (model.loads, model.runs) == (1, 2)  # once loaded, the probe runs the model


def test_local_probe_of_a_loaded_model_that_fails_is_unavailable() -> None:
    model = FakeModel()
    embedder = _fake_local(model)
    embedder.embed(["load it"])
    model.session_error = RuntimeError("ONNXRuntimeError")
    with pytest.raises(UnavailableError) as raised:
        embedder.probe()
    assert raised.value.reason == EMBEDDER_UNAVAILABLE


# --- HttpEmbedder against a real HTTP server ---------------------------------------------------


def _raw_vector(text: str) -> Vector:
    """The server's deterministic, not normalised, vector for `text`."""
    return [float(len(text) + 1), float(sum(map(ord, text)) % 97 + 1), 2.0]


def _expected(text: str) -> Vector:
    raw = _raw_vector(text)
    norm = _norm(raw)
    return [x / norm for x in raw]


@dataclass
class Reply:
    """One scripted answer; `body` None means the correct embeddings for the request."""

    status: int = 200
    body: bytes | None = None
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class EmbeddingServer:
    """Ollama's POST /api/embed and GET /api/tags, OpenAI's POST /v1/embeddings and GET /v1/models,
    on 127.0.0.1, port 0."""

    httpd: ThreadingHTTPServer
    replies: list[Reply] = field(default_factory=list)
    requests: list[Seen] = field(default_factory=list)
    openai_reversed: bool = False
    listed: list[str] = field(default_factory=lambda: ["test-model:latest", "test-model"])
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def answer(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> Reply:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        with self.lock:
            self.requests.append(Seen(f"{method} {path}" if method == "GET" else path, headers, body))
            reply = self.replies.pop(0) if self.replies else Reply()
        if reply.body is not None or reply.status != 200:
            return Reply(reply.status, reply.body or b'{"error": "scripted"}', reply.delay, reply.headers)
        if method == "GET":
            return Reply(body=self._models(path), delay=reply.delay)
        status, answer, delay = self._embeddings(path, body, reply.delay)
        return Reply(status, answer, delay)

    def _models(self, path: str) -> bytes:
        if path == "/api/tags":
            models = [{"name": name, "model": name, "size": 274302450} for name in self.listed]
            return json.dumps({"models": models}).encode()
        if path == "/v1/models":
            data = [{"id": name, "object": "model", "owned_by": "test"} for name in self.listed]
            return json.dumps({"object": "list", "data": data}).encode()
        return b'{"error": "not found"}'

    def _embeddings(self, path: str, body: Any, delay: float) -> tuple[int, bytes, float]:
        texts: list[str] = body["input"]
        if path == "/api/embed":
            answer: dict[str, Any] = {"model": body["model"], "embeddings": [_raw_vector(t) for t in texts]}
        elif path == "/v1/embeddings":
            data = [
                {"object": "embedding", "index": i, "embedding": _raw_vector(t)} for i, t in enumerate(texts)
            ]
            answer = {"object": "list", "data": data[::-1] if self.openai_reversed else data}
        else:
            return 404, b'{"error": "not found"}', delay
        return 200, json.dumps(answer).encode(), delay


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that gave up (time-outs) break the pipe; that is expected here."""


def _handler(server: Callable[[], EmbeddingServer]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self._reply("POST")

        def do_GET(self) -> None:
            self._reply("GET")

        def _reply(self, method: str) -> None:
            fake = server()
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            reply = fake.answer(method, self.path, dict(self.headers.items()), raw)
            body = reply.body or b""
            if reply.delay:
                fake.release.wait(reply.delay)
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def embedding_server() -> Iterator[EmbeddingServer]:
    holder: list[EmbeddingServer] = []
    httpd = _QuietServer(("127.0.0.1", 0), _handler(lambda: holder[0]))
    fake = EmbeddingServer(httpd)
    holder.append(fake)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


MakeEmbedder = Callable[..., HttpEmbedder]


@pytest.fixture
def make_embedder(embedding_server: EmbeddingServer) -> Iterator[MakeEmbedder]:
    """HttpEmbedders aimed at the test server (openai ones at its /v1), closed afterwards."""
    made: list[HttpEmbedder] = []

    def make(kind: str = "ollama", **options: Any) -> HttpEmbedder:
        url = embedding_server.url + ("/v1" if kind == "openai" else "")
        options = {"model_name": "test-model", "timeout": 2.0, **options}
        embedder = HttpEmbedder(kind=kind, url=url, **options)
        made.append(embedder)
        return embedder

    yield make
    for embedder in made:
        embedder.close()


TEXTS = [f"text number {i}" + "!" * i for i in range(7)]


def _assert_vectors(vectors: list[Vector], texts: Sequence[str]) -> None:
    assert len(vectors) == len(texts)
    for vector, text in zip(vectors, texts, strict=True):
        assert vector == pytest.approx(_expected(text), abs=1e-12)
        assert _norm(vector) == pytest.approx(1.0, abs=1e-12)


def test_ollama_texts_go_in_batches_and_come_back_in_order(
    embedding_server: EmbeddingServer, make_embedder: MakeEmbedder
) -> None:
    embedder = make_embedder("ollama", batch_size=3)
    vectors = embedder.embed(TEXTS)
    _assert_vectors(vectors, TEXTS)
    assert [seen.path for seen in embedding_server.requests] == ["/api/embed"] * 3
    assert [seen.body for seen in embedding_server.requests] == [
        {"model": "test-model", "input": TEXTS[0:3]},
        {"model": "test-model", "input": TEXTS[3:6]},
        {"model": "test-model", "input": TEXTS[6:7]},
    ]


@pytest.mark.parametrize(
    ("count", "batch_size", "requests"), [(1, 32, 1), (32, 32, 1), (33, 32, 2), (5, 1, 5)]
)
def test_one_request_per_batch(
    embedding_server: EmbeddingServer, make_embedder: MakeEmbedder, count: int, batch_size: int, requests: int
) -> None:
    texts = [f"t{i}" for i in range(count)]
    _assert_vectors(make_embedder("ollama", batch_size=batch_size).embed(texts), texts)
    assert len(embedding_server.requests) == requests == math.ceil(count / batch_size)


def test_openai_answers_out_of_index_order_are_put_back_in_order(
    embedding_server: EmbeddingServer, make_embedder: MakeEmbedder
) -> None:
    embedding_server.openai_reversed = True
    embedder = make_embedder("openai", batch_size=2, model_name="text-embedding-3-small")
    _assert_vectors(embedder.embed(TEXTS), TEXTS)
    assert [seen.path for seen in embedding_server.requests] == ["/v1/embeddings"] * 4
    assert embedding_server.requests[0].body == {"model": "text-embedding-3-small", "input": TEXTS[:2]}
    assert embedder.model == "openai/text-embedding-3-small"


def test_empty_list_sends_nothing(embedding_server: EmbeddingServer, make_embedder: MakeEmbedder) -> None:
    assert make_embedder().embed([]) == []
    assert embedding_server.requests == []


def test_dimension_is_learnt_from_the_first_answer(make_embedder: MakeEmbedder) -> None:
    embedder = make_embedder("ollama")
    assert embedder.dimension is None
    assert embedder.model == "ollama/test-model"
    embedder.embed(["a"])
    assert embedder.dimension == 3


@pytest.mark.parametrize("kind", ["ollama", "openai"])
def test_bearer_token_is_sent_only_with_an_api_key(
    embedding_server: EmbeddingServer, make_embedder: MakeEmbedder, kind: str
) -> None:
    make_embedder(kind, api_key="sk-test-123").embed(["a"])
    make_embedder(kind).embed(["a"])
    with_key, without_key = (
        {name.lower(): value for name, value in seen.headers.items()} for seen in embedding_server.requests
    )
    assert with_key["authorization"] == "Bearer sk-test-123"
    assert "authorization" not in without_key


@pytest.mark.parametrize("statuses", [[500], [429], [503, 429], [502, 500]])
def test_server_errors_and_rate_limits_are_retried_until_success(
    embedding_server: EmbeddingServer, make_embedder: MakeEmbedder, statuses: list[int]
) -> None:
    embedding_server.replies = [Reply(status) for status in statuses]
    vectors = make_embedder("ollama", retries=2).embed(["a", "b"])
    _assert_vectors(vectors, ["a", "b"])
    assert len(embedding_server.requests) == len(statuses) + 1
    assert all(
        seen.body == {"model": "test-model", "input": ["a", "b"]} for seen in embedding_server.requests
    )


def test_retries_back_off_then_give_up(
    embedding_server: EmbeddingServer, make_embedder: MakeEmbedder
) -> None:
    embedding_server.replies = [Reply(500), Reply(500), Reply(500), Reply(200)]
    started = time.monotonic()
    with pytest.raises(UnavailableError) as raised:
        make_embedder("ollama", retries=2).embed(["a"])
    elapsed = time.monotonic() - started
    assert raised.value.reason == EMBEDDER_UNAVAILABLE
    assert "500" in raised.value.message
    assert len(embedding_server.requests) == 3
    assert 0.7 <= elapsed < 3.0  # 0.25 s then 0.5 s of backoff


@pytest.mark.parametrize("status", [400, 401, 404, 413, 422])
def test_other_client_errors_are_not_retried(
    embedding_server: EmbeddingServer, make_embedder: MakeEmbedder, status: int
) -> None:
    embedding_server.replies = [Reply(status)]
    with pytest.raises(UnavailableError) as raised:
        make_embedder("openai", retries=2).embed(["a"])
    assert raised.value.reason == EMBEDDER_UNAVAILABLE
    assert str(status) in raised.value.message
    assert len(embedding_server.requests) == 1


@pytest.mark.parametrize("kind", ["ollama", "openai"])
def test_a_server_that_hangs_past_the_timeout_is_unavailable_quickly(
    embedding_server: EmbeddingServer, make_embedder: MakeEmbedder, kind: str
) -> None:
    embedding_server.replies = [Reply(delay=10.0)]
    embedder = make_embedder(kind, timeout=0.5, retries=2)
    started = time.monotonic()
    with pytest.raises(UnavailableError) as raised:
        embedder.embed(["a"])
    assert time.monotonic() - started < 0.5 + 1.0
    assert raised.value.reason == EMBEDDER_UNAVAILABLE
    assert len(embedding_server.requests) == 1  # a time-out is not retried


def _ollama(vectors: object) -> bytes:
    return json.dumps({"embeddings": vectors}).encode()


def _openai(vectors: list[Any]) -> bytes:
    return json.dumps({"data": [{"index": i, "embedding": v} for i, v in enumerate(vectors)]}).encode()


BAD_ANSWERS: list[tuple[str, str, bytes]] = [
    ("ollama", "not-json", b"<html>gateway</html>"),
    ("ollama", "truncated-json", b'{"embeddings": [[1, 2'),
    ("ollama", "json-null", b"null"),
    ("ollama", "json-list", b"[[1, 2, 3], [4, 5, 6]]"),
    ("ollama", "missing-key", b'{"embedding": [[1, 2, 3], [4, 5, 6]]}'),
    ("ollama", "too-few", _ollama([[1, 2, 3]])),
    ("ollama", "too-many", _ollama([[1, 2, 3], [4, 5, 6], [7, 8, 9]])),
    ("ollama", "none", _ollama([])),
    ("ollama", "zero-vector", _ollama([[1, 2, 3], [0, 0, 0]])),
    ("ollama", "empty-vector", _ollama([[], []])),
    ("ollama", "nan", b'{"embeddings": [[1, 2, 3], [NaN, 1, 2]]}'),
    ("ollama", "infinity", b'{"embeddings": [[1, 2, 3], [Infinity, 1, 2]]}'),
    ("ollama", "differing-lengths", _ollama([[1, 2, 3], [1, 2]])),
    ("ollama", "strings", _ollama([[1, 2, 3], ["a", "b", "c"]])),
    ("ollama", "nulls", _ollama([[1, 2, 3], [None, 1, 2]])),
    ("ollama", "not-a-list", _ollama("oops")),
    ("openai", "not-json", b"Internal error"),
    ("openai", "missing-data", b'{"embeddings": [[1, 2, 3], [4, 5, 6]]}'),
    ("openai", "missing-index", b'{"data": [{"embedding": [1, 2, 3]}, {"embedding": [4, 5, 6]}]}'),
    ("openai", "too-few", _openai([[1, 2, 3]])),
    ("openai", "zero-vector", _openai([[0.0, 0.0, 0.0], [1, 2, 3]])),
    (
        "openai",
        "nan",
        b'{"data": [{"index": 0, "embedding": [NaN, 1, 2]}, {"index": 1, "embedding": [1, 2, 3]}]}',
    ),
    ("openai", "differing-lengths", _openai([[1, 2, 3, 4], [1, 2, 3]])),
    # Each of these escaped as another exception (INTERNAL): RecursionError, OverflowError, or
    # silently taken for numbers.
    ("ollama", "nested-too-deep", b"[" * 100_000 + b"]" * 100_000),
    ("openai", "nested-too-deep", b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("ollama", "integer-too-large-for-a-float", b'{"embeddings": [[1, 2, 3], [1' + b"0" * 400 + b", 1, 2]]}"),
    ("ollama", "booleans", _ollama([[1, 2, 3], [True, False, True]])),
    ("openai", "number-strings", _openai([[1, 2, 3], ["1", "2", "3"]])),
    ("ollama", "not-utf8", b'{"embeddings": "\xff\xfe"}'),
    ("openai", "data-of-numbers", b'{"data": [1, 2]}'),
    (
        "openai",
        "mixed-index-types",
        b'{"data": [{"index": "0", "embedding": [1]}, {"index": 1, "embedding": [1]}]}',
    ),
]


@pytest.mark.parametrize(
    ("kind", "body"), [(k, b) for k, _, b in BAD_ANSWERS], ids=[f"{k}-{n}" for k, n, _ in BAD_ANSWERS]
)
def test_answers_that_are_not_one_good_vector_per_text_are_unavailable(
    embedding_server: EmbeddingServer, make_embedder: MakeEmbedder, kind: str, body: bytes
) -> None:
    embedding_server.replies = [Reply(200, body)]
    with pytest.raises(UnavailableError) as raised:
        make_embedder(kind, retries=2).embed(["a", "b"])
    assert raised.value.reason == EMBEDDER_UNAVAILABLE
    assert len(embedding_server.requests) == 1


@pytest.mark.parametrize("kind", ["ollama", "openai"])
def test_an_answer_that_cannot_be_decompressed_is_unavailable(
    embedding_server: EmbeddingServer, make_embedder: MakeEmbedder, kind: str
) -> None:
    # httpx raises DecodingError, which is neither a time-out nor a transport error.
    embedding_server.replies = [Reply(200, b"this is not gzip", headers={"Content-Encoding": "gzip"})]
    with pytest.raises(UnavailableError) as raised:
        make_embedder(kind, retries=2).embed(["a"])
    assert raised.value.reason == EMBEDDER_UNAVAILABLE
    assert len(embedding_server.requests) == 1


def test_vectors_of_a_new_length_in_a_later_answer_are_unavailable(
    embedding_server: EmbeddingServer, make_embedder: MakeEmbedder
) -> None:
    embedder = make_embedder("ollama")
    embedder.embed(["a"])
    embedding_server.replies = [Reply(200, _ollama([[1, 2, 3, 4]]))]
    with pytest.raises(UnavailableError) as raised:
        embedder.embed(["b"])
    assert raised.value.reason == EMBEDDER_UNAVAILABLE
    assert embedder.dimension == 3


def test_a_rejected_answer_does_not_fix_the_dimension(
    embedding_server: EmbeddingServer, make_embedder: MakeEmbedder
) -> None:
    # The first answer is refused (its vectors differ in length); the dimension must come from
    # the first answer that is accepted, not from the refused one.
    embedder = make_embedder("ollama")
    embedding_server.replies = [Reply(200, _ollama([[1, 2, 3, 4], [1, 2, 3]]))]
    with pytest.raises(UnavailableError):
        embedder.embed(["a", "b"])
    assert embedder.dimension is None
    _assert_vectors(embedder.embed(["a", "b"]), ["a", "b"])
    assert embedder.dimension == 3


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.parametrize(("kind", "retries"), [("ollama", 0), ("openai", 1)])
def test_connection_refused_is_unavailable(kind: str, retries: int) -> None:
    url = f"http://127.0.0.1:{_closed_port()}" + ("/v1" if kind == "openai" else "")
    embedder = HttpEmbedder(kind=kind, url=url, model_name="m", timeout=1.0, retries=retries)
    try:
        started = time.monotonic()
        with pytest.raises(UnavailableError) as raised:
            embedder.embed(["a"])
        assert time.monotonic() - started < 2.0
    finally:
        embedder.close()
    assert raised.value.reason == EMBEDDER_UNAVAILABLE
    assert "cannot reach" in raised.value.message


# --- the health probe: a cheap GET, never an embedding ------------------------------------------


@pytest.mark.parametrize(
    ("kind", "request_line"), [("ollama", "GET /api/tags"), ("openai", "GET /v1/models")]
)
def test_probe_lists_the_models_and_embeds_nothing(
    embedding_server: EmbeddingServer, make_embedder: MakeEmbedder, kind: str, request_line: str
) -> None:
    embedder = make_embedder(kind)

    details = embedder.probe()
    embedder.probe()

    assert details == {"model": f"{kind}/test-model", "dimension": None, "url": embedder.url}
    assert [seen.path for seen in embedding_server.requests] == [request_line] * 2


def test_probe_sends_the_api_key(embedding_server: EmbeddingServer, make_embedder: MakeEmbedder) -> None:
    make_embedder("openai", api_key="sk-test-123").probe()
    (seen,) = embedding_server.requests
    assert {name.lower(): value for name, value in seen.headers.items()}[
        "authorization"
    ] == "Bearer sk-test-123"


LISTINGS: list[tuple[str, str, list[str], bool]] = [
    ("ollama", "nomic-embed-text", ["nomic-embed-text:latest"], True),  # no tag means :latest
    ("ollama", "nomic-embed-text:v1.5", ["nomic-embed-text:v1.5", "llama3:latest"], True),
    ("ollama", "nomic-embed-text:v1.5", ["nomic-embed-text:latest"], False),
    ("ollama", "nomic-embed-text", ["llama3:latest"], False),
    ("ollama", "nomic-embed-text", [], False),
    ("openai", "text-embedding-3-small", ["gpt-4o", "text-embedding-3-small"], True),
    ("openai", "text-embedding-3-small", ["text-embedding-3-large"], False),
]


@pytest.mark.parametrize(
    "case", LISTINGS, ids=[f"{k}-{m}-{'up' if up else 'down'}" for k, m, _, up in LISTINGS]
)
def test_probe_checks_that_the_server_lists_the_configured_model(
    embedding_server: EmbeddingServer, make_embedder: MakeEmbedder, case: tuple[str, str, list[str], bool]
) -> None:
    kind, model, listed, up = case
    embedding_server.listed = listed
    embedder = make_embedder(kind, model_name=model)
    if up:
        assert embedder.probe()["model"] == f"{kind}/{model}"
        return
    with pytest.raises(UnavailableError) as raised:
        embedder.probe()
    assert raised.value.reason == EMBEDDER_UNAVAILABLE
    assert repr(model) in raised.value.message


BAD_LISTINGS: list[tuple[str, Reply]] = [
    ("server-error", Reply(500)),  # not retried: the next health round is the retry
    ("bad-api-key", Reply(401)),
    ("not-json", Reply(200, b"<html>gateway</html>")),
    ("json-null", Reply(200, b"null")),
    ("wrong-shape", Reply(200, b'{"models": "nomic-embed-text", "data": 3}')),
    ("items-not-objects", Reply(200, b'{"models": [1, 2], "data": [1, 2]}')),
    ("nested-too-deep", Reply(200, b"[" * 100_000 + b"]" * 100_000)),
]


@pytest.mark.parametrize("kind", ["ollama", "openai"])
@pytest.mark.parametrize("reply", [r for _, r in BAD_LISTINGS], ids=[n for n, _ in BAD_LISTINGS])
def test_probe_of_a_failed_or_unreadable_model_list_is_unavailable(
    embedding_server: EmbeddingServer, make_embedder: MakeEmbedder, kind: str, reply: Reply
) -> None:
    embedding_server.replies = [reply]
    with pytest.raises(UnavailableError) as raised:
        make_embedder(kind, retries=2).probe()
    assert raised.value.reason == EMBEDDER_UNAVAILABLE
    assert len(embedding_server.requests) == 1


def test_probe_of_an_ollama_without_a_model_list_is_unavailable(
    embedding_server: EmbeddingServer, make_embedder: MakeEmbedder
) -> None:
    embedding_server.replies = [Reply(404)]
    with pytest.raises(UnavailableError) as raised:
        make_embedder("ollama").probe()
    assert "HTTP 404" in raised.value.message


@pytest.mark.parametrize("status", [404, 405])
def test_probe_of_an_openai_compatible_server_without_a_model_list_counts_it_as_reachable(
    embedding_server: EmbeddingServer, make_embedder: MakeEmbedder, status: int
) -> None:
    """Some proxies and servers speak /v1/embeddings only; a paid embedding is not the way to check them."""
    embedding_server.replies = [Reply(status)]
    details = make_embedder("openai").probe()
    assert details["models_listed"] is False
    assert [seen.path for seen in embedding_server.requests] == ["GET /v1/models"]


@pytest.mark.parametrize("kind", ["ollama", "openai"])
def test_probe_gives_up_after_the_short_probe_timeout_not_the_embedding_timeout(
    embedding_server: EmbeddingServer, make_embedder: MakeEmbedder, kind: str
) -> None:
    embedding_server.replies = [Reply(delay=10.0)]
    embedder = make_embedder(kind, timeout=30.0)
    started = time.monotonic()
    with pytest.raises(UnavailableError) as raised:
        embedder.probe()
    assert time.monotonic() - started < PROBE_TIMEOUT + 1.0
    assert raised.value.reason == EMBEDDER_UNAVAILABLE
    assert f"{PROBE_TIMEOUT:g}s" in raised.value.message


def test_probe_of_a_server_that_is_down_is_unavailable() -> None:
    embedder = HttpEmbedder(kind="ollama", url=f"http://127.0.0.1:{_closed_port()}", model_name="m")
    try:
        with pytest.raises(UnavailableError) as raised:
            embedder.probe()
    finally:
        embedder.close()
    assert raised.value.reason == EMBEDDER_UNAVAILABLE
    assert "cannot reach" in raised.value.message
