"""What flask-neon holds for one app, and how the operator surfaces (health, CLI, error
handlers) find it."""

from __future__ import annotations

import dataclasses
import typing as t

import sqlalchemy as sa
from flask import Flask, current_app
from sqlalchemy import orm

from ._context import DatabaseContext
from ._engine import limit_parameters, limits_mode
from ._errors import NeonStateError
from ._monitoring import PoolMonitor
from ._probe import HealthChecker
from ._profiles import PoolConfig
from ._settings import NeonSettings
from ._settings_loader import LoadedSettings
from ._url import DatabaseURL

#: The key of :class:`NeonState` in ``app.extensions``.
EXTENSION_KEY = "flask-neon"


@dataclasses.dataclass(frozen=True)
class AppEngine:
    """One engine of an app, with the URL it was built from and its monitors."""

    url: DatabaseURL
    pooled: bool
    engine: sa.Engine
    monitor: PoolMonitor
    health: HealthChecker


@dataclasses.dataclass(frozen=True)
class Bind:
    """One database of ``DB_BINDS``: its engine, and the one for migrations (its direct host
    when the bind's URL is a Neon pooler host, else the same)."""

    key: str
    primary: AppEngine
    admin: AppEngine


class Extension(t.Protocol):
    """What the state needs of the extension object that built it (a ``NeonDB``)."""

    metadata: sa.MetaData

    def _current_context(self) -> DatabaseContext | None: ...


@dataclasses.dataclass
class NeonState:
    """Everything flask-neon holds for one app, stored in ``app.extensions["flask-neon"]``."""

    #: The extension object that built this state.
    db: Extension
    loaded: LoadedSettings
    pool: PoolConfig
    #: The app's engine, on DB_URL (pooled or direct).
    primary: AppEngine
    #: The engine for migrations and checks: the direct host (the primary when it is direct).
    admin: AppEngine
    #: The read replica's engine when DB_READ_URL is set.
    read: AppEngine | None
    #: The other databases (DB_BINDS), by bind key.
    binds: dict[str, Bind]
    sessionmaker: orm.sessionmaker[orm.Session]
    read_sessionmaker: orm.sessionmaker[orm.Session]
    health_details: bool
    #: Whether plaintext-capable remote URLs are refused (DB_REQUIRE_TLS or the profile).
    require_tls: bool
    #: The app's name, for messages.
    app_name: str = ""
    #: Whether a request's reading sessions may end after its response (``_request``); off
    #: once a response was not closed.
    hand_over: bool = True
    #: N+1 detection (``_nplusone``), None when off.
    nplusone: t.Any = None

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
    def monitor(self) -> PoolMonitor:
        return self.primary.monitor

    def secrets(self) -> list[str]:
        """Every secret of every URL the app uses, for masking free text."""
        engines = [self.primary, self.admin, self.read]
        engines += [e for bind in self.binds.values() for e in (bind.primary, bind.admin)]
        return [secret for e in engines if e is not None for secret in e.url.secrets()]

    @property
    def session_limits(self) -> dict[str, t.Any]:
        """The limits in force and how they reach the server."""
        return {"mode": limits_mode(self.settings, self.pooled), **limit_parameters(self.settings)}


def current_state(app: Flask | None = None) -> NeonState:
    """The flask-neon state of ``app`` (default: the current app)."""
    app = app or current_app
    state = app.extensions.get(EXTENSION_KEY)
    if state is None:
        raise NeonStateError(
            f"flask-neon is not initialised on app '{app.name}'. Call db.init_app(app) "
            "(or NeonDB(app)) first."
        )
    return t.cast(NeonState, state)
