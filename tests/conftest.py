"""Fixtures shared by the test suite: a real PostgreSQL, fresh databases, apps wired to them.

Set ``FLASK_NEON_TEST_URL`` to test against an existing server (its role must be allowed to
create databases and terminate backends). Without it the suite starts its own throwaway cluster
with :mod:`flask_neon.local`.

``FLASK_NEON_TEST_DRIVER`` (``psycopg2``, the default, or ``psycopg``) is the driver of the apps
the tests build: ``database_url`` names it (``postgresql+<driver>://``), and ``DB_DRIVER`` is
set to it in the environment, so that every ``postgresql://`` URL of a test, of the example
app and of the processes the tests start (gunicorn, ``flask``, pytest) follows it too. Tests
about psycopg2 itself are marked ``psycopg2_only`` (skipped on psycopg), their psycopg 3
counterparts ``psycopg_only``. The test's own admin connection (:func:`admin_execute`) is
psycopg2's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
import typing as t
import uuid
from collections.abc import Callable, Iterator

import psycopg2
import pytest
from flask import Flask

from flask_neon import NeonDB
from flask_neon._url import DRIVERS, parse_url
from flask_neon.local import LocalPostgres

from .proxy import FaultProxy

TEST_URL_ENV = "FLASK_NEON_TEST_URL"
TEST_DRIVER_ENV = "FLASK_NEON_TEST_DRIVER"
#: The driver of the apps under test (``FLASK_NEON_TEST_DRIVER``).
DRIVER = os.environ.get(TEST_DRIVER_ENV, "").strip() or DRIVERS[0]
#: What fast BEGIN on psycopg 3 adds to a transaction's first pipeline (docs/fast-begin.md).
SHOW_IDLE = "SHOW idle_in_transaction_session_timeout"
#: The settings of the test's own environment, kept when the developer's shell is cleaned.
KEPT_ENV = (TEST_URL_ENV, TEST_DRIVER_ENV)
#: What the developer's shell may hold that flask-neon or Flask would read.
FOREIGN_ENV_PREFIXES = ("DB_", "SQLALCHEMY_", "FLASK_")
FOREIGN_ENV_NAMES = ("DATABASE_URL",)


def pytest_configure(config: pytest.Config) -> None:
    """The suite runs the same whatever the developer's shell holds: its settings go, and
    ``DB_DRIVER`` is the test driver's."""
    if DRIVER not in DRIVERS:
        raise pytest.UsageError(
            f"{TEST_DRIVER_ENV} must be one of {', '.join(DRIVERS)}, got {DRIVER!r}."
        )
    for key in list(os.environ):
        if key not in KEPT_ENV and (
            key.startswith(FOREIGN_ENV_PREFIXES) or key in FOREIGN_ENV_NAMES
        ):
            del os.environ[key]
    os.environ["DB_DRIVER"] = DRIVER


