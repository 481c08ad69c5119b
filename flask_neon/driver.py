"""Fast BEGIN for any SQLAlchemy engine on psycopg2: a transaction's ``BEGIN`` travels with its
first statement, nothing else an application can observe changes.

flask-neon installs it on its own engines (``DB_FAST_BEGIN``, on by default); :func:`install`
puts it on another engine, or on every engine (the ``Engine`` class). The mechanism and its
proof: docs/fast-begin.md; the code: ``flask_neon._transactions`` and
``flask_neon._drivers.psycopg2``.
"""

from __future__ import annotations

import typing as t

import sqlalchemy as sa

from ._drivers import psycopg2 as _psycopg2
from ._transactions import TransactionOpener

#: True when fast BEGIN is possible on this interpreter (psycopg2's fields could be located and
#: checked); otherwise psycopg2 sends its ``BEGIN`` as always.
AVAILABLE = _psycopg2.FAST_BEGIN


def install(
    engine: sa.Engine | type[sa.Engine], begin_statements: t.Sequence[str] = ()
) -> TransactionOpener:
    """Open ``engine``'s transactions with their first statement; return the events' owner.

    ``engine`` may be the :class:`~sqlalchemy.engine.Engine` class itself: every engine then.
    ``begin_statements``: statements run at the start of every transaction (e.g. ``SET LOCAL``
    limits). Steps aside (psycopg2 sends its own ``BEGIN``) where
    the result would differ, and everywhere when :data:`AVAILABLE` is false.
    """
    opener = TransactionOpener(_psycopg2, begin_statements, fast=True)
    opener.install(engine)
    return opener
