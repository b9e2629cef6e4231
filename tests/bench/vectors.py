"""`make bench`, knowledge base: embedding and ingest throughput, search latency at 10k and 100k chunks.

Runs in one process: a crewdb server (build_server) on a temp folder, its embedded Chroma, and
one grpc.aio client calling it sequentially. The baselines are measured on the same Chroma
instance in the same run: a direct `collection.query` with a precomputed query vector (what
Chroma alone costs), and Chroma's `where` filter over one shared 100k-chunk collection (the
single-collection design crewdb does not use).

The 10k/100k corpora get random unit vectors (recorded under the real model's name) instead of
model embeddings: embedding 100k chunks here would take over an hour, and the search cost
depends on the index size, not on what the vectors mean. Queries are embedded by the real
model, as in production.
"""

from __future__ import annotations

import asyncio
import random
import re
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpc import aio

from crewdb.config import Settings
from crewdb.models import NewDocument, Principal, UserRole
from crewdb.server import App, build_server
from crewdb.services.knowledge import KnowledgeBase
from crewdb.v1 import user_service_pb2 as users_pb
from crewdb.v1 import user_service_pb2_grpc as users_grpc
from crewdb.v1 import vector_service_pb2 as pb
from crewdb.v1 import vector_service_pb2_grpc as pb_grpc
from crewdb.vectors.embedders import LocalEmbedder, Vector

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "bench password, not a common one"  # noqa: S105 - a throwaway account on a temp database
# Words drawn from crewdb's own docs with a Zipf-like skew (a few common, most rare), as in
# real text: keyword search cost depends on how many chunks contain a query's words.
_DOC_WORDS = sorted(
    {
        w.lower()
        for path in sorted((ROOT / "docs").glob("*.md"))
        for w in re.findall(r"[A-Za-z]{3,}", path.read_text())
    }
    | {"agent", "refund", "parcel", "restore", "database", "model", "health", "service", "money", "night"}
)
_WEIGHTS = [1.0 / (rank + 1) for rank in range(len(_DOC_WORDS))]
CHUNKS_PER_DOCUMENT = 10
QUERIES = [
    "how do I get my money back",
    "when will my parcel arrive",
    "restore the database from last night",
    "which model embeds the documents",
    "is the service healthy",
]


@dataclass
class Timing:
    name: str
    seconds: list[float]

    def p(self, fraction: float) -> float:
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000


@dataclass
class Rate:
    name: str
    per_second: float
    unit: str


@dataclass
class VectorResults:
    rates: list[tuple[Rate, Rate | None]]
    searches: list[tuple[Timing, Timing]]


class RandomEmbedder:
    """Random unit vectors under the real model's name: bulk corpora without hours of embedding."""

    model = LocalEmbedder.model
    dimension = LocalEmbedder.dimension

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def embed(self, texts: Sequence[str]) -> list[Vector]:
        vectors = []
        for _ in texts:
            vector = [self._random.gauss(0.0, 1.0) for _ in range(self.dimension)]
            norm = sum(x * x for x in vector) ** 0.5
            vectors.append([x / norm for x in vector])
        return vectors

    def probe(self) -> dict[str, Any]:
        return {"model": self.model}

    def close(self) -> None:
        pass


def _text(rng: random.Random, characters: int) -> str:
    sentences = []
    length = 0
    while length < characters:
        words = rng.choices(_DOC_WORDS, weights=_WEIGHTS, k=rng.randint(8, 16))
        sentence = " ".join(words).capitalize() + ". "
        sentences.append(sentence)
        length += len(sentence)
    return "".join(sentences)[:characters]


async def _timed(name: str, call: Callable[[], Awaitable[object]], repeats: int) -> Timing:
    for _ in range(3):
        await call()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        await call()
        seconds.append(time.perf_counter() - started)
    return Timing(name, seconds)


