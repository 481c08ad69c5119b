"""The ``NeonDB`` extension: per-app state, the request-scoped session and its teardown."""

from __future__ import annotations

import dataclasses
import logging
import os
import typing as t

import sqlalchemy as sa
from flask import Flask, current_app, g, has_app_context
from sqlalchemy import orm

from . import health
from .cli import db_check
from .engine import limit_parameters, limits_mode, make_engine
from .errors import DatabaseUnavailableError, NeonStateError, classify
from .handlers import register_error_handlers
from .monitoring import Leak, PoolMonitor, install_slow_query_log
from .profiles import PoolConfig, pool_config, resolve_profile
from .settings import LoadedSettings, NeonSettings, load_settings
from .url import DatabaseURL, parse_url

log = logging.getLogger("flask_neon")

EXTENSION_KEY = "flask-neon"
#: Development catches leaks early; production pays nothing unless DB_LEAK_THRESHOLD is set.
DEVELOPMENT_LEAK_THRESHOLD = 30.0
_SESSION_KEY = "_flask_neon_session"

#: Naming conventions give constraints stable names, so Alembic can drop and alter them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


@dataclasses.dataclass
class NeonState:
    """Everything flask-neon holds for one app, stored in ``app.extensions["flask-neon"]``."""

    db: NeonDB
    loaded: LoadedSettings
    url: DatabaseURL
    pooled: bool
    pool: PoolConfig
    engine: sa.Engine
    sessionmaker: orm.sessionmaker[orm.Session]
    monitor: PoolMonitor
    health: health.HealthChecker
    health_details: bool

    @property
    def settings(self) -> NeonSettings:
        return self.loaded.settings

    @property
    def session_limits(self) -> dict[str, t.Any]:
        """The limits in force and how they reach the server."""
        return {"mode": limits_mode(self.settings, self.pooled), **limit_parameters(self.settings)}