_ONLY = {"psycopg2_only": "psycopg2", "psycopg_only": "psycopg"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests about another driver than ``FLASK_NEON_TEST_DRIVER``'s."""
    for item in items:
        for marker, driver in _ONLY.items():
            if driver != DRIVER and item.get_closest_marker(marker) is not None:
                reason = f"about {driver} ({TEST_DRIVER_ENV}={DRIVER})"
                item.add_marker(pytest.mark.skip(reason=reason))


def with_driver(url: str, driver: str | None = None) -> str:
    """``url`` rendered as ``postgresql+<driver>://`` (default: the test driver)."""
    parsed = dataclasses.replace(parse_url(url), driver=driver or DRIVER)
    return parsed.to_sqlalchemy().render_as_string(hide_password=False)


@pytest.fixture(autouse=True)
def _outside_the_project(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run each test in an empty folder, so that a developer's ``.env`` is not read.

    Tests that need another folder change to it themselves.
    """
    monkeypatch.chdir(tmp_path_factory.getbasetemp())


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo what Flask-Migrate's env.py does to logging when migrations run in-process.

    Its ``fileConfig()`` disables every logger it does not name (``flask_neon`` among them),
    sets the root level and adds a stderr handler; left alone, that would leak into later
    tests that read logs.
    """
    manager = logging.Logger.manager
    root = logging.getLogger()
    root_level, root_handlers = root.level, set(root.handlers)
    untouched: tuple[bool, int, bool, set[logging.Handler]] = (False, logging.NOTSET, True, set())
    saved = {
        name: (logger.disabled, logger.level, logger.propagate, set(logger.handlers))
        for name, logger in manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    yield
    root.setLevel(root_level)
    for handler in set(root.handlers) - root_handlers:
        root.removeHandler(handler)
    for name, logger in list(manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger):
            continue
        disabled, level, propagate, handlers = saved.get(name, untouched)
        logger.disabled, logger.propagate = disabled, propagate
        logger.setLevel(level)
        for handler in set(logger.handlers) - handlers:
            logger.removeHandler(handler)


def _dsn(url: str) -> str:
    return parse_url(url).to_sqlalchemy().set(drivername="postgresql").render_as_string(False)


def admin_execute(url: str, sql: str, params: t.Sequence[t.Any] = ()) -> list[tuple[t.Any, ...]]:
    """Run SQL in autocommit mode on ``url`` with plain psycopg2 and return the rows."""
    connection = psycopg2.connect(_dsn(url))
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall()) if cursor.description else []
    finally:
        connection.close()


@pytest.fixture(scope="session")
def local_pg() -> Iterator[LocalPostgres | None]:
    """The suite's own throwaway cluster, or None when a test URL is given."""
    import os

    if os.environ.get(TEST_URL_ENV):
        yield None
        return
    # Two-phase commit needs prepared transactions (the parity tests use them).
    cluster = LocalPostgres(settings={"max_prepared_transactions": "10"}).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def database_url(local_pg: LocalPostgres | None) -> str:
    """URL of a database the tests may use freely (shared by the session)."""
    import os

    if local_pg is None:
        return with_driver(os.environ[TEST_URL_ENV])
    return with_driver(local_pg.url)


@pytest.fixture
def new_database(database_url: str) -> Iterator[Callable[[], str]]:
    """Makes new, empty databases for one test and returns their URLs; dropped afterwards."""
    names: list[str] = []

    def make() -> str:
        names.append(f"t_{uuid.uuid4().hex[:12]}")
        admin_execute(database_url, f'CREATE DATABASE "{names[-1]}"')
        url = parse_url(database_url).to_sqlalchemy().set(database=names[-1])
        return url.render_as_string(hide_password=False)

    try:
        yield make
    finally:
        for name in names:
            admin_execute(database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def fresh_database(new_database: Callable[[], str]) -> str:
    """A new, empty database for one test; dropped afterwards."""
    return new_database()


AppFactory = Callable[..., tuple[Flask, NeonDB]]


@pytest.fixture
def make_app(database_url: str) -> AppFactory:
    """Build a Flask app with NeonDB on the test database; keyword arguments go to app.config."""

    def factory(
        url: str | None = None, *, db: NeonDB | None = None, **config: t.Any
    ) -> tuple[Flask, NeonDB]:
        app = Flask(f"test_{uuid.uuid4().hex[:8]}")
        app.config.update({"DB_URL": url or database_url, **config})
        neon = db or NeonDB(env_file=None)
        neon.init_app(app)
        return app, neon

    return factory


def backend_pids(url: str, application_prefix: str = "flask-neon") -> list[int]:
    """PIDs of the server backends opened by flask-neon on ``url``'s database."""
    database = parse_url(url).database
    rows = admin_execute(
        url,
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name LIKE %s "
        "AND pid <> pg_backend_pid()",
        (database, application_prefix + "%"),
    )
    return [row[0] for row in rows]


def terminate_backends(url: str) -> int:
    """Terminate every flask-neon backend on ``url``'s database; returns the count."""
    pids = backend_pids(url)
    for pid in pids:
        admin_execute(url, "SELECT pg_terminate_backend(%s, 5000)", (pid,))
    return len(pids)


def closed_port() -> int:
    """A port of 127.0.0.1 that nobody listens on (free a moment ago)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    condition: Callable[[], bool], timeout: float = 10.0, message: str = "condition"
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` (a bound, not a guess)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not reached within {timeout:g} s")
        time.sleep(0.02)


@pytest.fixture
def proxy(database_url: str) -> Iterator[FaultProxy]:
    """A fault-injecting TCP proxy in front of the test server."""
    url = parse_url(database_url)
    fault_proxy = FaultProxy((url.host or "127.0.0.1", url.port or 5432))
    yield fault_proxy
    fault_proxy.close()
