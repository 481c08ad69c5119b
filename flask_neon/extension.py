"""The ``NeonDB`` extension: per-app state, the request-scoped session and its teardown."""

from __future__ import annotations

import dataclasses
import logging
import os
import typing as t

import sqlalchemy as sa
from flask import Flask, current_app, has_app_context

# The app context's ContextVar, which flask.g and current_app resolve through: reading it
# directly keeps ``db.session`` (touched many times per request) off the LocalProxy path.
from flask.globals import _cv_app
from pydantic import SecretStr
from sqlalchemy import orm

from . import health
from .cli import CLIConfigError, db_check
from .engine import limit_parameters, limits_mode, make_engine
from .errors import DatabaseUnavailableError, NeonConfigError, NeonStateError, classify
from .handlers import register_error_handlers
from .monitoring import Leak, PoolMonitor, install_slow_query_log
from .profiles import PoolConfig, pool_config, resolve_profile
from .settings import LoadedSettings, NeonSettings, load_settings
from .url import DatabaseURL, resolve_urls

log = logging.getLogger("flask_neon")

EXTENSION_KEY = "flask-neon"
#: Development catches leaks early; production pays nothing unless DB_LEAK_THRESHOLD is set.
DEVELOPMENT_LEAK_THRESHOLD = 30.0
_SESSION_KEY = "_flask_neon_session"
_READ_SESSION_KEY = "_flask_neon_read_session"

#: Naming conventions give constraints stable names, so Alembic can drop and alter them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


@dataclasses.dataclass(frozen=True)
class Engine:
    """One engine of an app, with the URL it was built from and its monitors."""

    url: DatabaseURL
    pooled: bool
    engine: sa.Engine
    monitor: PoolMonitor
    health: health.HealthChecker


