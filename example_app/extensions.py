"""The extension objects, created once at import and bound to each app in ``create_app``.

They live in their own module so that models and views can import ``db`` without importing
the app factory (which imports them), the usual way to avoid an import cycle.
"""

from __future__ import annotations

import typing as t

from flask_migrate import Migrate  # type: ignore[import-untyped]
from sqlalchemy import orm

from flask_neon import NeonDB

#: The database: ``db.session`` in views, ``db.Model`` as the models' base class.
db = NeonDB()

#: Alembic migrations through ``flask db ...``; the directory is set in ``create_app``.
migrate = Migrate()

if t.TYPE_CHECKING:
    # Type checkers accept only a class statement as a base class, not the value of a
    # property such as db.Model; for them the models derive from this stand-in, which is
    # what db.Model is at run time: a DeclarativeBase (bound to db.metadata).
    class Model(orm.DeclarativeBase):
        """The models' base class, as type checkers see it."""

else:
    Model = db.Model
