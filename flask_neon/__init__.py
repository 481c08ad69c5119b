"""flask-neon: a correct, fast and safe PostgreSQL connection for Flask, Neon first of all.

What an application types::

    from flask_neon import NeonDB

    db = NeonDB(app)        # or NeonDB() and db.init_app(app) in an app factory

The settings class (``NeonSettings``, every ``DB_*`` key) and the errors flask-neon raises are
exported too. Test support lives in :mod:`flask_neon.testing` (a pytest plugin), the local
PostgreSQL for development in :mod:`flask_neon.local`; fast BEGIN for an engine of your own in
:mod:`flask_neon.driver`.
"""

from ._context import DatabaseContext
from ._errors import (
    DatabaseUnavailableError,
    ErrorCause,
    NeonConfigError,
    NeonError,
    NeonStateError,
)
from ._extension import NeonDB
from ._nplusone import NPlusOneError
from ._settings import NeonSettings

__version__ = "0.1.0"

__all__ = [
    "DatabaseContext",
    "DatabaseUnavailableError",
    "ErrorCause",
    "NPlusOneError",
    "NeonConfigError",
    "NeonDB",
    "NeonError",
    "NeonSettings",
    "NeonStateError",
]
