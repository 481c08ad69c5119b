"""``flask db-check`` on a real server: the check (human and JSON), ``--wait`` through a fault
proxy, ``--timeout`` against a silent server, ``pool``, ``config``, bad input, and that no
output ever shows the password."""

from __future__ import annotations

import json
import time
from urllib.parse import quote, quote_plus

import pytest
from click.testing import Result
from flask import Flask

from flask_neon import NeonSettings
from flask_neon._url import parse_url

from .conftest import AppFactory, closed_port
from .proxy import FaultProxy

PASSWORD = "Zq9!p@ss:w/rd%"


def invoke(app: Flask, *args: str) -> Result:
    """Run ``flask db-check ARGS`` and check it ended without a traceback."""
    result = app.test_cli_runner().invoke(args=["db-check", *args])
    # SystemExit is how click ends with a status; any other exception is a crash.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result


def fields(output: str) -> dict[str, str]:
    """The ``label: value`` lines of the human output."""
    pairs = (line.split(":", 1) for line in output.splitlines() if ":" in line)
    return {label.strip(): value.strip() for label, value in pairs}


def closed_url(database_url: str) -> str:
    """``database_url`` moved to a port where nothing listens."""
    url = parse_url(database_url).to_sqlalchemy().set(host="127.0.0.1", port=closed_port())
    return url.render_as_string(hide_password=False)


# -- the check ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["startup", "transaction"])
def test_check_human(make_app: AppFactory, fresh_database: str, mode: str) -> None:
    app, db = make_app(
        fresh_database,
        DB_STATEMENT_TIMEOUT=7,
        DB_IDLE_IN_TRANSACTION_TIMEOUT=9,
        DB_SESSION_LIMITS=mode,
    )
    result = invoke(app)
    assert result.exit_code == 0, result.output
    shown = fields(result.output)
    assert shown["reachable"] == "yes"
    assert float(shown["latency"].removesuffix(" ms")) > 0
    assert shown["server version"][0].isdigit()
    assert shown["database"] == parse_url(fresh_database).database
    assert shown["url"] == db.state(app).url.masked()
    assert shown["host kind"] == "direct"
    assert shown["tls"] == "off"
    assert shown["profile"] == "production"
    assert "pool_size=5" in shown["pool"]
    # The limits as the server reports them, however they were sent.
    assert shown["session limits"] == (
        f"statement_timeout=7s, idle_in_transaction_session_timeout=9s (mode: {mode})"
    )
    assert result.stderr == ""