async def _fill(app: App, owner: str, chunks: int, seed: int) -> Rate:
    """Stores `chunks` chunks for `owner` through the knowledge base, with random vectors."""
    bulk = KnowledgeBase(
        app.db,
        app.vectors,
        RandomEmbedder(seed),
        chunker=app.knowledge._chunker,
        page_tokens=app.knowledge._page_tokens,
        clock=app.knowledge._clock,
    )
    rng = random.Random(seed)
    principal = Principal(owner, UserRole.USER, "bench")
    documents = chunks // CHUNKS_PER_DOCUMENT
    started = time.perf_counter()
    for first in range(0, documents, 100):
        batch = [
            # 10 chunks of 1000 characters with 200 of overlap: 8200 characters.
            NewDocument(f"doc-{i}", _text(rng, 8150), f"Document {i}", {"group": i % 10, "seed": seed})
            for i in range(first, min(first + 100, documents))
        ]
        await bulk.add(principal, batch)
    bulk._embed_pool.shutdown()
    return Rate(
        f"Store {chunks:,} chunks (random vectors: chunking, Chroma, SQLite)",
        chunks / (time.perf_counter() - started),
        "chunks/s",
    )


async def run_vectors() -> VectorResults:
    rates: list[tuple[Rate, Rate | None]] = []
    searches: list[tuple[Timing, Timing]] = []
    with tempfile.TemporaryDirectory() as data:
        settings = Settings(
            host="127.0.0.1",
            port=0,
            database_path=Path(data) / "app.db",
            vector_db_path=Path(data) / "vectordb",
            jwt_secret="bench-secret-that-is-long-enough-for-hs256-0123456789",  # noqa: S106 - a temp server
            log_level="WARNING",
            # Bulk loads on a busy 2-core machine: an upsert batch may take a while.
            vector_timeout=120.0,
        )
        app = await build_server(settings)
        try:
            address = f"127.0.0.1:{app.port}"
            async with aio.insecure_channel(address) as channel:
                users = users_grpc.UserServiceStub(channel)
                tokens = {}
                for name in ("small", "large"):
                    user = await users.Register(
                        users_pb.RegisterRequest(
                            email=f"{name}@example.com", username=name, password=PASSWORD
                        )
                    )
                    login = await users.Login(
                        users_pb.LoginRequest(email_or_username=name, password=PASSWORD)
                    )
                    tokens[name] = (user.id, (("authorization", f"Bearer {login.access_token}"),))
                stub = pb_grpc.VectorServiceStub(channel)

                # Embedding alone, then the same chunks through AddDocuments (gRPC, chunking, embedding,
                # Chroma, SQLite).
                rng = random.Random(7)
                embedder = LocalEmbedder()
                embedder.warm_up()
                sentences = [_text(rng, 80) for _ in range(256)]
                started = time.perf_counter()
                embedder.embed(sentences)
                sentence_rate = Rate(
                    "Embed short sentences (80 characters)", 256 / (time.perf_counter() - started), "texts/s"
                )
                chunk_texts = [_text(rng, 1000) for _ in range(48)]
                started = time.perf_counter()
                embedder.embed(chunk_texts)
                chunk_rate = Rate(
                    "Embed chunks (1000 characters)", 48 / (time.perf_counter() - started), "texts/s"
                )
                rates.append((sentence_rate, None))
                rates.append((chunk_rate, None))
                docs = [pb.DocumentInput(id=f"ingest-{i}", text=_text(rng, 2600)) for i in range(24)]
                small_auth = tokens["small"][1]
                started = time.perf_counter()
                added = 0
                for first in range(0, len(docs), 8):
                    response = await stub.AddDocuments(
                        pb.AddDocumentsRequest(documents=docs[first : first + 8]),
                        metadata=small_auth,
                        timeout=600,
                    )
                    added += sum(d.chunk_count for d in response.documents)
                ingest = Rate(
                    "Ingest through AddDocuments (real model)",
                    added / (time.perf_counter() - started),
                    "chunks/s",
                )
                rates.append((ingest, chunk_rate))

                query_vectors = embedder.embed(QUERIES)
                repeats = 60

                async def crewdb_search(
                    auth: Any, mode: pb.SearchMode.ValueType = pb.SEARCH_MODE_SEMANTIC
                ) -> Callable[[], Awaitable[object]]:
                    counter = iter(range(10**9))

                    async def call() -> object:
                        query = QUERIES[next(counter) % len(QUERIES)]
                        return await stub.Search(
                            pb.SearchRequest(query=query, top_k=10, mode=mode), metadata=auth
                        )

                    return call

                def direct(
                    collection: Any, where: dict[str, Any] | None = None
                ) -> Callable[[], Awaitable[object]]:
                    counter = iter(range(10**9))

                    async def call() -> object:
                        vector = query_vectors[next(counter) % len(query_vectors)]
                        return await asyncio.to_thread(
                            collection.query, query_embeddings=[vector], n_results=10, where=where
                        )

                    return call

                client = app.vectors._connect()
                for owner_name, chunks in (("small", 10_000), ("large", 100_000)):
                    owner_id, auth = tokens[owner_name]
                    rates.append((await _fill(app, owner_id, chunks, seed=chunks), None))
                    collection = client.get_collection(app.vectors.collection_name(owner_id))
                    searches.append(
                        (
                            await _timed(
                                f"Chroma query alone, {chunks:,} chunks", direct(collection), repeats
                            ),
                            await _timed(
                                f"crewdb Search (semantic, query embedded), {chunks:,} chunks",
                                await crewdb_search(auth),
                                repeats,
                            ),
                        )
                    )
                large_auth = tokens["large"][1]
                for mode, label in ((pb.SEARCH_MODE_KEYWORD, "keyword"), (pb.SEARCH_MODE_HYBRID, "hybrid")):
                    searches.append(
                        (
                            searches[-1][0],
                            await _timed(
                                f"crewdb Search ({label}), 100,000 chunks",
                                await crewdb_search(large_auth, mode),
                                repeats,
                            ),
                        )
                    )

                # The design crewdb does not use: every owner in one collection, filtered by `where`.
                shared = client.get_or_create_collection(
                    "bench-shared", configuration={"hnsw": {"space": "cosine"}}, embedding_function=None
                )
                random_vectors = RandomEmbedder(99)
                batch = client.get_max_batch_size()
                total = 100_000
                for first in range(0, total, batch):
                    ids = [f"c{i}" for i in range(first, min(first + batch, total))]
                    shared.add(
                        ids=ids,
                        embeddings=random_vectors.embed(ids),
                        metadatas=[{"owner": f"owner-{i % 10}"} for i in range(first, first + len(ids))],
                    )
                searches.append(
                    (
                        await _timed(
                            "Chroma `where` owner filter, one shared collection of 100,000 (10 owners)",
                            direct(shared, {"owner": "owner-3"}),
                            repeats,
                        ),
                        await _timed(
                            "crewdb Search for an owner with 10,000 chunks (110,000 stored in all)",
                            await crewdb_search(tokens["small"][1]),
                            repeats,
                        ),
                    )
                )
        finally:
            await app.stop(1.0)
    return VectorResults(rates, searches)


