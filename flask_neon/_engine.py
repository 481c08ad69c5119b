"""Build one SQLAlchemy engine per app: pool, connect arguments and the events that keep it safe.

The events installed here are the reason flask-neon survives Neon's failure modes:

* session limits (``statement_timeout``, ``idle_in_transaction_session_timeout``) reach the
  server as startup options on a direct host, or with ``SET LOCAL`` per transaction through a
  pooler, which rejects startup options and drops session state;
* a liveness check on checkout that costs no round trip for a recently used connection
  (``_liveness``, run by the pool);
* connect retries with backoff and jitter, bounded by ``DB_CONNECT_TIMEOUT``, for computes
  that are waking up;
* fork safety: a forked child never touches its parent's sockets.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import time
import typing as t
import weakref

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.pool import ConnectionPoolEntry

from . import _drivers, _settling
from ._context import DatabaseContext
from ._errors import NeonConfigError, classify
from ._liveness import LivenessCheck
from ._monitoring import MeasuredQueuePool
from ._profiles import PoolConfig
from ._retry import Backoff
from ._settings import NeonSettings
from ._transactions import TransactionOpener
from ._url import DatabaseURL

log = logging.getLogger("flask_neon")

# libpq rounds connect_timeout down to whole seconds and treats anything below 2 as 2.
_MIN_ATTEMPT_SECONDS = 2

_engines: weakref.WeakSet[sa.Engine] = weakref.WeakSet()


def limits_mode(
    settings: NeonSettings, pooled: bool
) -> t.Literal["startup", "transaction", "off"]:
    """How the session limits reach the server for this URL."""
    if settings.session_limits == "auto":
        return "transaction" if pooled else "startup"
    return settings.session_limits


def limit_parameters(settings: NeonSettings) -> dict[str, str]:
    """The server parameters flask-neon enforces, in milliseconds, omitting disabled ones."""
    limits = {
        "statement_timeout": settings.statement_timeout,
        "idle_in_transaction_session_timeout": settings.idle_in_transaction_timeout,
    }
    return {name: str(round(seconds * 1000)) for name, seconds in limits.items() if seconds > 0}


def make_engine(
    url: DatabaseURL,
    settings: NeonSettings,
    pool: PoolConfig,
    *,
    pooled: bool,
    application_name: str = "flask-neon",
    engine_options: t.Mapping[str, t.Any] | None = None,
    options_setting: str = "DB_ENGINE_OPTIONS",
    context: t.Callable[[], DatabaseContext | None] | None = None,
) -> sa.Engine:
    """Create one engine of an app. Call once per app and process; never per request.

    ``engine_options`` (default: ``DB_ENGINE_OPTIONS``) go to ``create_engine`` over the
    profile's; errors about them name ``options_setting``. ``context`` gives the database context
    of the transaction beginning now (``flask_neon._transactions``).
    """
    mode = limits_mode(settings, pooled)
    limits = limit_parameters(settings)
    connect_args = _connect_args(url, settings, application_name)
    if mode == "startup" and limits:
        flags = " ".join(f"-c {name}={value}" for name, value in limits.items())
        user_options = url.query_dict.get("options", "")
        connect_args["options"] = f"{user_options} {flags}".strip()

    options: dict[str, t.Any] = dict(
        pool_size=pool.pool_size,
        max_overflow=pool.max_overflow,
        pool_timeout=pool.pool_timeout,
        pool_recycle=pool.pool_recycle,
        # LIFO hands out the connection used last: the one most likely alive and recently
        # used, so the liveness check below can skip its round trip.
        pool_use_lifo=True,
        pool_pre_ping=False,
        echo=settings.echo,
        # Parameters carry user data and sometimes secrets: keep them out of logs and errors.
        hide_parameters=True,
    )
    extra = dict(settings.engine_options if engine_options is None else engine_options)
    refused = sorted(set(extra) & {"poolclass", "pool", "creator"})
    if refused:
        raise NeonConfigError(
            f"{options_setting}: {', '.join(refused)} not accepted; flask-neon builds the pool "
            "itself (use the DB_POOL_* settings)."
        )
    connect_args.update(extra.pop("connect_args", {}))
    arguments = {**options, **extra}
    try:
        engine = sa.create_engine(
            url.to_sqlalchemy(),
            poolclass=MeasuredQueuePool,
            connect_args=connect_args,
            **arguments,
        )
    except TypeError as exc:
        # SQLAlchemy names the arguments it does not know; nothing else is in the message.
        raise NeonConfigError(f"{options_setting}: {exc}") from None
    # A pooler drops session state after each transaction, so the limits are set per
    # transaction. SET LOCAL ends with the transaction and never leaks to another client.
    per_transaction = (
        tuple(f"SET LOCAL {name} = {int(value)}" for name, value in limits.items())
        if mode == "transaction"
        else ()
    )
    driver = _drivers.for_dialect(engine.dialect)
    if driver is not None:
        # The limits and the context travel with BEGIN and the first statement where that is
        # identical (fast BEGIN), or follow the driver's own BEGIN.
        opener = TransactionOpener(driver, per_transaction, context, fast=settings.fast_begin)
        opener.install(engine)
        if opener.fast:
            _settling.install(engine, driver)  # and the ROLLBACK after a response, not waited for
    # The pool checks a connection it hands out (a pool event would cost every checkout).
    liveness = LivenessCheck(engine.dialect, settings.ping_after_idle, arguments["pool_recycle"])
    liveness.install(engine)
    t.cast(MeasuredQueuePool, engine.pool).liveness = liveness
    _install_connect_retry(engine, settings, url.secrets())
    _engines.add(engine)
    _install_process_hooks()
    return engine


def _connect_args(
    url: DatabaseURL, settings: NeonSettings, application_name: str
) -> dict[str, t.Any]:
    query = url.query_dict
    defaults: dict[str, t.Any] = {
        "connect_timeout": settings.connect_timeout,
        "application_name": application_name[:63],
        # Keepalives let the OS notice a dead peer during a long query or an idle period
        # (a suspended compute that never sent a FIN) within about a minute.
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
    }
    if url.driver == "psycopg":
        # No server-side prepared statements (DB_ENGINE_OPTIONS' connect_args may ask for them):
        # a transaction-mode pooler before PgBouncer 1.22 loses them between transactions, and
        # psycopg deallocates them after each rollback, which the ROLLBACK sent after a response
        # without waiting would skip.
        defaults["prepare_threshold"] = None
    return {key: value for key, value in defaults.items() if key not in query}


def _install_connect_retry(engine: sa.Engine, settings: NeonSettings, secrets: list[str]) -> None:
    """Retry transient connect failures with exponential backoff and jitter.

    The whole attempt, retries included, stays within ``DB_CONNECT_TIMEOUT``: each attempt gets
    the time that is left as its libpq ``connect_timeout``. Only opening a connection is
    retried; a statement is never re-sent.
    """
    budget = min(settings.connect_retry_seconds, float(settings.connect_timeout))
    total = float(settings.connect_timeout)

    @event.listens_for(engine, "do_connect")
    def _connect(
        dialect: sa.Dialect,
        record: ConnectionPoolEntry,
        cargs: tuple[t.Any, ...],
        cparams: dict[str, t.Any],
    ) -> t.Any:
        started = time.monotonic()
        # The last attempt must still get libpq's shortest connect_timeout before the end.
        backoff = Backoff(min(started + budget, started + total - _MIN_ATTEMPT_SECONDS), base=0.1)
        while True:
            remaining = total - (time.monotonic() - started)
            params = {**cparams, "connect_timeout": max(_MIN_ATTEMPT_SECONDS, int(remaining))}
            try:
                return dialect.connect(*cargs, **params)
            except Exception as exc:
                cause = classify(exc, secrets)
                delay = backoff.next_delay() if cause.transient else None
                if delay is None:
                    raise
                log.info(
                    "flask-neon: connect attempt %d failed (%s); retrying in %.2fs",
                    backoff.attempts - 1,
                    cause.title,
                    delay,
                )
                time.sleep(delay)


@functools.cache  # once per process
def _install_process_hooks() -> None:
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_forget_parent_connections)
    atexit.register(dispose_all)


def _forget_parent_connections() -> None:
    # The child inherits the parent's sockets. Using them would interleave two processes'
    # traffic on one connection; closing them would close the parent's. Drop them unclosed.
    for engine in list(_engines):
        engine.dispose(close=False)


def dispose_all() -> None:
    """Close every engine flask-neon created in this process (registered with ``atexit``)."""
    for engine in list(_engines):
        try:
            engine.dispose()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            log.debug("flask-neon: dispose failed at exit", exc_info=True)