def test_check_json(make_app: AppFactory, fresh_database: str) -> None:
    app, db = make_app(fresh_database, DB_STATEMENT_TIMEOUT=7, DB_IDLE_IN_TRANSACTION_TIMEOUT=0)
    result = invoke(app, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    state = db.state(app)
    assert report["reachable"] is True
    assert report["latency_ms"] > 0
    assert report["server_version"][0].isdigit()
    assert report["database"] == parse_url(fresh_database).database
    assert report["user"] == parse_url(fresh_database).username
    assert report["url"] == state.url.masked()
    assert report["host_kind"] == "direct"
    assert report["tls"] == {"enabled": False, "version": None, "cipher": None}
    assert report["profile"] == "production"
    assert report["pool"] == state.pool.as_dict()
    assert report["session_limits"]["mode"] == "startup"
    assert report["session_limits"]["statement_timeout"] == "7s"
    assert report["session_limits"]["idle_in_transaction_session_timeout"] == "0"
    assert report["cause"] is None
    assert report["attempts"] == 1


def test_check_refused_port(make_app: AppFactory, database_url: str) -> None:
    app, _ = make_app(closed_url(database_url), DB_CONNECT_RETRY_SECONDS=0)
    result = invoke(app)
    assert result.exit_code == 1
    shown = fields(result.output)
    assert shown["reachable"] == "no"
    assert "Connection refused" in shown["detail"]
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: connection_refused: The server refused the connection. Hint: ")

    result = invoke(app, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["reachable"] is False
    assert report["cause"]["name"] == "connection_refused"
    assert report["cause"]["hint"]
    assert report["server_version"] is None
    assert report["attempts"] == 1


# -- --wait and --timeout ---------------------------------------------------------------------


def test_wait_outlasts_a_waking_compute_json(
    make_app: AppFactory, database_url: str, proxy: FaultProxy
) -> None:
    proxy.wake_failures = 3
    # No retries inside the engine: each attempt of --wait is one connect the proxy sees.
    app, _ = make_app(proxy.url(database_url), DB_CONNECT_RETRY_SECONDS=0)
    result = invoke(app, "--wait", "20", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["reachable"] is True
    assert report["attempts"] == 4
    assert proxy.accepted == 4
    assert result.stderr == ""  # JSON mode: no progress lines


def test_wait_outlasts_a_waking_compute_human(
    make_app: AppFactory, database_url: str, proxy: FaultProxy
) -> None:
    proxy.wake_failures = 3
    app, _ = make_app(proxy.url(database_url), DB_CONNECT_RETRY_SECONDS=0)
    result = invoke(app, "--wait", "20")
    assert result.exit_code == 0, result.output
    progress = result.stderr.splitlines()
    assert len(progress) == 3
    assert all(line.startswith("attempt ") and "compute_waking" in line for line in progress)
    assert fields(result.stdout)["reachable"] == "yes (attempt 4)"


def test_wait_gives_up_when_the_time_is_up(make_app: AppFactory, database_url: str) -> None:
    app, _ = make_app(closed_url(database_url), DB_CONNECT_RETRY_SECONDS=0)
    started = time.monotonic()
    result = invoke(app, "--wait", "1", "--json")
    elapsed = time.monotonic() - started
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["cause"]["name"] == "connection_refused"
    assert report["attempts"] > 1
    assert 1 <= elapsed < 4


def test_wait_stops_at_once_on_a_final_cause(make_app: AppFactory, database_url: str) -> None:
    missing = parse_url(database_url).to_sqlalchemy().set(database="no_such_database")
    app, _ = make_app(missing.render_as_string(hide_password=False))
    started = time.monotonic()
    result = invoke(app, "--wait", "30", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["cause"]["name"] == "database_missing"
    assert report["attempts"] == 1
    assert time.monotonic() - started < 10


def test_timeout_bounds_a_silent_server(
    make_app: AppFactory, database_url: str, proxy: FaultProxy
) -> None:
    proxy.mode = "blackhole"
    app, _ = make_app(proxy.url(database_url), DB_CONNECT_RETRY_SECONDS=0, DB_CONNECT_TIMEOUT=2)
    started = time.monotonic()
    result = invoke(app, "--timeout", "1")
    elapsed = time.monotonic() - started
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(("error: health_timeout: ", "error: connect_timeout: ")), last
    assert elapsed < 3


def test_wait_plus_timeout_bounds_the_whole_run(
    make_app: AppFactory, database_url: str, proxy: FaultProxy
) -> None:
    proxy.mode = "blackhole"
    app, _ = make_app(proxy.url(database_url), DB_CONNECT_RETRY_SECONDS=0, DB_CONNECT_TIMEOUT=10)
    started = time.monotonic()
    result = invoke(app, "--wait", "1", "--timeout", "0.5", "--json")
    elapsed = time.monotonic() - started
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["cause"]["name"] == "health_timeout"
    assert "--timeout" in report["cause"]["title"]
    assert report["attempts"] > 1
    assert elapsed < 1 + 0.5 + 1  # --wait + one --timeout, and a margin for the runner


# -- pool and config ------------------------------------------------------------------------------


def test_pool(make_app: AppFactory) -> None:
    app, _ = make_app(DB_POOL_SIZE=3, DB_MAX_OVERFLOW=1)
    assert invoke(app).exit_code == 0  # opens and returns one connection

    result = invoke(app, "pool", "--json")
    assert result.exit_code == 0
    stats = json.loads(result.stdout)
    assert stats["status"] == "ok"
    assert stats["size"] == 3
    assert stats["max_capacity"] == 4
    assert stats["checked_in"] == 1
    assert stats["checked_out"] == 0
    assert stats["connections_opened"] == 1

    # --json given to the group applies to the subcommand too.
    assert json.loads(invoke(app, "--json", "pool").stdout) == stats

    result = invoke(app, "pool")
    assert result.exit_code == 0
    shown = fields(result.output)
    assert shown["status"] == "ok"
    assert shown["max capacity"] == "4"
    assert shown["connections opened"] == "1"


def config_rows(output: str) -> dict[str, list[str]]:
    """The human config table's rows, by their first column."""
    rows = (line.split() for line in output.splitlines() if line.startswith("  "))
    return {row[0]: row[1:] for row in rows}


def test_config_shows_values_and_sources(
    make_app: AppFactory, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DB_STATEMENT_TIMEOUT", "12")
    app, _ = make_app(DB_POOL_SIZE=7, DB_PROFILE="serverless")

    result = invoke(app, "config", "--json")
    assert result.exit_code == 0
    body = json.loads(result.stdout)
    settings = body["settings"]
    assert settings["DB_URL"] == {
        "value": parse_url(database_url).masked(),
        "source": "app.config",
    }
    assert settings["DB_POOL_SIZE"] == {"value": 7, "source": "app.config"}
    assert settings["DB_STATEMENT_TIMEOUT"] == {"value": 12.0, "source": "environment"}
    assert settings["DB_MAX_OVERFLOW"] == {"value": 10, "source": "default"}
    assert body["profile"] == {"value": "serverless", "source": "app.config"}
    # The explicit pool size wins over the profile's; the rest comes from the profile.
    assert body["pool"]["pool_size"] == {"value": 7, "source": "app.config"}
    assert body["pool"]["max_overflow"] == {"value": 0, "source": "profile"}
    assert body["pool"]["max_connections"]["value"] == 7
    assert body["session_limits"]["statement_timeout"] == "12000"
    assert set(settings) == {f"DB_{name.upper()}" for name in NeonSettings.model_fields}

    result = invoke(app, "config")
    assert result.exit_code == 0
    rows = config_rows(result.output)
    assert rows["DB_URL"] == [parse_url(database_url).masked(), "app.config"]
    assert rows["DB_POOL_SIZE"] == ["7", "app.config"]
    assert rows["DB_STATEMENT_TIMEOUT"] == ["12.0", "environment"]
    assert rows["max_overflow"] == ["0", "profile"]
    assert "Pool (profile serverless, from app.config):" in result.output


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--wait", "abc"], "--wait"),
        (["--wait", "-1"], "--wait"),
        (["--wait", "nan"], "--wait"),
        (["--timeout", "0"], "--timeout"),
        (["--timeout", "-3"], "--timeout"),
        (["--timeout", "inf"], "--timeout"),
        (["--wait", "5", "pool"], "--wait"),
        (["--timeout", "5", "config"], "--timeout"),
    ],
)
def test_bad_input_is_a_usage_error(make_app: AppFactory, args: list[str], option: str) -> None:
    app, _ = make_app()
    result = invoke(app, *args)
    assert result.exit_code == 2
    assert option in result.output
    assert "Usage:" in result.output


# -- the password ---------------------------------------------------------------------------------


@pytest.mark.parametrize("escaped", [True, False], ids=["percent-encoded", "raw"])
def test_password_never_shown(make_app: AppFactory, escaped: bool) -> None:
    password = quote(PASSWORD, safe="") if escaped else PASSWORD
    url = f"postgresql://alex:{password}@127.0.0.1:{closed_port()}/db"
    app, db = make_app(url, DB_CONNECT_RETRY_SECONDS=0)
    assert db.state(app).url.password == PASSWORD
    spellings = {PASSWORD, quote(PASSWORD, safe=""), quote_plus(PASSWORD, safe="")}
    runs: list[tuple[list[str], int]] = [
        ([], 1),
        (["--json"], 1),
        (["--wait", "0.3"], 1),
        (["--wait", "0.3", "--json"], 1),
        (["--timeout", "1"], 1),
        (["pool"], 0),
        (["pool", "--json"], 0),
        (["config"], 0),
        (["config", "--json"], 0),
    ]
    for args, status in runs:
        result = invoke(app, *args)
        assert result.exit_code == status, (args, result.output)
        assert result.output.strip(), args
        for spelling in spellings:
            assert spelling not in result.output, (args, spelling)


def test_connect_on_start_does_not_break_loading_the_cli(database_url: str) -> None:
    """`flask db-check` on an app with DB_CONNECT_ON_START and a down database reports the
    classified cause instead of a traceback while loading the app."""
    from click.testing import CliRunner
    from flask import Flask
    from flask.cli import FlaskGroup

    from flask_neon import NeonDB

    def create_app() -> Flask:
        app = Flask("cli_start_check")
        app.config.update(
            DB_URL=f"postgresql://u:p@127.0.0.1:{closed_port()}/db",
            DB_CONNECT_ON_START=True,
            DB_CONNECT_RETRY_SECONDS=0,
        )
        NeonDB(app, env_file=None)
        return app

    result = CliRunner().invoke(FlaskGroup(create_app=create_app), ["db-check"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: connection_refused")