def report_vectors(results: VectorResults) -> list[str]:
    lines = [
        "",
        "## Knowledge base",
        "",
        "In one process: the server (build_server), its embedded Chroma, and one client calling",
        "sequentially (tests/bench/vectors.py). The 10k and 100k corpora have random unit vectors",
        "(searching costs the same whatever the vectors mean; embedding 100k chunks here would take",
        "over an hour); queries are embedded by the real model.",
        "",
        "| throughput | per second | ratio |",
        "| --- | ---: | ---: |",
    ]
    for rate, base in results.rates:
        ratio = f"{rate.per_second / base.per_second:.2f} (to embedding alone)" if base else ""
        lines.append(f"| {rate.name} | {rate.per_second:,.1f} {rate.unit} | {ratio} |")
    lines += [
        "",
        "| search (top 10) | p50 ms | p99 ms | baseline | baseline p50 ms | p50 ratio to baseline |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for direct, timing in results.searches:
        lines.append(
            f"| {timing.name} | {timing.p(0.5):.1f} | {timing.p(0.99):.1f} | {direct.name} "
            f"| {direct.p(0.5):.1f} | {timing.p(0.5) / direct.p(0.5):.2f} |"
        )
    return lines


VECTOR_READING = """
- Targets from the issue: owner-scoped search under 20 ms p50 at 100k chunks, where Chroma's
  own `where` filter over a shared collection took 90-135 ms.
- Each account has its own Chroma collection, so an owner's search reads only that owner's
  HNSW index: no `where` filter, and no way for a filter to reach another owner's chunks.
- crewdb's Search adds to Chroma's query: embedding the query (a few ms for a short one on
  this CPU), one SQLite read of the found documents' current revisions, titles and metadata,
  and the gRPC round trip.
"""