@dataclasses.dataclass
class NeonState:
    """Everything flask-neon holds for one app, stored in ``app.extensions["flask-neon"]``."""

    db: NeonDB
    loaded: LoadedSettings
    pool: PoolConfig
    #: The app's engine, on DB_URL (pooled or direct).
    primary: Engine
    #: The engine for migrations and checks: the direct host (the primary when it is direct).
    admin: Engine
    #: The read replica's engine when DB_READ_URL is set.
    read: Engine | None
    sessionmaker: orm.sessionmaker[orm.Session]
    read_sessionmaker: orm.sessionmaker[orm.Session]
    health_details: bool
    #: Whether plaintext-capable remote URLs are refused (DB_REQUIRE_TLS or the profile).
    require_tls: bool

    @property
    def settings(self) -> NeonSettings:
        return self.loaded.settings

    @property
    def url(self) -> DatabaseURL:
        return self.primary.url

    @property
    def pooled(self) -> bool:
        return self.primary.pooled

    @property
    def engine(self) -> sa.Engine:
        return self.primary.engine

    @property
    def admin_engine(self) -> sa.Engine:
        return self.admin.engine

    @property
    def monitor(self) -> PoolMonitor:
        return self.primary.monitor

    @property
    def health(self) -> health.HealthChecker:
        return self.primary.health

    def secrets(self) -> list[str]:
        """Every secret of every URL the app uses, for masking free text."""
        engines = {id(e): e for e in (self.primary, self.admin, self.read) if e is not None}
        return [secret for e in engines.values() for secret in e.url.secrets()]

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
        try:
            self._init_app(app)
        except NeonConfigError as error:
            if _loading_for_cli_command():
                # Flask's CLI prints this kind as one line; any other exception as a traceback.
                raise CLIConfigError(str(error)) from None
            raise

    def _init_app(self, app: Flask) -> None:
        loaded = load_settings(app.config, self.env_file)
        settings = loaded.settings
        profile = resolve_profile(loaded, app.debug)
        development = profile.name == "development"
        require_tls = (
            profile.name == "production" if settings.require_tls is None else settings.require_tls
        )
        urls = resolve_urls(
            settings.url.get_secret_value(),
            direct_raw=_secret(settings.direct_url),
            read_raw=_secret(settings.read_url),
            pooled=settings.pooled,
            require_tls=require_tls,
        )
        pool = pool_config(loaded, profile)
        leak_threshold = settings.leak_threshold
        if leak_threshold is None:
            leak_threshold = DEVELOPMENT_LEAK_THRESHOLD if development else 0
        name = f"flask-neon:{app.name}"
        # Every checker masks every URL's secrets: a driver message may quote any of them.
        secrets = [
            secret
            for url in (urls.primary, urls.direct, urls.read)
            if url
            for secret in url.secrets()
        ]

        def build(url: DatabaseURL, pooled: bool, config: PoolConfig) -> Engine:
            engine = make_engine(url, settings, config, pooled=pooled, application_name=name)
            monitor = PoolMonitor(leak_threshold)
            monitor.install(engine)
            if settings.slow_query_ms:
                install_slow_query_log(engine, settings.slow_query_ms)
            if settings.metrics and url is urls.primary:
                from .metrics import install_metrics

                install_metrics(engine, monitor, app.name)
            checker = health.HealthChecker(
                engine, secrets, settings.health_timeout, settings.health_cache_seconds
            )
            return Engine(url, pooled, engine, monitor, checker)

        primary = build(urls.primary, urls.pooled, pool)
        if urls.direct is None or urls.direct is urls.primary:
            admin = primary
        else:
            # Migrations and checks are one connection at a time: a tiny pool is enough.
            admin = build(
                urls.direct, False, dataclasses.replace(pool, pool_size=1, max_overflow=2)
            )
        read = None
        if urls.read is not None:
            read = build(urls.read, urls.read.is_neon_pooled or bool(settings.pooled), pool)
        if urls.pooled and urls.direct is None:
            log.warning(
                "flask-neon: DB_POOLED is on but DB_DIRECT_URL is not set: migrations and "
                "flask db-check go through the pooler, where session state does not survive."
            )
        state = NeonState(
            db=self,
            loaded=loaded,
            pool=pool,
            primary=primary,
            admin=admin,
            read=read,
            sessionmaker=orm.sessionmaker(bind=primary.engine, **self.session_options),
            read_sessionmaker=orm.sessionmaker(
                bind=(read or primary).engine.execution_options(postgresql_readonly=True),
                **self.session_options,
            ),
            health_details=(
                development if settings.health_details is None else settings.health_details
            ),
            require_tls=require_tls,
        )
        if settings.connect_on_start:
            if _loading_for_cli_command():
                # `flask db-check` reports an unreachable database itself, and `flask db ...`
                # fails with its own error; a traceback while loading the app helps neither.
                log.info("flask-neon: DB_CONNECT_ON_START skipped while loading a CLI command")
            else:
                _check_connection(state)
        app.extensions[EXTENSION_KEY] = state
        app.teardown_appcontext(self._teardown)
        if settings.health_enabled:
            health.register(app, settings.health_prefix.rstrip("/") or "")
        if settings.error_handler:
            register_error_handlers(app)
        app.cli.add_command(db_check)
        log.info(
            "flask-neon: app %r uses %s (%s host%s%s), profile %s, pool %s, session limits %s",
            app.name,
            urls.primary.masked(),
            "pooled" if urls.pooled else "direct",
            f", migrations via {admin.url.masked()}" if admin is not primary else "",
            f", reads via {read.url.masked()}" if read is not None else "",
            pool.profile,
            {k: v for k, v in pool.as_dict().items() if k != "profile"},
            state.session_limits,
        )

    def _state(self, app: Flask | None = None, what: str = "db.engine") -> NeonState:
        if app is None:
            context = _cv_app.get(None)
            if context is None:
                raise NeonStateError(
                    f"{what} needs an application context. Use it inside a request, a CLI "
                    "command, or 'with app.app_context():'."
                )
            app = context.app
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

    def get_engine(self, app: Flask | None = None) -> sa.Engine:
        """The engine for schema changes and admin work: Flask-Migrate's hook.

        This is :attr:`engine` itself, unless ``DB_URL`` goes through a pooler: then it is an
        engine on the direct host (``DB_DIRECT_URL``, or the Neon host without ``-pooler``),
        because migrations need session state that a transaction-mode pooler drops.
        Flask-Migrate's ``env.py`` calls ``db.get_engine()`` first, so ``flask db upgrade``
        runs on the direct host with no change to ``env.py``.
        """
        return self._state(app, "db.get_engine()").admin_engine

    @property
    def read_engine(self) -> sa.Engine:
        """The read replica's engine (``DB_READ_URL``), or the primary's when unset."""
        state = self._state(what="db.read_engine")
        return (state.read or state.primary).engine

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
        context = _cv_app.get(None)
        if context is not None:
            session = context.g.__dict__.get(_SESSION_KEY)
            if session is not None:
                return t.cast(orm.Session, session)
        return self._new_session(_SESSION_KEY, "db.session")

    def _new_session(self, key: str, what: str) -> orm.Session:
        state = self._state(what=what)
        maker = state.sessionmaker if key == _SESSION_KEY else state.read_sessionmaker
        session = maker()
        _cv_app.get().g.__dict__[key] = session
        return session

    @property
    def read_session(self) -> orm.Session:
        """A session for read-only work, on the replica when ``DB_READ_URL`` is set.

        Its transactions are read-only (a write fails with the ``read_only`` cause), also when
        it falls back to the primary. The replica lags behind the primary: reads that must see
        this request's own writes belong on :attr:`session`. Closed at teardown like it.
        """
        context = _cv_app.get(None)
        if context is not None:
            session = context.g.__dict__.get(_READ_SESSION_KEY)
            if session is not None:
                return t.cast(orm.Session, session)
        return self._new_session(_READ_SESSION_KEY, "db.read_session")

    def _teardown(self, exc: BaseException | None) -> None:
        """Return this app context's connections to the pool.

        Anything not committed is rolled back. A broken connection is logged and discarded;
        teardown never raises into Flask.
        """
        namespace = _cv_app.get().g.__dict__
        for key in (_SESSION_KEY, _READ_SESSION_KEY):
            session: orm.Session | None = namespace.pop(key, None)
            if session is not None:
                self._close(session)

    def _close(self, session: orm.Session) -> None:
        try:
            session.close()
        except Exception as error:
            cause = classify(error, self._state(what="teardown").secrets())
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


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def current_state() -> NeonState:
    """The flask-neon state of the current app, for the blueprint, handlers and CLI."""
    state = current_app.extensions.get(EXTENSION_KEY)
    if state is None:
        raise NeonStateError(f"flask-neon is not initialised on app '{current_app.name}'.")
    return t.cast(NeonState, state)


def _loading_for_cli_command() -> bool:
    """True while ``flask <command>`` loads the app to find a command of the app's."""
    import click
    from flask.cli import FlaskGroup

    context = click.get_current_context(silent=True)
    return context is not None and isinstance(context.command, FlaskGroup)


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
