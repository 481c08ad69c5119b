"""Settings: precedence, profiles, and bad input rejected at init_app with a clear message."""

from __future__ import annotations

import pathlib
import typing as t

import pytest
from flask import Flask

from flask_neon import NeonConfigError, NeonDB
from flask_neon._profiles import PROFILES, pool_config, resolve_profile
from flask_neon._settings import NeonSettings
from flask_neon._settings_loader import load_settings

SECRET = "Sup3r-Secret-pw"
GOOD_URL = f"postgresql://alex:{SECRET}@127.0.0.1:5432/test"
NEON_POOLER_HOST = "ep-a-1-pooler.us-east-2.aws.neon.tech"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """No DB_* variable of the developer's shell, and no .env of the checkout, leaks in."""
    import os

    for key in list(os.environ):
        if key.upper().startswith("DB_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_precedence_app_config_over_environment_over_dotenv_over_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        f"DB_URL={GOOD_URL}\nDB_POOL_SIZE=7\nDB_MAX_OVERFLOW=3\nDB_POOL_TIMEOUT=12\n"
    )
    monkeypatch.setenv("DB_POOL_SIZE", "8")
    monkeypatch.setenv("DB_MAX_OVERFLOW", "4")
    loaded = load_settings({"DB_POOL_SIZE": 9}, env_file)
    settings = loaded.settings
    assert (settings.pool_size, settings.max_overflow, settings.pool_timeout) == (9, 4, 12)
    assert settings.pool_recycle == 1800
    assert loaded.sources["pool_size"] == "app.config"
    assert loaded.sources["max_overflow"] == "environment"
    assert loaded.sources["pool_timeout"] == ".env"
    assert loaded.sources["url"] == ".env"
    assert loaded.sources["pool_recycle"] == "default"


def test_none_in_app_config_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_URL", GOOD_URL)
    monkeypatch.setenv("DB_POOL_SIZE", "6")
    loaded = load_settings({"DB_POOL_SIZE": None}, None)
    assert loaded.settings.pool_size == 6


def test_values_are_stripped_and_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_settings(
        {"DB_URL": f"  {GOOD_URL}\n", "DB_ECHO": "yes", "DB_STATEMENT_TIMEOUT": "2.5"}, None
    )
    assert loaded.settings.url.get_secret_value() == GOOD_URL
    assert loaded.settings.echo is True
    assert loaded.settings.statement_timeout == 2.5


def test_the_url_is_a_secret_in_repr() -> None:
    settings = load_settings({"DB_URL": GOOD_URL}, None).settings
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)


@pytest.mark.parametrize(
    ("debug", "configured", "expected"),
    [
        (True, None, "development"),
        (False, None, "production"),
        (True, "production", "production"),
        (False, "serverless", "serverless"),
    ],
)
def test_profile_defaults_to_debug_mode(
    debug: bool, configured: str | None, expected: str
) -> None:
    loaded = load_settings({"DB_URL": GOOD_URL, "DB_PROFILE": configured}, None)
    assert resolve_profile(loaded, debug).name == expected


def test_profile_values_and_explicit_settings_win() -> None:
    dev = load_settings({"DB_URL": GOOD_URL}, None)
    config = pool_config(dev, PROFILES["development"])
    assert (config.pool_size, config.max_overflow, config.pool_timeout, config.pool_recycle) == (
        2,
        5,
        10,
        300,
    )
    assert config.sources["pool_size"] == "profile"

    serverless = pool_config(dev, PROFILES["serverless"])
    assert (serverless.pool_size, serverless.max_overflow, serverless.max_connections) == (2, 0, 2)

    explicit = load_settings({"DB_URL": GOOD_URL, "DB_POOL_SIZE": 4}, None)
    config = pool_config(explicit, PROFILES["development"])
    assert config.pool_size == 4
    assert config.sources["pool_size"] == "app.config"
    assert config.max_overflow == 5

    production = pool_config(dev, PROFILES["production"])
    assert (production.pool_size, production.max_overflow, production.pool_timeout) == (5, 10, 30)


def test_pool_config_is_inspectable_on_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    app = Flask(__name__)
    app.config.update(DB_URL=GOOD_URL, DB_PROFILE="serverless")
    db = NeonDB(app, env_file=None)
    with app.app_context():
        assert db.pool_config.as_dict() == {
            "profile": "serverless",
            "pool_size": 2,
            "max_overflow": 0,
            "pool_timeout": 10,
            "pool_recycle": 300,
            "max_connections": 2,
        }
        assert db.engine.pool.size() == 2  # type: ignore[attr-defined]
        assert db.engine.pool.timeout() == 10  # type: ignore[attr-defined]


