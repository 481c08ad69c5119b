"""The database password never leaks: logs at DEBUG, health bodies, every CLI command, reprs,
exception texts and startup errors are all searched for it, in every spelling."""

from __future__ import annotations

import logging
import typing as t
from collections.abc import Iterator
from urllib.parse import quote, quote_plus

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.cli import FlaskGroup

from flask_neon import DatabaseUnavailableError, NeonConfigError, NeonDB
from flask_neon.local import LocalPostgres

from .conftest import closed_port

PASSWORD = "Zq9!s3cr@t:w/rd%#Ü"
SPELLINGS = {PASSWORD, quote(PASSWORD, safe=""), quote_plus(PASSWORD), quote(PASSWORD)}


def assert_no_secret(text: str, where: str) -> None:
    for spelling in SPELLINGS:
        assert spelling not in text, f"password leaked in {where}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalPostgres]:
    with LocalPostgres(hba=["host all alex 127.0.0.1/32 scram-sha-256"]) as pg:
        pg.execute("CREATE ROLE alex LOGIN PASSWORD %s", params=(PASSWORD,))
        pg.execute("GRANT ALL ON SCHEMA public TO alex")
        yield pg


def url_for(cluster: LocalPostgres, password: str = PASSWORD, port: int | None = None) -> str:
    return (
        f"postgresql://alex:{quote(password, safe='')}@127.0.0.1:{port or cluster.port}/postgres"
    )


def build_app(url: str, **config: t.Any) -> tuple[Flask, NeonDB]:
    app = Flask("secrets_app")
    app.config.update(
        DB_URL=url,
        DB_ECHO=True,
        DB_SLOW_QUERY_MS=1,
        DB_LEAK_THRESHOLD=0.001,
        DB_CONNECT_RETRY_SECONDS=0,
        **config,
    )
    db = NeonDB(app, env_file=None)

    @app.get("/query")
    def query() -> dict[str, t.Any]:
        db.session.execute(sa.text("SELECT pg_sleep(0.01), :p"), {"p": PASSWORD})
        return {"ok": True}

    return app, db


def cli_outputs(app: Flask) -> list[str]:
    runner = app.test_cli_runner()
    outputs = []
    for args in (
        ["db-check"],
        ["db-check", "--json"],
        ["db-check", "--timeout", "2", "--wait", "0.5"],
        ["db-check", "pool"],
        ["db-check", "pool", "--json"],
        ["db-check", "config"],
        ["db-check", "config", "--json"],
    ):
        result = runner.invoke(args=args)
        outputs.append(result.output + (str(result.exception) if result.exception else ""))
    return outputs


@pytest.mark.parametrize("details", [True, False])
def test_working_app_surfaces_never_show_the_password(
    cluster: LocalPostgres, caplog: pytest.LogCaptureFixture, details: bool
) -> None:
    with caplog.at_level(logging.DEBUG):
        app, db = build_app(url_for(cluster), DB_HEALTH_DETAILS=details, DB_CONNECT_ON_START=True)
        client = app.test_client()
        assert client.get("/query").status_code == 200
        health = client.get("/health/db")
        assert health.status_code == 200
        outputs = cli_outputs(app)
        with app.app_context():
            texts = [repr(db), repr(db.engine), str(db.engine.url), repr(db.state(app))]
            texts += [str(db.url), repr(db.url), repr(db.settings), str(db.pool_config)]
    assert_no_secret(health.get_data(as_text=True), "the health body")
    for output in outputs:
        assert_no_secret(output, "db-check output")
    for text in texts:
        assert_no_secret(text, "a repr")
    assert "SELECT pg_sleep" in caplog.text  # echo and the slow-query log really ran
    assert_no_secret(caplog.text, "the logs")


def test_failing_app_surfaces_never_show_the_password(
    cluster: LocalPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = url_for(cluster, password=PASSWORD[::-1])
    refused = url_for(cluster, port=closed_port())
    with caplog.at_level(logging.DEBUG):
        for url in (wrong, refused):
            app, _ = build_app(url, DB_HEALTH_DETAILS=True)
            client = app.test_client()
            response = client.get("/query")
            assert response.status_code in (500, 503)
            assert_no_secret(response.get_data(as_text=True), "an error response")
            health = client.get("/health/db")
            assert health.status_code == 503
            assert_no_secret(health.get_data(as_text=True), "the health body")
            for output in cli_outputs(app):
                assert_no_secret(output, "db-check output")
    assert_no_secret(caplog.text, "the logs")


def test_startup_and_config_errors_never_show_the_password(cluster: LocalPostgres) -> None:
    errors: list[BaseException] = []
    for config in (
        {"DB_URL": url_for(cluster, password=PASSWORD[::-1]), "DB_CONNECT_ON_START": True},
        {"DB_URL": url_for(cluster, port=closed_port()), "DB_CONNECT_ON_START": True},
        {"DB_URL": url_for(cluster), "DB_POOL_SIZE": 0},
        {"DB_URL": url_for(cluster).replace("127.0.0.1", "db.example.com")},
        {"DB_URL": url_for(cluster).replace("postgresql", "mysql")},
        {"DB_URL": url_for(cluster).replace("/postgres", "/")},
        {"DB_URL": url_for(cluster), "DB_READ_URL": url_for(cluster)},
        {"DB_URL": url_for(cluster).replace("127.0.0.1:", "127.0.0.1:x")},
    ):
        app = Flask("startup")
        app.config.update(DB_CONNECT_RETRY_SECONDS=0, **config)
        with pytest.raises((NeonConfigError, DatabaseUnavailableError)) as info:
            NeonDB(app, env_file=None)
        errors.append(info.value)
    for error in errors:
        assert_no_secret(str(error), "an exception")
        assert_no_secret(repr(error), "an exception repr")
        if isinstance(error, DatabaseUnavailableError):
            assert_no_secret(str(error.cause.as_dict()), "a classified cause")


def test_flask_cli_startup_errors_never_show_the_password(cluster: LocalPostgres) -> None:
    from click.testing import CliRunner

    for config in (
        {"DB_URL": url_for(cluster), "DB_POOL_SIZE": "abc"},
        {"DB_URL": url_for(cluster, port=closed_port()), "DB_CONNECT_ON_START": True},
    ):

        def create_app(config: dict[str, t.Any] = config) -> Flask:
            app = Flask("cli_startup")
            app.config.update(DB_CONNECT_RETRY_SECONDS=0, **config)
            NeonDB(app, env_file=None)
            return app

        result = CliRunner().invoke(FlaskGroup(create_app=create_app), ["db-check", "--json"])
        assert result.exit_code != 0
        assert "Traceback" not in result.output
        assert_no_secret(result.output, "flask CLI output")
