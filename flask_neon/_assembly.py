"""From an app's configuration to its :class:`~flask_neon._state.NeonState`, in one pass.

Settings are read once (``app.config``, the environment, ``.env``), the URLs resolved once, the
profile turns the settings into pool arguments once, and the engines are built from those.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing as t

import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy import orm

from . import _drivers, _nplusone, _timing
from ._engine import make_engine
from ._errors import NeonConfigError
from ._monitoring import PoolMonitor, install_slow_query_log
from ._probe import HealthChecker
from ._profiles import PoolConfig, pool_config, resolve_profile
from ._session import RoutingSession
from ._settings import NeonSettings, key_for
from ._settings_loader import load_settings
from ._state import AppEngine, Bind, Extension, NeonState
from ._url import DatabaseURL, apply_tls_policy, parse_url, resolve_urls

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
    engine_options: t.Mapping[str, t.Any] = {},
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
        driver=settings.driver,
    )
    pool = pool_config(loaded, profile)
    leak_threshold = settings.leak_threshold
    if leak_threshold is None:
        leak_threshold = DEVELOPMENT_LEAK_THRESHOLD if development else 0
    bind_urls = {
        key: _bind_url(key, value, require_tls=require_tls, driver=settings.driver)
        for key, value in settings.binds.items()
    }
    every_url = [urls.primary, urls.direct, urls.read]
    every_url += [url for bind, _ in bind_urls.values() for url in (bind, bind.direct())]
    for url in every_url:
        if url is not None:
            _drivers.require(url.driver, url.setting)
    # Every checker masks every URL's secrets: a driver message may quote any of them.
    secrets = [secret for url in every_url if url for secret in url.secrets()]
    # Migrations and checks are one connection at a time: a tiny pool is enough.
    admin_pool = dataclasses.replace(pool, pool_size=1, max_overflow=2)

    def build(
        url: DatabaseURL,
        pooled: bool,
        config: PoolConfig,
        options: t.Mapping[str, t.Any] | None = None,
    ) -> AppEngine:
        engine = make_engine(
            url,
            settings,
            config,
            pooled=pooled,
            application_name=f"flask-neon:{app_name}",
            engine_options={**engine_options, **settings.engine_options}
            if options is None
            else {**engine_options, **options},
            options_setting="DB_ENGINE_OPTIONS" if options is None else url.setting,
            # Each transaction's settings and role (@db.request_context, db.context()).
            context=db._current_context,
        )
        monitor = PoolMonitor(config.max_overflow, leak_threshold)
        monitor.install(engine)
        if settings.slow_query_ms:
            install_slow_query_log(engine, settings.slow_query_ms)
        if settings.server_timing:
            driver = _drivers.for_dialect(engine.dialect)
            fast = settings.fast_begin and driver is not None and driver.FAST_BEGIN
            _timing.install(engine, begin_is_free=fast)
        if settings.metrics and url is urls.primary:
            from ._metrics import install_metrics  # prometheus_client only when asked for

            install_metrics(engine, monitor, app_name)
        checker = HealthChecker(engine, secrets, settings.health_cache_seconds)
        return AppEngine(url, pooled, engine, monitor, checker)

    primary = build(urls.primary, urls.pooled, pool)
    if urls.direct is None or urls.direct is urls.primary:
        admin = primary
    else:
        admin = build(urls.direct, False, admin_pool)
    read = None
    if urls.read is not None:
        read = build(urls.read, urls.read.is_neon_pooled or bool(settings.pooled), pool)
    binds = {}
    for key, (url, options) in bind_urls.items():
        engine = build(url, url.is_neon_pooled, pool, options)
        direct = url.direct()  # a Neon pooler host's direct host, for migrations
        bind_admin = engine if direct is url else build(direct, False, admin_pool, options)
        binds[key] = Bind(key, engine, bind_admin)
    if urls.pooled and urls.direct is None:
        log.warning(
            "flask-neon: DB_POOLED is on but DB_DIRECT_URL is not set: migrations and "
            "flask db-check go through the pooler, where session state does not survive."
        )
    state = NeonState(
        db=db,
        loaded=loaded,
        pool=pool,
        primary=primary,
        admin=admin,
        read=read,
        binds=binds,
        sessionmaker=orm.sessionmaker(
            bind=primary.engine,
            class_=RoutingSession,
            engines={key: bind.primary.engine for key, bind in binds.items()},
            **session_options,
        ),
        read_sessionmaker=orm.sessionmaker(
            bind=_read_only((read or primary).engine),
            class_=RoutingSession,
            engines={key: _read_only(bind.primary.engine) for key, bind in binds.items()},
            **session_options,
        ),
        health_details=(
            development if settings.health_details is None else settings.health_details
        ),
        require_tls=require_tls,
        app_name=app_name,
    )
    state.nplusone = _nplusone_detector(settings, app_name, development)
    if state.nplusone is not None:
        engines = [primary, admin, read]
        engines += [e for bind in binds.values() for e in (bind.primary, bind.admin)]
        _nplusone.install({e.engine for e in engines if e is not None}, state.nplusone)
    return state


def _nplusone_detector(
    settings: NeonSettings, app_name: str, development: bool
) -> _nplusone.Detector | None:
    """N+1 detection as the settings ask (``DB_NPLUSONE``, ``DB_STATEMENT_BUDGET``)."""
    mode = settings.nplusone
    if mode == "auto":
        mode = "warn" if development else "off"
    patterns = mode != "off"
    if not patterns:
        if not settings.statement_budget:
            return None
        mode = "warn"  # the budget alone, reported as a warning
    counter = None
    if settings.metrics:
        from ._metrics import nplusone_counter

        counter = nplusone_counter()
    threshold, budget = settings.nplusone_threshold, settings.statement_budget
    return _nplusone.Detector(app_name, mode, threshold, budget, counter, patterns=patterns)


def _bind_url(
    key: str, value: str | t.Mapping[str, t.Any], *, require_tls: bool, driver: str
) -> tuple[DatabaseURL, dict[str, t.Any]]:
    """The URL of one ``DB_BINDS`` entry and its engine options (Flask-SQLAlchemy's forms)."""
    setting = f"{key_for('binds')}[{key!r}]"
    options = dict(value) if isinstance(value, t.Mapping) else {"url": value}
    raw = options.pop("url", None)
    if not isinstance(raw, str):
        raise NeonConfigError(
            f"{setting} has no url: give a URL, or create_engine() options with a 'url' key."
        )
    url = apply_tls_policy(parse_url(raw, setting, driver), require_tls=require_tls)
    return url, options


def _read_only(engine: sa.Engine) -> sa.Engine:
    return engine.execution_options(postgresql_readonly=True)


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None
