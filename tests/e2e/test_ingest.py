"""`crewdb ingest` loads .txt/.md files into a running server as the signed-in account; again replaces;
a file that cannot be a document is reported and skipped, and the rest go in."""

from __future__ import annotations

import io
import os
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
    assert set(documents) == {"refunds.md", "deep/shipping.txt", "deep/deeper/long.md"}
    assert documents["refunds.md"].title == "Refund policy"
    assert documents["deep/shipping.txt"].title == "shipping"
    assert documents["deep/deeper/long.md"].chunk_count > 1
    out, err = capsys.readouterr()
    assert "ingested 3 files" in out
    assert f"skipped {folder / 'latin1.txt'}: not UTF-8 text" in err
    assert f"skipped {folder / 'empty.txt'}: empty" in err
    found = client.vectors.Search(pb.SearchRequest(query="how long until my package is delivered", top_k=1))
    assert found.results[0].document_id == "deep/shipping.txt"


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
    document = client.vectors.GetDocument(pb.GetDocumentRequest(id="note.md"))
    assert document.text == "Second version of the note."


def test_document_ids_are_the_same_from_any_working_directory_and_however_the_folder_is_named(
    server: RunningServer, client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _corpus(tmp_path)
    assert _ingest(server, monkeypatch, folder.resolve()) == 1  # absolute
    monkeypatch.chdir(tmp_path)
    assert _ingest(server, monkeypatch, Path("notes")) == 1  # relative
    monkeypatch.chdir(folder / "deep")
    assert _ingest(server, monkeypatch, Path("..")) == 1  # relative, from inside

    assert set(_documents(client)) == {"refunds.md", "deep/shipping.txt", "deep/deeper/long.md"}
    stats = client.vectors.GetVectorStats(pb.GetVectorStatsRequest())
    assert stats.documents == 3


def test_files_whose_names_the_server_would_refuse_are_skipped_and_the_rest_ingested(
    server: RunningServer,
    client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "good.md").write_text("A perfectly good note about bread.")
    (folder / "tab\there.md").write_text("A control character in the name.")
    # Two paths that differ only before their last 256 characters: cut to 256, one id for two files.
    tail = Path(*(["d" * 60] * 5))
    for top in ("a", "b"):
        (folder / top / tail).mkdir(parents=True)
        (folder / top / tail / "same.md").write_text(f"A note under {top}.")

    code = _ingest(server, monkeypatch, folder)

    assert code == 1
    assert set(_documents(client)) == {"good.md"}
    err = capsys.readouterr().err
    assert f"skipped {folder / 'tab	here.md'}: its name has control characters" in err
    for top in ("a", "b"):
        assert f"skipped {folder / top / tail / 'same.md'}: its document id" in err
    assert "longer than 256 characters" in err


def test_unreadable_entries_are_reported_and_skipped_and_the_rest_ingested(
    server: RunningServer,
    client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = _corpus(tmp_path)
    (folder / "gone.md").symlink_to(tmp_path / "nowhere.md")  # a dangling link: cannot be opened
    os.mkfifo(folder / "pipe.md")  # reading it would block forever
    missing = tmp_path / "missing.txt"

    code = _ingest(server, monkeypatch, folder, missing)

    assert code == 1
    assert set(_documents(client)) == {"refunds.md", "deep/shipping.txt", "deep/deeper/long.md"}
    out, err = capsys.readouterr()
    assert f"skipped {folder / 'gone.md'}: No such file or directory" in err
    assert f"skipped {folder / 'pipe.md'}: not a regular file" in err
    assert f"skipped {missing}: No such file or directory" in err
    assert "ingested 3 files (" in out


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_a_file_and_a_folder_without_read_permission_are_reported_and_skipped(
    server: RunningServer,
    client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = _corpus(tmp_path)
    (folder / "secret.md").write_text("Not for you.")
    (folder / "secret.md").chmod(0)
    (folder / "locked").mkdir()
    (folder / "locked" / "inside.md").write_text("Not for you either.")
    (folder / "locked").chmod(0)
    try:
        code = _ingest(server, monkeypatch, folder)
    finally:
        (folder / "locked").chmod(0o755)

    assert code == 1
    assert set(_documents(client)) == {"refunds.md", "deep/shipping.txt", "deep/deeper/long.md"}
    err = capsys.readouterr().err
    assert f"skipped {folder / 'secret.md'}: Permission denied" in err
    assert f"skipped {folder / 'locked'}: cannot read the folder: Permission denied" in err


def test_two_arguments_that_give_one_id_keep_the_first_and_report_the_second(
    server: RunningServer,
    client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "readme.md").write_text(f"The readme of {name}.")
    # The same file named twice (through its folder, then itself) is simply added once.
    code = _ingest(server, monkeypatch, tmp_path / "a", tmp_path / "a" / "readme.md", tmp_path / "b")

    assert code == 1
    document = client.vectors.GetDocument(pb.GetDocumentRequest(id="readme.md"))
    assert document.text == "The readme of a."
    assert client.vectors.GetVectorStats(pb.GetVectorStatsRequest()).documents == 1
    first, second = tmp_path / "a" / "readme.md", tmp_path / "b" / "readme.md"
    err = capsys.readouterr().err
    assert f"skipped {second}: the same document id 'readme.md' as {first}" in err
    assert f"skipped {first}" not in err


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


def test_a_document_the_server_refuses_is_skipped_and_the_rest_of_its_batch_ingested(
    server: RunningServer,
    client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The client's copy of the server's limits is out of date (a newer server is stricter): the
    # server refuses the whole batch, and the client finds the one document it objects to.
    monkeypatch.setattr("crewdb.ingest.MAX_ID", 10_000)
    folder = tmp_path / "notes"
    deep = folder / Path(*(["d" * 60] * 5))
    deep.mkdir(parents=True)
    (folder / "first.md").write_text("The first good note.")
    (deep / "long.md").write_text("A note whose id is too long for the server.")
    (folder / "second.md").write_text("The second good note.")

    code = _ingest(server, monkeypatch, folder)

    assert code == 1
    assert set(_documents(client)) == {"first.md", "second.md"}
    err = capsys.readouterr().err
    assert f"skipped {deep / 'long.md'}: refused by the server: INVALID_ARGUMENT:" in err
    assert "at most 256 characters" in err
