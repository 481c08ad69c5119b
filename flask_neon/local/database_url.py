"""The database URL for an app: ``$DB_URL`` when set, else that of a new local cluster."""

from __future__ import annotations

import os

from .cluster import LocalPostgres

__all__ = ["ensure_database_url"]


def ensure_database_url(env_var: str = "DB_URL") -> tuple[str, LocalPostgres | None]:
    """Return a database URL: ``$env_var`` if set, else that of a new local cluster.

    Args:
        env_var: Environment variable holding an existing database's URL.

    Returns:
        ``(url, None)`` when the variable is set and non-empty, otherwise ``(url, cluster)``
        for a freshly started :class:`LocalPostgres` (a ``postgresql://`` URL, which names no
        driver: ``DB_DRIVER`` picks it), which the caller must :meth:`stop
        <LocalPostgres.stop>` (it is also stopped at interpreter exit).

    Raises:
        LocalPostgresError: The variable is unset and no local cluster could be started.
    """
    url = os.environ.get(env_var)
    if url:
        return url, None
    cluster = LocalPostgres()
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    # No driver named: the app's DB_DRIVER decides, as for any postgresql:// URL.
    return cluster.url_for(cluster.database, driver=None), cluster
