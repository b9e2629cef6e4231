"""How crewdb sets Chroma up and loads its model: cosine, no telemetry, batched upserts, lazy loading."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from crewdb.errors import FailedPreconditionError
from crewdb.vectors.filters import Scalar
from crewdb.vectors.store import UPSERT_BATCH, VectorStore
from tests.conftest import TEST_SECRET, RunningServer, sign_in
from tests.e2e.test_vectors import add, doc, search

MODEL = "test-model"


def test_collections_use_cosine_distance_and_telemetry_is_off(server: RunningServer) -> None:
    client = sign_in(server, "cosine")
    add(client.vectors, doc("a", "Bees make honey from nectar."))
    owner_collection = next(
        c for c in server.app.vectors._connect().list_collections() if c.name.startswith("agent-knowledge.")
    )
    assert owner_collection.configuration_json["hnsw"]["space"] == "cosine"
    assert server.app.vectors._connect().get_settings().anonymized_telemetry is False
    client.close()


def test_an_upsert_larger_than_a_batch_stores_every_chunk_once(tmp_path: Path) -> None:
    count = UPSERT_BATCH * 2 + 37  # two full batches and a remainder
    ids = [f"d#{i}@1" for i in range(count)]
    vectors = [[1.0, float(i % 7), float(i % 11)] for i in range(count)]
    metadatas: list[dict[str, Scalar]] = [{"_doc": "d", "_idx": i, "_rev": 1} for i in range(count)]

    async def scenario(store: VectorStore) -> tuple[int, list[str], int]:
        for round_ in ("first", "again"):  # the same ids again replace, never duplicate
            texts = [f"chunk {i} {round_}" for i in range(count)]
            await store.upsert("owner", MODEL, ids=ids, embeddings=vectors, texts=texts, metadatas=metadatas)
            if round_ == "first":
                first = await store.count("owner")
                labels = sorted(key for key, _, _ in await store.chunk_labels("owner"))
        return first, labels, await store.count("owner")

    store = VectorStore(collection="bulk-test", path=tmp_path / "vectordb", timeout=60)
    try:
        first, labels, after = asyncio.run(scenario(store))
    finally:
        store.close()
    assert first == count
    assert labels == sorted(ids)
    assert after == count


def test_the_embedding_model_loads_on_first_use_not_at_start(tmp_path: Path) -> None:
    """In a process of its own: the server starts without importing onnxruntime or loading the
    weights; the first search loads them."""
    script = textwrap.dedent(
        f"""
        import sys
        from tests.conftest import sign_in, start_server
        from tests.e2e.test_vectors import add, doc, search
        from crewdb.config import Settings
        from pathlib import Path

        folder = Path({str(tmp_path)!r})
        settings = Settings(host="127.0.0.1", port=0, database_path=folder / "app.db",
                            vector_db_path=folder / "vectordb", jwt_secret={TEST_SECRET!r})
        server, stop = start_server(settings)
        try:
            print("started", "onnxruntime" in sys.modules, flush=True)
            client = sign_in(server, "lazy")
            add(client.vectors, doc("a", "Bees make honey from nectar."))
            print("found", [r.document_id for r in search(client.vectors, "where does honey come from")])
            print("after", "onnxruntime" in sys.modules, flush=True)
            client.close()
        finally:
            stop()
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CREWDB_", "CHROMA_"))}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert "started False" in lines
    assert "found ['a']" in lines
    assert "after True" in lines


def test_search_results_come_from_the_callers_own_collection(server: RunningServer) -> None:
    mine, theirs = sign_in(server, "mine"), sign_in(server, "theirs")
    add(mine.vectors, doc("m", "Volcanoes erupt molten rock."))
    add(theirs.vectors, doc("t", "Volcanoes erupt lava and ash."))
    names = {c.name for c in server.app.vectors._connect().list_collections()}
    assert len([n for n in names if n.startswith("agent-knowledge.")]) == 2
    assert [r.document_id for r in search(mine.vectors, "volcano eruption")] == ["m"]
    assert [r.document_id for r in search(theirs.vectors, "volcano eruption")] == ["t"]
    mine.close()
    theirs.close()


def test_collections_of_another_deployment_whose_name_extends_ours_are_not_ours(tmp_path: Path) -> None:
    """`crewdb.team2.<owner>` belongs to the deployment whose collection is `crewdb.team2`, not
    to `crewdb`: the start-up check of `crewdb` must not take its chunks for strays."""
    ours = VectorStore(collection="crewdb", path=tmp_path / "vectordb")
    theirs = VectorStore(collection="crewdb.team2", path=tmp_path / "vectordb")

    async def scenario() -> tuple[list[str], list[str], int]:
        for store, owner in ((ours, "alice"), (theirs, "bob")):
            await store.upsert(
                owner,
                MODEL,
                ids=["d#0@1"],
                embeddings=[[1.0, 0.0]],
                texts=["t"],
                metadatas=[{"_doc": "d", "_idx": 0, "_rev": 1}],
            )
        exported = [batch.collection async for batch in ours.export(10)]
        return await ours.owners(), exported, await theirs.count("bob")

    try:
        owners, exported, kept = asyncio.run(scenario())
    finally:
        ours.close()
        theirs.close()
    assert owners == ["alice"]
    assert exported == ["crewdb.alice"]
    assert kept == 1


def test_a_vector_folder_that_cannot_be_made_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    store = VectorStore(collection="crewdb", path=tmp_path / "file" / "vectordb")
    try:
        with pytest.raises(FailedPreconditionError) as raised:
            store.claim()
    finally:
        store.close()
    assert raised.value.message.startswith(f"VECTOR_DB_PATH={tmp_path / 'file' / 'vectordb'} cannot be used")
