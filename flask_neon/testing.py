"""pytest fixtures for apps built on flask-neon: a real PostgreSQL, and a rollback per test.

Every test that asks for :func:`neon_transaction` (or :func:`neon_db_session`,
:func:`neon_client`) runs inside one database transaction on one connection, rolled back when
the test ends, whether it passed or failed. Code under test may call ``db.session.commit()``
as often as it likes, in as many requests as it likes: each ``db.session`` joins the test's
connection through a SAVEPOINT, so a commit releases the savepoint and the final rollback
still undoes everything. Nothing is mocked: the SQL runs on PostgreSQL.

The plugin is opt-in: installing flask-neon registers it with pytest (the ``pytest11`` entry
point ``flask_neon.testing``), but it does nothing until a test asks for one of its fixtures,
and none is ``autouse``. ``-p no:flask_neon.testing`` turns it off; where plugin autoloading is
disabled, ``-p flask_neon.testing`` turns it on.

Fixtures:
    ``neon_database_url`` (session): the URL of the test database. ``$FLASK_NEON_TEST_URL``
        when set (checked once; a database the tests may fill and empty, never one with
        data you need), else a throwaway local PostgreSQL started for the test session, with
        a fresh ``flask_neon_test`` database, stopped at the end.
    ``neon_app`` (session): **yours to define** in ``conftest.py``: the Flask app, with
        flask-neon initialised on ``neon_database_url``.
    ``neon_migrations_dir`` (session): define it to return your migrations directory, and
        the schema is built by Flask-Migrate's ``upgrade`` instead of ``create_all()``.
    ``neon_schema`` (session): creates the tables once per test session with
        ``db.metadata.create_all()`` (and drops the ones it created at the end), or runs the
        migrations. Override it with a fixture that does nothing to manage the schema
        yourself.
    ``neon_transaction`` (function): the test's transaction, a :class:`NeonTransaction`
        with ``.connection`` and ``.session``.
    ``neon_db_session`` (function): ``neon_transaction.session``, an ORM session on the
        test's connection, for arranging data and checking results.
    ``neon_client`` (function): ``neon_app.test_client()``, inside the test's transaction.

Example ``conftest.py``::

    import pathlib

    import pytest

    from myapp import create_app


    @pytest.fixture(scope="session")
    def neon_app(neon_database_url):
        return create_app({"TESTING": True, "DB_URL": neon_database_url})


    # Optional: build the schema with your migrations rather than db.metadata.create_all().
    @pytest.fixture(scope="session")
    def neon_migrations_dir():
        return pathlib.Path(__file__).parent / "migrations"

and a test module::

    import sqlalchemy as sa

    from myapp.models import Note


    def test_create_note(neon_client, neon_db_session):
        response = neon_client.post("/notes", json={"title": "Buy milk"})
        assert response.status_code == 201
        assert neon_db_session.scalar(sa.select(sa.func.count()).select_from(Note)) == 1


    def test_each_test_starts_empty(neon_db_session):
        assert neon_db_session.scalar(sa.select(sa.func.count()).select_from(Note)) == 0

Run ``pytest``: without ``FLASK_NEON_TEST_URL`` the plugin needs the PostgreSQL server
programs (``apt-get install postgresql``, ``brew install postgresql`` or
``pip install pgserver``); with neither, the run stops with one message saying so.

Limits:
    * Only ``db.session`` and ``db.read_session`` join the test's transaction. Code that opens
      its own connections (``db.engine.connect()``, ``db.get_engine()``) works outside it and
      its writes stay, and it waits on rows the test has locked.
    * All sessions share the test's connection, whose savepoints form one stack: a session
      must not commit while one opened after it is still open. Requests never break this
      (their session ends with the request), but an app context held open in a test while
      ``neon_db_session`` is used and committed can.
    * For the same reason, ``db.read_session`` is ``db.session`` during a test: neither
      read-only nor on the replica (which could not see the test's rows anyway).
    * Do not push an app context of ``neon_app`` for the whole session (e.g. in a fixture
      around ``yield``): requests would reuse it, and its ``db.session``, across tests.
      Push app contexts inside tests; ``neon_transaction`` refuses to start otherwise.
    * With ``FLASK_NEON_TEST_URL`` set, parallel runs (pytest-xdist) share one database and
      race on the schema; leave it unset so that each worker starts its own server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import typing as t
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from flask import Flask, current_app, has_app_context
from flask.testing import FlaskClient
from sqlalchemy import orm

from .errors import NeonConfigError, classify
from .extension import EXTENSION_KEY, NeonDB, NeonState
from .localdb import LocalPostgres, LocalPostgresError
from .url import parse_url

__all__ = [
    "TEST_DATABASE",
    "TEST_URL_ENV",
    "NeonTransaction",
    "neon_app",
    "neon_client",
    "neon_database_url",
    "neon_db_session",
    "neon_migrations_dir",
    "neon_schema",
    "neon_transaction",
]

#: The environment variable naming an existing test database.
TEST_URL_ENV = "FLASK_NEON_TEST_URL"
#: The database created on the throwaway server when ``FLASK_NEON_TEST_URL`` is unset.
TEST_DATABASE = "flask_neon_test"
#: Seconds to wait for ``FLASK_NEON_TEST_URL`` to answer; a wrong host must not hang the run.
CONNECT_TIMEOUT = 10
#: How long dropping the tables may wait for a lock a leaked connection holds.
DROP_LOCK_TIMEOUT = "10s"

_EXAMPLE_URL = "postgresql://user:password@localhost:5432/myapp_test"
_INSTALL_HINT = (
    "install the PostgreSQL server programs (`apt-get install postgresql`, "
    "`brew install postgresql` or `pip install pgserver`), and the tests start a throwaway "
    "server of their own"
)
_NEON_APP_EXAMPLE = """\
    @pytest.fixture(scope="session")
    def neon_app(neon_database_url):
        return create_app({"TESTING": True, "DB_URL": neon_database_url})"""


def _stop_run(message: str) -> t.NoReturn:
    """End the whole run with ``message``: a setup problem, the same for every test.

    A failing session fixture would report the same error once per test that uses it;
    stopping says it once, without a traceback.
    """
    pytest.exit(f"flask-neon: {message}", returncode=pytest.ExitCode.USAGE_ERROR)


# -- the database --------------------------------------------------------------------------------


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
    :class:`~flask_neon.localdb.LocalPostgres` is started for the test session, with a fresh
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
    cluster = LocalPostgres()
    problem = None
    try:
        cluster.start()
        url = cluster.create_database(TEST_DATABASE)
    except LocalPostgresError as error:
        with contextlib.suppress(LocalPostgresError, OSError):
            cluster.stop()
        # localdb's messages speak to app developers, who would set DB_URL; tests read ours.
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


# -- the app and its schema ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def neon_app() -> Flask:
    """Your Flask app, with flask-neon on ``neon_database_url``: define it in ``conftest.py``.

    This default stops the run with a message saying so. Yours must be session-scoped, since
    the schema is built once per session for it.

    Example::

        @pytest.fixture(scope="session")
        def neon_app(neon_database_url):
            return create_app({"TESTING": True, "DB_URL": neon_database_url})
    """
    _stop_run(
        "define the fixture neon_app in your conftest.py: a session-scoped fixture returning "
        "your Flask app, with flask-neon initialised on neon_database_url. For example:\n\n"
        f"{_NEON_APP_EXAMPLE}\n"
    )


@pytest.fixture(scope="session")
def neon_migrations_dir() -> str | os.PathLike[str] | None:
    """The migrations directory ``neon_schema`` upgrades with; ``None``: use ``create_all()``.

    Override it to build the test schema the way production gets it. The app must have
    Flask-Migrate initialised (``Migrate(app, db)``).

    Example::

        @pytest.fixture(scope="session")
        def neon_migrations_dir():
            return pathlib.Path(__file__).parent.parent / "migrations"
    """
    return None


def _neon_state(app: object) -> NeonState:
    """The flask-neon state of the user's ``neon_app``, or a message saying what is wrong."""
    if not isinstance(app, Flask):
        _stop_run(f"the fixture neon_app must return a Flask app, not {type(app).__name__}.")
    state = app.extensions.get(EXTENSION_KEY)
    if not isinstance(state, NeonState):
        _stop_run(
            f"flask-neon is not initialised on the app {app.name!r} that neon_app returns. "
            "Call db.init_app(app) (or NeonDB(app)) with DB_URL set to neon_database_url."
        )
    return state


