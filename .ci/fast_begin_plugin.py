"""pytest plugin: every SQLAlchemy engine of the run opens its transactions with fast BEGIN.

Used by ``.ci/foreign_suites.py`` to run SQLAlchemy's own tests on flask-neon's driver. It
writes how many transactions fast BEGIN opened to ``$FAST_BEGIN_COUNT_FILE``, so that a run in
which it never engaged cannot pass for a run in which it did.
"""

from __future__ import annotations

import os
import pathlib
import typing as t

_opened: list[int] = [0]


def pytest_sessionstart(session: t.Any) -> None:
    # After the suite's conftest has set up SQLAlchemy's testing plugin.
    import sqlalchemy as sa

    from flask_neon import driver
    from flask_neon._drivers import psycopg2
    from flask_neon._transactions import TransactionOpener

    assert driver.AVAILABLE, "fast BEGIN is not available on this interpreter"

    class Counting(TransactionOpener):
        def execute(self, cursor: t.Any, *args: t.Any) -> bool:
            opened = super().execute(cursor, *args)
            _opened[0] += opened
            return opened

        def execute_no_params(self, cursor: t.Any, *args: t.Any) -> bool:
            opened = super().execute_no_params(cursor, *args)
            _opened[0] += opened
            return opened

    Counting(psycopg2).install(sa.engine.Engine)


def pytest_sessionfinish(session: t.Any) -> None:
    target = os.environ.get("FAST_BEGIN_COUNT_FILE")
    if target:
        pathlib.Path(target).write_text(str(_opened[0]))
