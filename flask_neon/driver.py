"""Fast BEGIN for any SQLAlchemy engine on psycopg2 or psycopg 3: a transaction's ``BEGIN``
travels with its first statement, nothing else an application can observe changes (psycopg 3:
docs/fast-begin.md says what remains different).

flask-neon installs it on its own engines (``DB_FAST_BEGIN``, on by default); :func:`install`
puts it on another engine, or on every engine (the ``Engine`` class). The mechanism and its
proof: docs/fast-begin.md; the code: ``flask_neon._transactions`` and
``flask_neon._drivers``.
"""

from __future__ import annotations

import typing as t

import sqlalchemy as sa

from . import _drivers
from ._drivers import psycopg2 as _psycopg2
from ._transactions import TransactionOpener

#: True when fast BEGIN is possible on this interpreter (psycopg2's fields could be located and
#: checked); otherwise psycopg2 sends its ``BEGIN`` as always.
AVAILABLE = _psycopg2.FAST_BEGIN


def install(
    engine: sa.Engine | type[sa.Engine], begin_statements: t.Sequence[str] = ()
) -> TransactionOpener:
    """Open ``engine``'s transactions with their first statement; return the events' owner.

    ``engine`` may be the :class:`~sqlalchemy.engine.Engine` class itself: every psycopg2
    engine then. An engine on psycopg 3 (``postgresql+psycopg://``) gets psycopg 3's way.
    ``begin_statements``: statements run at the start of every transaction (e.g. ``SET LOCAL``
    limits). Steps aside (the driver sends its own ``BEGIN``) where the result would differ,
    and, on psycopg2, everywhere when :data:`AVAILABLE` is false.
    """
    module: _drivers.Driver = _psycopg2
    if isinstance(engine, sa.Engine):
        module = _drivers.for_dialect(engine.dialect) or module
    opener = TransactionOpener(module, begin_statements, fast=True)
    opener.install(engine)
    return opener
