"""The app and its schema: ``neon_app``, ``neon_migrations_dir`` and ``neon_schema``."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from flask import Flask

from .._state import EXTENSION_KEY, NeonState
from .stop import _stop_run

__all__ = ["DROP_LOCK_TIMEOUT", "neon_app", "neon_migrations_dir", "neon_schema"]

#: How long dropping the tables may wait for a lock a leaked connection holds.
DROP_LOCK_TIMEOUT = "10s"

_NEON_APP_EXAMPLE = """\
    @pytest.fixture(scope="session")
    def neon_app(neon_database_url):
        return create_app({"TESTING": True, "DB_URL": neon_database_url})"""


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
    engine, metadata = state.admin.engine, state.db.metadata
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
