"""The `crewdb` command on bad input (one line on stderr, a non-zero exit, never a traceback), `health`'s
exit codes, and `backup`/`restore` next to a running server process, and a durable manifest."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from crewdb.cli import main
from tests.conftest import TEST_SECRET, free_port, wait_serving

CommandCase = tuple[list[str], dict[str, str], int, str]


@pytest.fixture(autouse=True)
def _keep_root_logger() -> Iterator[None]:
    """main() configures the root logger; later tests must find it as it was."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Data paths in `tmp_path`, and a port where nothing listens."""
    return {
        "DATABASE_PATH": str(tmp_path / "app.db"),
        "VECTOR_DB_PATH": str(tmp_path / "vectordb"),
        "CREWDB_HOST": "127.0.0.1",
        "CREWDB_PORT": str(free_port()),
        "JWT_SECRET": TEST_SECRET,
        **extra,
    }


def _run(argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """main() in-process: its exit status (argparse's too) and what it wrote to stderr."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.stdin", io.StringIO(""))
        try:
            code = main(argv, env)
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# --- health: grpc_health_probe's exit codes ------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        pytest.param([], {"CREWDB_PORT": "abc"}, id="env-port-not-a-number"),
        pytest.param([], {"CREWDB_LOG_LEVEL": "LOUD"}, id="env-log-level"),
        pytest.param(["--port", "abc"], {}, id="flag-port"),
        pytest.param(["--timeout", "nan"], {}, id="timeout-nan"),  # waited forever
        pytest.param(["--timeout", "inf"], {}, id="timeout-inf"),  # a traceback (OverflowError)
        pytest.param(["--timeout", "-1"], {}, id="timeout-negative"),
        pytest.param(["--bogus"], {}, id="unknown-flag"),
    ],
)
def test_health_with_bad_flags_or_environment_exits_1_with_one_line(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run(["health", "--port", str(free_port()), *argv], env, capsys)

    assert code == 1  # grpc_health_probe: 1 is bad flags; 2 would say "cannot connect"
    assert _one_line(err).startswith("crewdb health: ")


def test_health_help_lists_every_exit_code() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "crewdb", "health", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "400"},  # argparse wraps to the terminal's width
        check=False,
    )
    assert result.returncode == 0
    for words in (
        "0 SERVING",
        "1 bad flags",
        "2 the server cannot be reached",
        "3 the call fails",
        "4 it answers",
    ):
        assert words in result.stdout


def test_health_of_a_server_that_is_not_there_still_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(["health", "--port", str(free_port()), "--timeout", "0.5"], {}, capsys)
    assert code == 2
    assert "cannot connect" in _one_line(err)


# --- every command: one line and a non-zero exit on bad input -----------------------------------


@pytest.mark.parametrize("command", ["migrate", "backup", "restore", "ingest", "create-admin", "serve"])
def test_a_bad_environment_value_is_one_line_and_exit_2(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = {
        "backup": ["backup", str(tmp_path / "b")],
        "restore": ["restore", str(tmp_path / "b")],
        "ingest": ["ingest", str(tmp_path), "--username", "u", "--password-stdin"],
        "create-admin": ["create-admin", "--email", "a@b.co", "--username", "u", "--password-stdin"],
    }.get(command, [command])

    code, err = _run(argv, {"CREWDB_PORT": "abc", "CREWDB_CHUNK_SIZE": "1"}, capsys)

    assert code == 2
    line = _one_line(err)
    assert line.startswith(f"crewdb {command}: invalid configuration: CREWDB_PORT='abc'")
    assert "CREWDB_CHUNK_SIZE='1'" in line


def _bad_input_cases(tmp_path: Path) -> dict[str, CommandCase]:
    """name -> (argv, env, exit status, what stderr says)."""
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "garbage.db").write_text("not SQLite")
    (tmp_path / "empty.db").touch()
    (tmp_path / "bad-manifest").mkdir()
    (tmp_path / "bad-manifest" / "manifest.json").write_text("[1]")
    backup = str(tmp_path / "backup")
    return {
        "backup-missing-database": (
            ["backup", backup],
            _env(tmp_path, DATABASE_PATH=str(tmp_path / "missing.db")),
            1,
            f"the database {tmp_path / 'missing.db'} (DATABASE_PATH) does not exist",
        ),
        "backup-database-is-a-folder": (
            ["backup", backup],
            _env(tmp_path, DATABASE_PATH=str(tmp_path)),
            1,
            "(DATABASE_PATH) is not a file",
        ),
        "backup-database-not-sqlite": (
            ["backup", backup],
            _env(tmp_path, DATABASE_PATH=str(tmp_path / "garbage.db")),
            1,
            "cannot copy the database",
        ),
        "backup-database-empty": (
            ["backup", backup],
            _env(tmp_path, DATABASE_PATH=str(tmp_path / "empty.db")),
            1,
            "cannot copy the database",
        ),
        "backup-into-a-file": (
            ["backup", str(tmp_path / "a-file")],
            _env(tmp_path, DATABASE_PATH=str(tmp_path / "empty.db")),
            1,
            "as the backup folder: Not a directory",
        ),
        "restore-missing-backup": (
            ["restore", str(tmp_path / "nowhere")],
            _env(tmp_path),
            1,
            "manifest.json: No such file or directory",
        ),
        "restore-manifest-not-an-object": (
            ["restore", str(tmp_path / "bad-manifest")],
            _env(tmp_path),
            1,
            "unknown backup format None",
        ),
        "migrate-database-under-a-file": (
            ["migrate"],
            _env(tmp_path, DATABASE_PATH=str(tmp_path / "a-file" / "app.db")),
            1,
            "cannot open or migrate the database",
        ),
        "ingest-batch-size": (
            ["ingest", str(tmp_path), "--username", "u", "--password-stdin", "--batch-size", "0"],
            _env(tmp_path),
            2,
            "crewdb ingest: error: argument --batch-size",
        ),
        "ingest-no-server": (
            ["ingest", str(tmp_path / "missing.md"), "--username", "u", "--password-stdin"],
            _env(tmp_path),
            1,
            "failed: UNAVAILABLE",
        ),
        "no-command": ([], {}, 2, "crewdb: error: the following arguments are required: COMMAND"),
    }


CASES = [
    "backup-missing-database",
    "backup-database-is-a-folder",
    "backup-database-not-sqlite",
    "backup-database-empty",
    "backup-into-a-file",
    "restore-missing-backup",
    "restore-manifest-not-an-object",
    "migrate-database-under-a-file",
    "ingest-batch-size",
    "ingest-no-server",
    "no-command",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_on_stderr_and_a_non_zero_exit(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, env, status, says = _bad_input_cases(tmp_path)[case]

    code, err = _run(
        [*argv, "--no-progress"] if argv and argv[0] in ("backup", "restore") else argv, env, capsys
    )

    assert code == status
    assert says in _one_line(err)
    assert not (tmp_path / "backup").exists()  # a refused backup leaves nothing behind


def test_backup_of_a_missing_database_in_a_real_process_prints_one_line_not_a_traceback(
    tmp_path: Path,
) -> None:
    env = {**os.environ, **_env(tmp_path, DATABASE_PATH=str(tmp_path / "missing.db"))}

    result = subprocess.run(
        [sys.executable, "-m", "crewdb", "backup", str(tmp_path / "backup"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )

    assert result.returncode == 1
    assert "does not exist" in _one_line(result.stderr)
    assert not (tmp_path / "backup").exists()


# --- backup and restore beside a running server process ------------------------------------------


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    """`crewdb serve` in its own process over data paths in tmp_path/data; its environment."""
    env = _env(tmp_path / "data")
    process = subprocess.Popen(
        [sys.executable, "-m", "crewdb", "serve"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_serving(f"127.0.0.1:{env['CREWDB_PORT']}", process)
        yield process, env
    finally:
        process.terminate()
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


@pytest.mark.slow
def test_backup_refuses_to_open_the_embedded_chroma_of_a_server_it_cannot_reach(
    server_process: tuple[subprocess.Popen[str], dict[str, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    process, env = server_process
    destination = tmp_path / "backup"
    # The server listens elsewhere than backup looks (a wrong CREWDB_PORT, or a server too busy to
    # answer in time): backup must not open the Chroma files the server has open.
    elsewhere = {**env, "CREWDB_PORT": str(free_port())}

    code, err = _run(["backup", str(destination), "--no-progress"], elsewhere, capsys)

    assert code == 1
    line = _one_line(err)
    assert f"process {process.pid} (" in line
    assert "an embedded Chroma may be opened by one process only" in line
    assert "--port" in line
    assert not destination.exists()
    assert process.poll() is None


@pytest.mark.slow
def test_restore_refuses_to_write_into_the_embedded_chroma_of_a_running_server(
    server_process: tuple[subprocess.Popen[str], dict[str, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    process, env = server_process
    # A backup of another deployment, taken with its server stopped.
    other = _env(tmp_path / "other")
    assert _run(["migrate"], other, capsys)[0] == 0
    assert _run(["backup", str(tmp_path / "backup"), "--no-progress"], other, capsys)[0] == 0
    # Into a new database file, but the running server's Chroma folder.
    target = {**env, "DATABASE_PATH": str(tmp_path / "new" / "app.db"), "CREWDB_PORT": str(free_port())}

    code, err = _run(["restore", str(tmp_path / "backup"), "--no-progress"], target, capsys)

    assert code == 1
    assert f"process {process.pid} (" in _one_line(err)
    assert not (tmp_path / "new" / "app.db").exists()


# --- the manifest is on disk before backup reports success ---------------------------------------


def test_backup_fsyncs_its_files_and_the_manifest_and_the_folder_before_it_succeeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _env(tmp_path / "data")
    assert _run(["migrate"], env, capsys)[0] == 0
    synced: list[tuple[int, int]] = []
    real_fsync: Callable[[int], None] = os.fsync

    def recording_fsync(fd: int) -> None:
        real_fsync(fd)  # the real thing; this only notes which file it was
        info = os.fstat(fd)
        synced.append((info.st_dev, info.st_ino))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    destination = tmp_path / "backups" / "today"

    code, _ = _run(["backup", str(destination), "--no-progress"], env, capsys)

    assert code == 0

    def identity(path: Path) -> tuple[int, int]:
        info = path.stat()
        return info.st_dev, info.st_ino

    for name in ("app.db", "vectors.jsonl", "manifest.json"):
        assert identity(destination / name) in synced, name
    # The folder's entries after the manifest's content (renamed into place), and the new folder's
    # own entry in its parent.
    manifest, folder = (
        synced.index(identity(destination / "manifest.json")),
        synced.index(identity(destination)),
    )
    assert manifest < folder
    assert identity(destination.parent) in synced
    assert sorted(p.name for p in destination.iterdir()) == ["app.db", "manifest.json", "vectors.jsonl"]
    assert json.loads((destination / "manifest.json").read_text())["format"] == 1