class NeonDB:
    """Connect a Flask app to PostgreSQL (Neon first of all).

    Example::

        db = NeonDB(app)              # or: db = NeonDB(); db.init_app(app) in create_app()

        @app.get("/notes/<int:id>")
        def get_note(id):
            return db.session.get(Note, id)

    Args:
        app: Initialise this app right away (same as calling :meth:`init_app`).
        metadata: The ``MetaData`` of your models, e.g. ``Base.metadata`` of your own
            ``DeclarativeBase``. Omitted: a fresh one with naming conventions, also used by
            :attr:`Model`.
        session_options: Extra arguments for each ``Session`` (e.g. ``expire_on_commit``).
        env_file: The dotenv file to read settings from (``None``: none).
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        metadata: sa.MetaData | None = None,
        session_options: dict[str, t.Any] | None = None,
        env_file: str | os.PathLike[str] | None = ".env",
    ) -> None:
        self.metadata = (
            metadata if metadata is not None else sa.MetaData(naming_convention=NAMING_CONVENTION)
        )
        self.session_options = dict(session_options or {})
        self.env_file = env_file
        self._model: type[orm.DeclarativeBase] | None = None
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
        loaded = load_settings(app.config, self.env_file)
        settings = loaded.settings
        url = parse_url(settings.url.get_secret_value(), "DB_URL")
        pooled = url.is_neon_pooled
        profile = resolve_profile(loaded, app.debug)
        pool = pool_config(loaded, profile)
        development = profile.name == "development"
        engine = make_engine(
            url, settings, pool, pooled=pooled, application_name=f"flask-neon:{app.name}"
        )
        leak_threshold = settings.leak_threshold
        if leak_threshold is None:
            leak_threshold = DEVELOPMENT_LEAK_THRESHOLD if development else 0
        monitor = PoolMonitor(leak_threshold)
        monitor.install(engine)
        if settings.slow_query_ms:
            install_slow_query_log(engine, settings.slow_query_ms)
        state = NeonState(
            db=self,
            loaded=loaded,
            url=url,
            pooled=pooled,
            pool=pool,
            engine=engine,
            sessionmaker=orm.sessionmaker(bind=engine, **self.session_options),
            monitor=monitor,
            health=health.HealthChecker(
                engine, url.secrets(), settings.health_timeout, settings.health_cache_seconds
            ),
            health_details=(
                development if settings.health_details is None else settings.health_details
            ),
        )
        if settings.connect_on_start:
            _check_connection(state)
        app.extensions[EXTENSION_KEY] = state
        app.teardown_appcontext(self._teardown)
        if settings.health_enabled:
            health.register(app, settings.health_prefix.rstrip("/") or "")
        if settings.error_handler:
            register_error_handlers(app)
        app.cli.add_command(db_check)
        log.info(
            "flask-neon: app %r uses %s (%s host), profile %s, pool %s, session limits %s",
            app.name,
            url.masked(),
            "pooled" if pooled else "direct",
            pool.profile,
            {k: v for k, v in pool.as_dict().items() if k != "profile"},
            state.session_limits,
        )

    def _state(self, app: Flask | None = None, what: str = "db.engine") -> NeonState:
        if app is None:
            if not has_app_context():
                raise NeonStateError(
                    f"{what} needs an application context. Use it inside a request, a CLI "
                    "command, or 'with app.app_context():'."
                )
            app = t.cast(Flask, current_app._get_current_object())  # type: ignore[attr-defined]
        state = app.extensions.get(EXTENSION_KEY)
        if state is None or state.db is not self:
            raise NeonStateError(
                f"flask-neon is not initialised on app '{app.name}'. Call db.init_app(app) "
                "(or NeonDB(app)) before using {what}.".replace("{what}", what)
            )
        return t.cast(NeonState, state)

    # -- per-app objects -------------------------------------------------------------------------

    @property
    def engine(self) -> sa.Engine:
        """The current app's engine. Needs an app context."""
        return self._state(what="db.engine").engine

    def get_engine(self, app: Flask | None = None) -> sa.Engine:
        """The engine of ``app`` (default: the current app)."""
        return self._state(app, "db.get_engine()").engine

    @property
    def metadatas(self) -> dict[str | None, sa.MetaData]:
        """``{None: metadata}``, the shape Flask-Migrate's ``env.py`` reads."""
        return {None: self.metadata}

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

    @property
    def Model(self) -> type[orm.DeclarativeBase]:  # noqa: N802 - a class, named like one
        """A declarative base bound to :attr:`metadata`, for apps without a base of their own.

        Example::

            class Note(db.Model):
                __tablename__ = "notes"
                id: Mapped[int] = mapped_column(primary_key=True)
        """
        if self._model is None:
            self._model = t.cast(
                type[orm.DeclarativeBase],
                type("Model", (orm.DeclarativeBase,), {"metadata": self.metadata}),
            )
        return self._model

    # -- the request-scoped session ------------------------------------------------------------

    @property
    def session(self) -> orm.Session:
        """The session of the current app context, created on first use.

        Each app context (each request, each CLI command) gets its own session. It connects
        only when it first runs a query, and at teardown it is rolled back and closed: nothing
        is committed unless you call ``db.session.commit()``.
        """
        session = g.get(_SESSION_KEY) if has_app_context() else None
        if session is None:
            state = self._state(what="db.session")
            session = state.sessionmaker()
            setattr(g, _SESSION_KEY, session)
        return t.cast(orm.Session, session)

    def _teardown(self, exc: BaseException | None) -> None:
        """Return this app context's connection to the pool.

        Anything not committed is rolled back. A broken connection is logged and discarded;
        teardown never raises into Flask.
        """
        session: orm.Session | None = g.pop(_SESSION_KEY, None)
        if session is None:
            return
        try:
            session.close()
        except Exception as error:
            state = self._state(what="teardown")
            cause = classify(error, state.url.secrets())
            log.warning(
                "flask-neon: closing the session failed (%s: %s); connection discarded",
                cause.title,
                cause.detail,
            )
            try:
                session.invalidate()
            except Exception:
                log.debug("flask-neon: invalidate after a failed close also failed", exc_info=True)

    def __repr__(self) -> str:
        if has_app_context() and EXTENSION_KEY in current_app.extensions:
            state = current_app.extensions[EXTENSION_KEY]
            if state.db is self:
                return f"<NeonDB {state.url.masked()} profile={state.pool.profile}>"
        return "<NeonDB>"


def current_state() -> NeonState:
    """The flask-neon state of the current app, for the blueprint, handlers and CLI."""
    state = current_app.extensions.get(EXTENSION_KEY)
    if state is None:
        raise NeonStateError(f"flask-neon is not initialised on app '{current_app.name}'.")
    return t.cast(NeonState, state)


def _check_connection(state: NeonState) -> None:
    try:
        with state.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except Exception as exc:
        state.engine.dispose()
        cause = classify(exc, state.url.secrets())
        # ``from None``: the driver's traceback adds nothing the classified cause lacks.
        raise DatabaseUnavailableError(
            cause, f"DB_CONNECT_ON_START: cannot reach {state.url.masked()}"
        ) from None
