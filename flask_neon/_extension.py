"""The ``NeonDB`` extension: builds an app's state once, wires its hooks, routes and commands, and
hands out its per-app objects (engines, settings, pool statistics)."""

from __future__ import annotations

import logging
import os
import typing as t

import click
import sqlalchemy as sa
from flask import Flask, current_app, has_app_context, request_finished
from flask.cli import FlaskGroup
from sqlalchemy import orm

from . import _health as health
from ._assembly import build_state
from ._cli import CLIConfigError, db_check
from ._compat import FlaskSQLAlchemyAPI
from ._context import ContextAPI
from ._errors import DatabaseUnavailableError, NeonConfigError, NeonStateError
from ._handlers import register_error_handlers
from ._models import model_base
from ._monitoring import Leak
from ._probe import run_probe
from ._profiles import PoolConfig
from ._request import RequestSessions
from ._settings import NeonSettings
from ._state import EXTENSION_KEY, NeonState
from ._timing import add_header
from ._url import DatabaseURL

log = logging.getLogger("flask_neon")

#: Naming conventions give constraints stable names, so Alembic can drop and alter them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class NeonDB(RequestSessions, ContextAPI, FlaskSQLAlchemyAPI):
    """Connect a Flask app to PostgreSQL (Neon first of all).

    Example::

        db = NeonDB(app)              # or: db = NeonDB(); db.init_app(app) in create_app()

        @app.get("/notes/<int:id>")
        def get_note(id):
            return db.session.get(Note, id)

    Args:
        app: Initialise this app right away (same as calling :meth:`init_app`).
        metadata: The ``MetaData`` of your models. Omitted: the ``model_class``'s, or a fresh
            one with naming conventions.
        model_class: Your own ``DeclarativeBase`` subclass, which becomes :attr:`Model` (as
            Flask-SQLAlchemy's ``model_class``). Type checkers accept a class as a base only
            when they can name it, so ``class Note(Base)`` type-checks where
            ``class Note(db.Model)`` cannot.
        session_options: Extra arguments for each ``Session`` (e.g. ``expire_on_commit``).
        engine_options: ``create_engine()`` options for every engine, under
            ``DB_ENGINE_OPTIONS`` and a bind's own (as Flask-SQLAlchemy's ``engine_options``).
        env_file: The dotenv file to read settings from (``None``: none).
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        metadata: sa.MetaData | None = None,
        model_class: type[orm.DeclarativeBase] | None = None,
        session_options: dict[str, t.Any] | None = None,
        engine_options: dict[str, t.Any] | None = None,
        env_file: str | os.PathLike[str] | None = ".env",
    ) -> None:
        if model_class is not None:
            if metadata not in (None, model_class.metadata):
                raise NeonConfigError(
                    "NeonDB(metadata=..., model_class=...): the metadata is not the model "
                    "class's; give one of them."
                )
            metadata = model_class.metadata
        self.metadata = (
            metadata if metadata is not None else sa.MetaData(naming_convention=NAMING_CONVENTION)
        )
        self._bind_metadatas: dict[str, sa.MetaData] = {}
        #: The declarative base of this extension's models, bound to :attr:`metadata`::
        #:
        #:     class Note(db.Model):
        #:         __tablename__ = "notes"
        #:         id: Mapped[int] = mapped_column(primary_key=True)
        self.Model: type[orm.DeclarativeBase] = model_base(
            self._metadata_for, lambda: self.session, model_class
        )
        self.session_options = dict(session_options or {})
        self.engine_options = dict(engine_options or {})
        self.env_file = env_file
        if app is not None:
            self.init_app(app)

    # -- setup ---------------------------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        """Read the settings, build the app's engine and register teardown.

        Raises:
            NeonConfigError: a setting is missing or invalid (the message names it).
            NeonStateError: this app was already initialised.
            DatabaseUnavailableError: ``DB_CONNECT_ON_START`` is on and the database cannot
                be reached.
        """
        if EXTENSION_KEY in app.extensions:
            raise NeonStateError(
                f"flask-neon is already initialised on app '{app.name}'. Call init_app once "
                "per app (NeonDB(app) calls it for you)."
            )
        try:
            state = build_state(
                self,
                app.name,
                app.config,
                debug=app.debug,
                env_file=self.env_file,
                session_options=self.session_options,
                engine_options=self.engine_options,
            )
        except NeonConfigError as error:
            if _loading_for_cli_command():
                # Flask's CLI prints this kind as one line; any other exception as a traceback.
                raise CLIConfigError(str(error)) from None
            raise
        settings = state.settings
        for key in state.binds:
            self._metadata_for(key)  # Flask-Migrate reads db.metadatas[key] of every bind
        if settings.connect_on_start:
            if _loading_for_cli_command():
                # `flask db-check` reports an unreachable database itself, and `flask db ...`
                # fails with its own error; a traceback while loading the app helps neither.
                log.info("flask-neon: DB_CONNECT_ON_START skipped while loading a CLI command")
            else:
                _check_connection(state)
        app.extensions[EXTENSION_KEY] = state
        app.teardown_appcontext(self._teardown)
        request_finished.connect(self._hand_over, app, weak=False)
        if settings.server_timing:
            app.after_request(add_header)
        if settings.health_enabled:
            app.register_blueprint(health.make_blueprint(settings.health_prefix.rstrip("/")))
        if settings.error_handler:
            register_error_handlers(app)
        app.cli.add_command(db_check)
        app.shell_context_processor(self._shell_context)
        log.info(
            "flask-neon: app %r uses %s (%s host%s%s%s), profile %s, pool %s, session limits %s",
            app.name,
            state.url.masked(),
            "pooled" if state.pooled else "direct",
            f", migrations via {state.admin.url.masked()}"
            if state.admin is not state.primary
            else "",
            f", reads via {state.read.url.masked()}" if state.read is not None else "",
            "".join(f", bind {k!r} {b.primary.url.masked()}" for k, b in state.binds.items()),
            state.pool.profile,
            {k: v for k, v in state.pool.as_dict().items() if k != "profile"},
            state.session_limits,
        )

    def _shell_context(self) -> dict[str, t.Any]:
        """``flask shell`` starts with ``db`` and every model, as with Flask-SQLAlchemy."""
        models = {mapper.class_.__name__: mapper.class_ for mapper in self.Model.registry.mappers}
        return {"db": self, **models}

    def _state(self, app: Flask | None = None, what: str = "db.engine") -> NeonState:
        if app is None and not has_app_context():
            raise NeonStateError(
                f"{what} needs an application context. Use it inside a request, a CLI "
                "command, or 'with app.app_context():'."
            )
        app = app or current_app
        state = app.extensions.get(EXTENSION_KEY)
        if state is None or state.db is not self:
            raise NeonStateError(
                f"flask-neon is not initialised on app '{app.name}'. Call db.init_app(app) "
                f"(or NeonDB(app)) before using {what}."
            )
        return t.cast(NeonState, state)

    # -- per-app objects -------------------------------------------------------------------------

    @property
    def engine(self) -> sa.Engine:
        """The current app's engine. Needs an app context."""
        return self._state(what="db.engine").engine

    def get_engine(self, app: Flask | None = None, bind: str | None = None) -> sa.Engine:
        """The engine for schema changes and admin work: Flask-Migrate's hook.

        This is :attr:`engine` itself, unless ``DB_URL`` goes through a pooler: then it is an
        engine on the direct host (``DB_DIRECT_URL``, or the Neon host without ``-pooler``),
        because migrations need session state that a transaction-mode pooler drops.
        Flask-Migrate's ``env.py`` calls ``db.get_engine()`` first, so ``flask db upgrade``
        runs on the direct host with no change to ``env.py``. ``bind``: a key of ``DB_BINDS``
        (its direct host likewise), or None for the default database.
        """
        state = self._state(app, "db.get_engine()")
        if bind is None:
            return state.admin.engine
        if bind not in state.binds:
            raise NeonStateError(
                f"db.get_engine(bind={bind!r}): no such bind in DB_BINDS (or SQLALCHEMY_BINDS); "
                f"configured: {', '.join(map(repr, state.binds)) or 'none'}."
            )
        return state.binds[bind].admin.engine

    @property
    def engines(self) -> dict[str | None, sa.Engine]:
        """Every database's engine: ``None`` for ``DB_URL``, then each key of ``DB_BINDS``."""
        state = self._state(what="db.engines")
        return {None: state.engine, **{k: b.primary.engine for k, b in state.binds.items()}}

    @property
    def read_engine(self) -> sa.Engine:
        """The read replica's engine (``DB_READ_URL``), or the primary's when unset."""
        state = self._state(what="db.read_engine")
        return (state.read or state.primary).engine

    @property
    def pool_config(self) -> PoolConfig:
        """The current app's effective pool configuration and its profile."""
        return self._state(what="db.pool_config").pool

    @property
    def settings(self) -> NeonSettings:
        """The current app's settings, as read at ``init_app`` (the URL stays a secret)."""
        return self._state(what="db.settings").settings

    @property
    def url(self) -> DatabaseURL:
        """The current app's parsed URL; ``str()`` shows it masked."""
        return self._state(what="db.url").url

    def pool_stats(self, app: Flask | None = None) -> dict[str, t.Any]:
        """Pool statistics of ``app`` (default: the current app).

        Keys: ``status`` (``ok``, ``busy`` when overflow connections are in use, ``exhausted``
        when none is left), ``size``, ``checked_in``, ``checked_out``, ``overflow``,
        ``max_capacity``, and counters since start: ``connections_opened``, ``checkouts``,
        ``invalidations``, ``checkout_timeouts``, ``checkout_wait_seconds``.
        """
        state = self._state(app, "db.pool_stats()")
        return state.monitor.stats(state.engine)

    def check_connection_leaks(self, app: Flask | None = None) -> list[Leak]:
        """Connections held longer than ``DB_LEAK_THRESHOLD`` right now (empty when off)."""
        return self._state(app, "db.check_connection_leaks()").monitor.check_leaks()

    def state(self, app: Flask | None = None) -> NeonState:
        """The per-app state (engine, settings, URL, pool); for tools and tests."""
        return self._state(app, "db.state()")

    def __repr__(self) -> str:
        state = current_app.extensions.get(EXTENSION_KEY) if has_app_context() else None
        if state is not None and state.db is self:
            return f"<NeonDB {state.url.masked()} profile={state.pool.profile}>"
        return "<NeonDB>"


def _loading_for_cli_command() -> bool:
    """True while ``flask <command>`` loads the app to find a command of the app's."""
    context = click.get_current_context(silent=True)
    return context is not None and isinstance(context.command, FlaskGroup)


def _check_connection(state: NeonState) -> None:
    for app_engine in [state.primary, *(bind.primary for bind in state.binds.values())]:
        # The probe classifies a failure; the driver's traceback adds nothing to that cause.
        cause = run_probe(app_engine.engine, state.secrets()).cause
        if cause is not None:
            app_engine.engine.dispose()
            raise DatabaseUnavailableError(
                cause, f"DB_CONNECT_ON_START: cannot reach {app_engine.url.masked()}"
            )
