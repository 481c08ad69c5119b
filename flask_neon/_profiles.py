"""Pool profiles as data, and the effective pool configuration of one app.

A profile supplies defaults for the pool settings; a value the user set explicitly (in
``app.config``, the environment or ``.env``) always wins over the profile's.
"""

from __future__ import annotations

import dataclasses
import typing as t

from ._settings import Source
from ._settings_loader import LoadedSettings

POOL_FIELDS = ("pool_size", "max_overflow", "pool_timeout", "pool_recycle")


@dataclasses.dataclass(frozen=True)
class PoolProfile:
    """Defaults for one kind of deployment. ``None`` means: use the setting's own default."""

    name: str
    pool_size: int | None = None
    max_overflow: int | None = None
    pool_timeout: float | None = None
    pool_recycle: int | None = None


PROFILES: dict[str, PoolProfile] = {
    # One developer, and a compute that suspends after 5 idle minutes: small, fails fast.
    "development": PoolProfile(
        "development", pool_size=2, max_overflow=5, pool_timeout=10, pool_recycle=300
    ),
    # Long-running servers (gunicorn, uwsgi): the DB_POOL_* settings as given.
    "production": PoolProfile("production"),
    # One request at a time per instance (Lambda, Cloud Run with concurrency 1, Vercel).
    "serverless": PoolProfile(
        "serverless", pool_size=2, max_overflow=0, pool_timeout=10, pool_recycle=300
    ),
}


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """The pool an app really gets: its profile's defaults merged with explicit settings.

    Available as ``db.pool_config`` inside an app context.
    """

    profile: str
    pool_size: int
    max_overflow: int
    pool_timeout: float
    pool_recycle: int
    sources: dict[str, Source] = dataclasses.field(compare=False)

    @property
    def max_connections(self) -> int:
        """The most connections this pool opens: pool size plus overflow."""
        return self.pool_size + self.max_overflow

    def as_dict(self) -> dict[str, t.Any]:
        return {
            "profile": self.profile,
            **{name: getattr(self, name) for name in POOL_FIELDS},
            "max_connections": self.max_connections,
        }


def resolve_profile(loaded: LoadedSettings, debug: bool) -> PoolProfile:
    """The profile named by ``DB_PROFILE``, else development in debug mode, else production."""
    name = loaded.settings.profile or ("development" if debug else "production")
    return PROFILES[name]


def pool_config(loaded: LoadedSettings, profile: PoolProfile) -> PoolConfig:
    """Merge ``profile`` with the settings; explicit settings win."""
    values: dict[str, t.Any] = {}
    sources: dict[str, Source] = {}
    for name in POOL_FIELDS:
        from_profile = getattr(profile, name)
        if loaded.sources[name] != "default" or from_profile is None:
            values[name] = getattr(loaded.settings, name)
            sources[name] = loaded.sources[name]
        else:
            values[name] = from_profile
            sources[name] = "profile"
    return PoolConfig(profile=profile.name, sources=sources, **values)