BAD_INPUTS: list[tuple[dict[str, t.Any], str]] = [
    ({"DB_URL": None}, "DB_URL is not set"),
    ({"DB_POOL_SIZE": 0}, "DB_POOL_SIZE must be an integer from 1 to 100, got 0"),
    ({"DB_POOL_SIZE": -1}, "DB_POOL_SIZE must be an integer from 1 to 100, got -1"),
    ({"DB_POOL_SIZE": "abc"}, "DB_POOL_SIZE must be an integer from 1 to 100, got 'abc'"),
    ({"DB_POOL_SIZE": 1000}, "DB_POOL_SIZE must be an integer from 1 to 100, got 1000"),
    ({"DB_POOL_SIZE": "2.5"}, "DB_POOL_SIZE must be an integer"),
    ({"DB_POOL_SIZE": ""}, "DB_POOL_SIZE must be an integer"),
    ({"DB_MAX_OVERFLOW": -1}, "DB_MAX_OVERFLOW must be an integer from 0 to 100"),
    ({"DB_POOL_TIMEOUT": 0}, "DB_POOL_TIMEOUT must be a number from 1 to 300, got 0"),
    ({"DB_POOL_TIMEOUT": 301}, "DB_POOL_TIMEOUT must be a number from 1 to 300"),
    ({"DB_POOL_RECYCLE": 60}, "DB_POOL_RECYCLE must be an integer from 300 to 86400"),
    ({"DB_STATEMENT_TIMEOUT": -1}, "DB_STATEMENT_TIMEOUT must be a number from 0"),
    ({"DB_CONNECT_TIMEOUT": 1}, "DB_CONNECT_TIMEOUT must be an integer from 2 to 300"),
    ({"DB_ECHO": "maybe"}, "DB_ECHO must be a boolean"),
    ({"DB_PROFILE": "staging"}, "DB_PROFILE must be one of development, production, serverless"),
    ({"DB_SESSION_LIMITS": "always"}, "DB_SESSION_LIMITS must be one of auto, startup"),
    ({"DB_URL": f"mysql://alex:{SECRET}@host/db"}, "DB_URL must be a PostgreSQL URL"),
    ({"DB_URL": "not a url"}, "DB_URL is not a URL"),
    ({"DB_URL": f"postgresql://user:{SECRET}@/db"}, "DB_URL has no host"),
    ({"DB_URL": f"postgresql://user:{SECRET}@host"}, "DB_URL has no database name"),
    ({"DB_URL": ""}, "DB_URL is empty"),
    ({"DB_URL": 42}, "DB_URL must be a string URL"),
    ({"DB_URL": "   "}, "DB_URL is empty"),
    ({"DB_URL": "x" * 10_000}, "DB_URL is not a URL"),
    ({"DB_URL": f"postgresql://u:{SECRET}@h:abc/db"}, "DB_URL has an invalid port"),
    ({"DB_URL": f"postgresql://u:{SECRET}@127.0.0.1/db?sslmode=bogus"}, "sslmode='bogus'"),
    (
        {"DB_URL": f"postgresql://u:{SECRET}@127.0.0.1/db?sslrootcert=/no/such/ca.pem"},
        "sslrootcert='/no/such/ca.pem', but that file does not exist",
    ),
    (
        {"DB_URL": f"postgresql://u:{SECRET}@db.example.com/db?sslmode=prefer"},
        "can fall back to plaintext",
    ),
    (
        {"DB_URL": f"postgresql://u:{SECRET}@db.example.com/db"},
        "sslmode unset (libpq then uses prefer)",
    ),
    (
        {"DB_DIRECT_URL": f"postgresql://u:{SECRET}@{NEON_POOLER_HOST}/db"},
        "DB_DIRECT_URL points at a pooler host",
    ),
    ({"DB_READ_URL": GOOD_URL}, "DB_READ_URL is the primary"),
    ({"DB_READ_URL": f"mysql://u:{SECRET}@h/db"}, "DB_READ_URL must be a PostgreSQL URL"),
    ({"DB_PROFILE": ""}, "DB_PROFILE must be one of"),
    ({"DB_PROFILE": "Production"}, "DB_PROFILE must be one of"),
    ({"DB_HEALTH_PREFIX": "health"}, "DB_HEALTH_PREFIX must be a URL path starting with '/'"),
    ({"DB_HEALTH_PREFIX": "/health?x=1"}, "DB_HEALTH_PREFIX must be a URL path"),
    ({"DB_HEALTH_TIMEOUT": 0}, "DB_HEALTH_TIMEOUT must be a number from 0.1 to 60"),
    ({"DB_HEALTH_CACHE_SECONDS": -1}, "DB_HEALTH_CACHE_SECONDS must be a number from 0"),
    ({"DB_HEALTH_MODE": "ping"}, "DB_HEALTH_MODE must be one of query, pool"),
    ({"DB_LEAK_THRESHOLD": -5}, "DB_LEAK_THRESHOLD must be a number from 0 to 86400"),
    ({"DB_SLOW_QUERY_MS": "fast"}, "DB_SLOW_QUERY_MS must be an integer"),
    ({"DB_CONNECT_RETRY_SECONDS": -1}, "DB_CONNECT_RETRY_SECONDS must be a number from 0"),
    ({"DB_PING_AFTER_IDLE": -1}, "DB_PING_AFTER_IDLE must be a number from 0 to 3600"),
    ({"DB_STATEMENT_TIMEOUT": "30s"}, "DB_STATEMENT_TIMEOUT must be a number"),
    ({"DB_POOL_SIZE": "1e3"}, "DB_POOL_SIZE must be an integer"),
    ({"DB_ECHO": ""}, "DB_ECHO must be a boolean"),
    ({"DB_POOL_SIZE": "\u00e9"}, "DB_POOL_SIZE must be an integer"),
]


