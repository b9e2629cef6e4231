"""`crewdb ingest` loads .txt/.md files into a running server as the signed-in account; again replaces."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from crewdb.cli import main
from crewdb.client import Client
from crewdb.v1 import vector_service_pb2 as pb
from tests.conftest import PASSWORD, RunningServer


def _corpus(root: Path) -> Path:
    folder = root / "notes"
    (folder / "deep" / "deeper").mkdir(parents=True)
    (folder / "refunds.md").write_text("# Refund policy\n\nMoney comes back within 30 days of a purchase.\n")
    (folder / "deep" / "shipping.txt").write_text("Parcels arrive in three to five working days.")
    (folder / "deep" / "deeper" / "long.md").write_text("A sentence about the weather. " * 400)
    (folder / "image.png").write_bytes(b"\x89PNG not text")  # not .txt/.md: never read
    (folder / "empty.txt").write_text("   \n")
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return folder


def _ingest(server: RunningServer, monkeypatch: pytest.MonkeyPatch, *paths: Path) -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    env = {"CREWDB_HOST": "127.0.0.1", "CREWDB_PORT": str(server.app.port), "JWT_SECRET": "x" * 32}
    argv = ["ingest", *map(str, paths), "--username", "alice", "--password-stdin", "--no-progress"]
    return main(argv, env)


def _documents(client: Client) -> dict[str, pb.Document]:
    listed = client.vectors.ListDocuments(pb.ListDocumentsRequest(page_size=200))
    return {doc.id: doc for doc in listed.documents}


def test_ingest_adds_text_and_markdown_files_recursively_and_reports_the_skipped(
    server: RunningServer,
    client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = _corpus(tmp_path)

    code = _ingest(server, monkeypatch, folder)

    assert code == 1  # two files were skipped, and the exit code says so
    documents = _documents(client)
    assert set(documents) == {
        (folder / "refunds.md").as_posix(),
        (folder / "deep" / "shipping.txt").as_posix(),
        (folder / "deep" / "deeper" / "long.md").as_posix(),
    }
    assert documents[(folder / "refunds.md").as_posix()].title == "Refund policy"
    assert documents[(folder / "deep" / "shipping.txt").as_posix()].title == "shipping"
    assert documents[(folder / "deep" / "deeper" / "long.md").as_posix()].chunk_count > 1
    assert "ingested 3 files" in capsys.readouterr().out
    found = client.vectors.Search(pb.SearchRequest(query="how long until my package is delivered", top_k=1))
    assert found.results[0].document_id == (folder / "deep" / "shipping.txt").as_posix()


def test_ingesting_again_replaces_instead_of_duplicating(
    server: RunningServer, client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    note = tmp_path / "note.md"
    note.write_text("First version of the note.")
    assert _ingest(server, monkeypatch, note) == 0
    note.write_text("Second version of the note.")

    assert _ingest(server, monkeypatch, note) == 0

    stats = client.vectors.GetVectorStats(pb.GetVectorStatsRequest())
    assert (stats.documents, stats.chunks) == (1, 1)
    document = client.vectors.GetDocument(pb.GetDocumentRequest(id=note.as_posix()))
    assert document.text == "Second version of the note."


def test_ingest_with_a_wrong_password_fails_without_adding_anything(
    server: RunningServer, client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    note = tmp_path / "note.txt"
    note.write_text("Some text.")
    monkeypatch.setattr("sys.stdin", io.StringIO("wrong password\n"))
    env = {"CREWDB_HOST": "127.0.0.1", "CREWDB_PORT": str(server.app.port), "JWT_SECRET": "x" * 32}

    code = main(["ingest", str(note), "--username", "alice", "--password-stdin", "--no-progress"], env)

    assert code == 1
    assert _documents(client) == {}
