"""The ``neon_database_url`` fixture: ``$FLASK_NEON_TEST_URL``, or a throwaway local server."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from .._errors import NeonConfigError, classify
from .._url import parse_url
from .stop import _stop_run

__all__ = ["CONNECT_TIMEOUT", "TEST_DATABASE", "TEST_URL_ENV", "neon_database_url"]

#: The environment variable naming an existing test database.
TEST_URL_ENV = "FLASK_NEON_TEST_URL"
#: The database created on the throwaway server when ``FLASK_NEON_TEST_URL`` is unset.
TEST_DATABASE = "flask_neon_test"
#: Seconds to wait for ``FLASK_NEON_TEST_URL`` to answer; a wrong host must not hang the run.
CONNECT_TIMEOUT = 10

_EXAMPLE_URL = "postgresql://user:password@localhost:5432/myapp_test"
_INSTALL_HINT = (
    "install the PostgreSQL server programs (`pip install 'flask-neon[local]'`, "
    "`apt-get install postgresql` or `brew install postgresql`), and the tests start a "
    "throwaway server of their own"
)


def _check_test_url(raw: str) -> None:
    """Connect once to ``$FLASK_NEON_TEST_URL``, so a wrong one is one clear message."""
    try:
        url = parse_url(raw, setting=TEST_URL_ENV)
    except NeonConfigError as error:
        _stop_run(str(error))
    engine = sa.create_engine(
        url.to_sqlalchemy(),
        poolclass=sa.pool.NullPool,
        connect_args={"connect_timeout": CONNECT_TIMEOUT},
    )
    problem = None
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except sa.exc.SQLAlchemyError as error:
        cause = classify(error, url.secrets())
        # The causes' hints speak of DB_URL, the app's setting; here the URL comes from ours.
        hint = cause.hint.replace("DB_URL", TEST_URL_ENV)
        problem = (
            f"{TEST_URL_ENV} is set to {url.masked()}, which cannot be used: {cause.title}. "
            f"{cause.detail}\nHint: {hint} Or unset {TEST_URL_ENV} and {_INSTALL_HINT}."
        )
    finally:
        engine.dispose()
    if problem is not None:
        # Outside the except block, so the driver's error is not chained to the exit.
        _stop_run(problem)


@pytest.fixture(scope="session")
def neon_database_url() -> Iterator[str]:
    """The URL of the database the tests use, for ``DB_URL`` in your ``neon_app``.

    ``$FLASK_NEON_TEST_URL`` when set: it is checked once, and an unreachable one stops the
    run with one message (the password masked). Otherwise a throwaway
    :class:`~flask_neon.local.LocalPostgres` is started for the test session, with a fresh
    ``flask_neon_test`` database, and stopped at the end. Without server programs either, the
    run stops with one message saying how to provide a database.

    Example::

        @pytest.fixture(scope="session")
        def neon_app(neon_database_url):
            return create_app({"TESTING": True, "DB_URL": neon_database_url})
    """
    raw = os.environ.get(TEST_URL_ENV, "").strip()
    if raw:
        _check_test_url(raw)
        yield raw
        return
    # Imported only when no test database is given, and so no local server is needed.
    from ..local import LocalPostgres, LocalPostgresError

    cluster = LocalPostgres()
    problem = None
    try:
        cluster.start()
        cluster.create_database(TEST_DATABASE)
        # No driver named: the app's DB_DRIVER decides, as it does for its own DB_URL.
        url = cluster.url_for(TEST_DATABASE, driver=None)
    except LocalPostgresError as error:
        with contextlib.suppress(LocalPostgresError, OSError):
            cluster.stop()
        # LocalPostgres's messages speak to app developers, who would set DB_URL; tests read ours.
        reason = str(error).replace("set DB_URL", f"set {TEST_URL_ENV}")
        problem = (
            f"the tests need a PostgreSQL database. Set {TEST_URL_ENV} to one they may fill "
            f"and empty (e.g. {_EXAMPLE_URL}), or {_INSTALL_HINT}.\n"
            f"Starting a throwaway server failed: {reason}"
        )
    if problem is not None:
        _stop_run(problem)
    try:
        yield url
    finally:
        cluster.stop()
