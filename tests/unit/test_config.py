"""Settings.from_env: defaults, casting, and errors that name the variable and the value."""

from __future__ import annotations

from pathlib import Path

import pytest

from crewdb.config import ConfigError, Settings


def test_defaults_are_the_embedded_ones() -> None:
    settings = Settings.from_env({})
    assert settings.host == "127.0.0.1"
    assert settings.port == 50051
    assert settings.database_path == Path("./data/app.db")
    assert settings.vector_db_path == Path("./data/vectordb")
    assert settings.chroma_host is None
    assert settings.jwt_secret is None


def test_values_are_read_and_cast() -> None:
    settings = Settings.from_env(
        {
            "CREWDB_HOST": "0.0.0.0",  # noqa: S104 - a value under test, nothing binds to it
            "CREWDB_PORT": "6000",
            "DATABASE_PATH": "/tmp/x.db",  # noqa: S108 - a value under test
            "CHROMA_HOST": "chroma.internal",
            "CHROMA_PORT": "8000",
            "CREWDB_LOG_LEVEL": "debug",
            "CREWDB_HEALTH_CHECK_INTERVAL": "2.5",
        }
    )
    assert settings.port == 6000
    assert settings.database_path == Path("/tmp/x.db")  # noqa: S108
    assert settings.chroma_port == 8000
    assert settings.log_level == "DEBUG"
    assert settings.health_check_interval == 2.5


def test_every_bad_value_is_reported_with_its_variable_and_value() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(
            {
                "CREWDB_PORT": "http",
                "CHROMA_PORT": "70000",
                "CREWDB_LOG_LEVEL": "LOUD",
                "CREWDB_HEALTH_CHECK_INTERVAL": "nan",
            }
        )
    message = str(caught.value)
    assert "CREWDB_PORT='http'" in message
    assert "CHROMA_PORT='70000'" in message
    assert "CREWDB_LOG_LEVEL='LOUD'" in message
    assert "CREWDB_HEALTH_CHECK_INTERVAL='nan'" in message


def test_chroma_port_without_host_is_refused() -> None:
    with pytest.raises(ConfigError, match="CHROMA_PORT is set but CHROMA_HOST is not"):
        Settings.from_env({"CHROMA_PORT": "8000"})


def test_secret_never_appears_in_repr() -> None:
    settings = Settings.from_env({"JWT_SECRET": "s3cr3t-value-that-must-not-leak-anywhere"})
    assert "s3cr3t" not in repr(settings)


def test_only_an_unconfigured_server_may_make_up_its_own_secret() -> None:
    assert Settings.from_env({}).embedded_defaults
    assert Settings.from_env({"CREWDB_PORT": "6000"}).embedded_defaults
    for name, value in [("DATABASE_PATH", "/srv/app.db"), ("CREWDB_HOST", "0.0.0.0")]:  # noqa: S104
        assert not Settings.from_env({name: value}).embedded_defaults


def test_an_embedder_url_with_credentials_is_refused_without_showing_them() -> None:
    env = {"CREWDB_EMBEDDER": "openai", "CREWDB_EMBEDDER_URL": "https://bob:hunter2-secret@llm.example/v1"}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    message = str(caught.value)
    assert (
        "CREWDB_EMBEDDER_URL='https://***@llm.example/v1': must not carry a user name or password" in message
    )
    assert "hunter2" not in message
    assert "bob" not in message
    assert Settings.from_env({**env, "CREWDB_EMBEDDER_URL": "https://llm.example/v1"}).embedder_url == (
        "https://llm.example/v1"
    )