@contextlib.contextmanager
def _logging_kept() -> Iterator[None]:
    """Undo what Flask-Migrate's ``env.py`` does to logging.

    Its ``fileConfig()`` disables every logger it does not name, sets the root level and adds
    a handler; left alone, that would silence the app's loggers (and ``caplog``) in every
    test that runs after the migrations.
    """
    root = logging.getLogger()
    root_level, root_handlers = root.level, list(root.handlers)
    loggers = [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    saved = [(logger, logger.disabled, logger.level, list(logger.handlers)) for logger in loggers]
    try:
        yield
    finally:
        root.setLevel(root_level)
        root.handlers[:] = root_handlers
        for logger, disabled, level, handlers in saved:
            logger.disabled = disabled
            logger.setLevel(level)
            logger.handlers[:] = handlers


def _upgrade(app: Flask, directory: str | os.PathLike[str]) -> None:
    if "migrate" not in app.extensions:
        _stop_run(
            f"neon_migrations_dir returns {os.fspath(directory)!r}, but Flask-Migrate is not "
            f"initialised on the app {app.name!r}: call Migrate(app, db) in it."
        )
    import flask_migrate  # type: ignore[import-untyped]

    with app.app_context(), _logging_kept():
        flask_migrate.upgrade(directory=os.fspath(directory))


@pytest.fixture(scope="session")
def neon_schema(
    neon_app: Flask, neon_migrations_dir: str | os.PathLike[str] | None
) -> Iterator[None]:
    """Create the app's tables once per test session; ``neon_transaction`` depends on it.

    Without ``neon_migrations_dir``: ``db.metadata.create_all()`` on the app's admin engine
    (``db.get_engine()``), and at the end the tables it created are dropped again (tables
    that existed before are left alone). With it: Flask-Migrate's ``upgrade`` to the head
    revision, kept at the end.

    Example, to manage the schema yourself::

        @pytest.fixture(scope="session")
        def neon_schema(neon_app):
            yield  # the schema is already there
    """
    state = _neon_state(neon_app)
    if neon_migrations_dir is not None:
        _upgrade(neon_app, neon_migrations_dir)
        yield
        return
    engine, metadata = state.admin_engine, state.db.metadata
    inspector = sa.inspect(engine)
    # Only the tables created here are dropped at the end: a database given through
    # FLASK_NEON_TEST_URL may hold others, and they are not ours to remove.
    created = [
        table
        for table in metadata.sorted_tables
        if not inspector.has_table(table.name, schema=table.schema)
    ]
    metadata.create_all(engine, tables=created)
    try:
        yield
    finally:
        if created:
            with engine.begin() as connection:
                # A connection a test leaked may still lock a table: fail rather than hang.
                connection.execute(
                    sa.text("SELECT set_config('lock_timeout', :limit, true)"),
                    {"limit": DROP_LOCK_TIMEOUT},
                )
                metadata.drop_all(connection, tables=created)


# -- one transaction per test --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NeonTransaction:
    """The transaction a test runs in, as the ``neon_transaction`` fixture yields it.

    Attributes:
        app: The ``neon_app``.
        db: Its :class:`~flask_neon.NeonDB`.
        connection: The test's connection. Its transaction is rolled back after the test;
            do not commit it yourself.
        session: An ORM session on ``connection``; its ``commit()`` releases a savepoint.

    Example::

        def test_note_count(neon_transaction):
            neon_transaction.session.add(Note(title="a"))
            neon_transaction.session.commit()
            count = neon_transaction.connection.exec_driver_sql("SELECT count(*) FROM notes")
            assert count.scalar() == 1
    """

    app: Flask
    db: NeonDB
    connection: sa.Connection
    session: orm.Session


def _joined_maker(
    maker: orm.sessionmaker[orm.Session], connection: sa.Connection
) -> orm.sessionmaker[orm.Session]:
    # SQLAlchemy 2.0's recipe for "joining a session into an external transaction": bound to
    # a connection already in a transaction, the session runs in a SAVEPOINT, and its
    # commit() and rollback() end the savepoint, never the test's transaction.
    options = {**maker.kw, "bind": connection, "join_transaction_mode": "create_savepoint"}
    # Per-mapper binds would route statements to the engine, outside the test's transaction.
    options.pop("binds", None)
    return orm.sessionmaker(class_=maker.class_, **options)


class _WriteSessionMaker(orm.sessionmaker[orm.Session]):
    """Makes ``db.read_session`` return the app context's ``db.session`` during a test.

    A second session on the test's connection would take savepoints of its own, and two
    sessions committing in turn release each other's savepoints (SQLAlchemy tracks one stack
    per connection). Sharing the session keeps one stack.
    """

    def __init__(self, db: NeonDB) -> None:
        super().__init__()
        self._db = db

    def __call__(self, **local_kw: t.Any) -> orm.Session:
        return self._db.session


def _end(connection: sa.Connection, transaction: sa.RootTransaction) -> None:
    """Roll back the test's transaction and give the connection back."""
    try:
        if transaction.is_active:
            transaction.rollback()
    except sa.exc.DBAPIError as error:
        # A lost connection took its transaction with it (the server rolls back the open
        # transaction of a connection that goes away); any other failure is worth reporting.
        connection.invalidate()
        if not error.connection_invalidated:
            raise
    finally:
        connection.close()


@pytest.fixture
def neon_transaction(neon_app: Flask, neon_schema: None) -> Iterator[NeonTransaction]:
    """Run the test in one transaction on one connection, rolled back at the end.

    For the test's duration, every ``db.session`` of ``neon_app`` (one per request or app
    context) joins this connection through a savepoint: ``db.session.commit()`` releases the
    savepoint, ``rollback()`` and the teardown after a failed request roll back to it, and the
    test's own session sees what requests wrote. After the test, passed or failed, the
    transaction is rolled back and the app's sessions use its engine again.

    Example::

        def test_create(neon_transaction, neon_client):
            assert neon_client.post("/notes", json={"title": "a"}).status_code == 201
            assert neon_transaction.session.scalar(sa.select(sa.func.count(Note.id))) == 1
    """
    state = _neon_state(neon_app)
    if has_app_context() and current_app._get_current_object() is neon_app:  # type: ignore[attr-defined]
        pytest.fail(
            f"an app context of {neon_app.name!r} is already active when the test's transaction "
            "starts (pushed by a session- or module-scoped fixture?). Requests would reuse it, "
            "and its db.session, outside the test's transaction. Push app contexts inside "
            "tests, or in fixtures that depend on neon_transaction.",
            pytrace=False,
        )
    connection = state.engine.connect()
    transaction = connection.begin()
    saved = state.sessionmaker, state.read_sessionmaker
    try:
        state.sessionmaker = _joined_maker(saved[0], connection)
        state.read_sessionmaker = _WriteSessionMaker(state.db)
        session = state.sessionmaker()
        try:
            yield NeonTransaction(neon_app, state.db, connection, session)
        finally:
            session.close()
    finally:
        # Restored first, so that nothing after the test can reach the closed connection.
        state.sessionmaker, state.read_sessionmaker = saved
        _end(connection, transaction)


@pytest.fixture
def neon_db_session(neon_transaction: NeonTransaction) -> orm.Session:
    """An ORM session inside the test's transaction, to arrange data and check results.

    It shares the connection with every request's ``db.session``: rows a request committed
    are visible here, and rows added here are visible to requests once flushed. Objects it
    loaded before a request changed them keep their old state until
    ``neon_db_session.expire_all()`` (ordinary ORM identity-map behaviour).

    Example::

        def test_list(neon_db_session, neon_client):
            neon_db_session.add(Note(title="a"))
            neon_db_session.commit()
            assert neon_client.get("/notes").json["total"] == 1
    """
    return neon_transaction.session


@pytest.fixture
def neon_client(neon_app: Flask, neon_transaction: NeonTransaction) -> FlaskClient:
    """``neon_app.test_client()``, with every request inside the test's transaction.

    Example::

        def test_delete(neon_client):
            created = neon_client.post("/notes", json={"title": "a"}).json
            assert neon_client.delete(f"/notes/{created['id']}").status_code == 204
    """
    return neon_app.test_client()
