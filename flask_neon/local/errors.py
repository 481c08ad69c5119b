"""The one exception of :mod:`flask_neon.local`."""

from __future__ import annotations

__all__ = ["LocalPostgresError"]


class LocalPostgresError(RuntimeError):
    """A local PostgreSQL cluster could not be found, started or stopped.

    The message says what went wrong and what to install or change.
    """
