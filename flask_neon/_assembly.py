"""From an app's configuration to its :class:`~flask_neon._state.NeonState`, in one pass.

Settings are read once (``app.config``, the environment, ``.env``), the URLs resolved once, the
profile turns the settings into pool arguments once, and the engines are built from those.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing as t

from pydantic import SecretStr
from sqlalchemy import orm

from ._engine import make_engine
from ._monitoring import PoolMonitor, install_slow_query_log
from ._probe import HealthChecker
from ._profiles import PoolConfig, pool_config, resolve_profile
from ._settings_loader import load_settings
from ._state import AppEngine, Extension, NeonState
from ._url import DatabaseURL, resolve_urls

log = logging.getLogger("flask_neon")

#: Development catches leaks early; production pays nothing unless DB_LEAK_THRESHOLD is set.
DEVELOPMENT_LEAK_THRESHOLD = 30.0


def build_state(
    db: Extension,
    app_name: str,
    config: t.Mapping[str, t.Any],
    *,
    debug: bool,
    env_file: str | os.PathLike[str] | None,
    session_options: t.Mapping[str, t.Any],
) -> NeonState:
    """Read the settings and build the engines of one app; connects to nothing.

    Raises:
        NeonConfigError: a setting is missing or invalid (the message names it).
    """
    loaded = load_settings(config, env_file)
    settings = loaded.settings
    profile = resolve_profile(loaded, debug)
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
    # Every checker masks every URL's secrets: a driver message may quote any of them.
    secrets = [
        secret for url in (urls.primary, urls.direct, urls.read) if url for secret in url.secrets()
    ]

    def build(url: DatabaseURL, pooled: bool, config: PoolConfig) -> AppEngine:
        engine = make_engine(
            url, settings, config, pooled=pooled, application_name=f"flask-neon:{app_name}"
        )
        monitor = PoolMonitor(config.max_overflow, leak_threshold)
        monitor.install(engine)
        if settings.slow_query_ms:
            install_slow_query_log(engine, settings.slow_query_ms)
        if settings.metrics and url is urls.primary:
            from ._metrics import install_metrics  # prometheus_client only when asked for

            install_metrics(engine, monitor, app_name)
        checker = HealthChecker(engine, secrets, settings.health_cache_seconds)
        return AppEngine(url, pooled, engine, monitor, checker)

    primary = build(urls.primary, urls.pooled, pool)
    if urls.direct is None or urls.direct is urls.primary:
        admin = primary
    else:
        # Migrations and checks are one connection at a time: a tiny pool is enough.
        admin = build(urls.direct, False, dataclasses.replace(pool, pool_size=1, max_overflow=2))
    read = None
    if urls.read is not None:
        read = build(urls.read, urls.read.is_neon_pooled or bool(settings.pooled), pool)
    if urls.pooled and urls.direct is None:
        log.warning(
            "flask-neon: DB_POOLED is on but DB_DIRECT_URL is not set: migrations and "
            "flask db-check go through the pooler, where session state does not survive."
        )
    return NeonState(
        db=db,
        loaded=loaded,
        pool=pool,
        primary=primary,
        admin=admin,
        read=read,
        sessionmaker=orm.sessionmaker(bind=primary.engine, **session_options),
        read_sessionmaker=orm.sessionmaker(
            bind=(read or primary).engine.execution_options(postgresql_readonly=True),
            **session_options,
        ),
        health_details=(
            development if settings.health_details is None else settings.health_details
        ),
        require_tls=require_tls,
    )


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None