@pytest.mark.parametrize(("config", "expected"), BAD_INPUTS)
def test_bad_input_is_rejected_at_init_app(config: dict[str, t.Any], expected: str) -> None:
    app = Flask(__name__)
    app.config.update({"DB_URL": GOOD_URL, **config})
    if config.get("DB_URL", "x") is None:
        del app.config["DB_URL"]
    with pytest.raises(NeonConfigError) as info:
        NeonDB(app, env_file=None)
    message = str(info.value)
    assert expected in message
    assert SECRET not in message
    assert len(message) < 600  # a long bad value is not echoed in full
    # No chained driver or pydantic error that could repeat the input.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
    assert "flask-neon" not in app.extensions


def test_bad_input_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_URL", GOOD_URL)
    monkeypatch.setenv("DB_POOL_SIZE", "abc")
    with pytest.raises(NeonConfigError, match="DB_POOL_SIZE must be an integer"):
        NeonDB(Flask(__name__), env_file=None)


def test_several_bad_settings_are_reported_together() -> None:
    app = Flask(__name__)
    app.config.update(DB_URL=GOOD_URL, DB_POOL_SIZE=0, DB_POOL_TIMEOUT=0)
    with pytest.raises(NeonConfigError) as info:
        NeonDB(app, env_file=None)
    assert "DB_POOL_SIZE" in str(info.value)
    assert "DB_POOL_TIMEOUT" in str(info.value)


def test_every_field_has_a_description_and_key() -> None:
    for name, field in NeonSettings.model_fields.items():
        assert field.description, name


def test_the_bad_input_table_is_large() -> None:
    assert len(BAD_INPUTS) >= 30


@pytest.mark.parametrize(("config", "expected"), BAD_INPUTS)
def test_bad_input_through_flask_db_check(config: dict[str, t.Any], expected: str) -> None:
    """The same table through ``flask db-check``: one line naming the setting, no traceback."""
    from click.testing import CliRunner
    from flask.cli import FlaskGroup

    def create_app() -> Flask:
        app = Flask("bad_input_cli")
        app.config.update({"DB_URL": GOOD_URL, **config})
        if config.get("DB_URL", "x") is None:
            del app.config["DB_URL"]
        NeonDB(app, env_file=None)
        return app

    result = CliRunner().invoke(FlaskGroup(create_app=create_app), ["db-check"])
    assert result.exit_code != 0
    assert expected in result.output
    assert "Traceback" not in result.output
    assert SECRET not in result.output


def test_a_dotenv_value_loaded_into_the_environment_is_labelled_dotenv(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    # The `flask` command loads .env into os.environ before the app starts (python-dotenv),
    # without overriding what the shell set. A value equal to the file's came from the file.
    (tmp_path / ".env").write_text(f"DB_URL={GOOD_URL}\nDB_POOL_SIZE=7\nDB_MAX_OVERFLOW=3\n")
    monkeypatch.setenv("DB_URL", GOOD_URL)  # as flask's load_dotenv() leaves it
    monkeypatch.setenv("DB_POOL_SIZE", "7")  # same value: from .env
    monkeypatch.setenv("DB_MAX_OVERFLOW", "4")  # the shell's own, which wins
    loaded = load_settings({}, tmp_path / ".env")
    assert loaded.sources["url"] == ".env"
    assert loaded.sources["pool_size"] == ".env"
    assert loaded.sources["max_overflow"] == "environment"
    assert loaded.settings.max_overflow == 4
