"""pytest plugin: every SQLAlchemy engine of the run opens its transactions with fast BEGIN.

Used by ``.ci/foreign_suites.py`` to run SQLAlchemy's own tests on flask-neon's driver modules:
``$FAST_BEGIN_DRIVER`` names the driver (``psycopg2``, the default, or ``psycopg``). It writes
how many transactions fast BEGIN opened to ``$FAST_BEGIN_COUNT_FILE``, so that a run in which it
never engaged cannot pass for a run in which it did.

psycopg 3 keeps no count of transactions: flask-neon is told of each commit and rollback
through the engine's dialect, which the plugin wraps for every dialect of the driver when it
first connects (SQLAlchemy's ``do_connect`` event, which puts nothing on the statements' path).
"""

from __future__ import annotations

import os
import pathlib
import typing as t
import weakref

_opened: list[int] = [0]


def pytest_sessionstart(session: t.Any) -> None:
    # After the suite's conftest has set up SQLAlchemy's testing plugin.
    import importlib

    import sqlalchemy as sa

    from flask_neon._transactions import TransactionOpener

    name = os.environ.get("FAST_BEGIN_DRIVER", "psycopg2")
    driver = importlib.import_module(f"flask_neon._drivers.{name}")
    assert driver.FAST_BEGIN, f"fast BEGIN is not available for {name} on this interpreter"

    def count(cursor: t.Any, opened: bool) -> None:
        # psycopg 3's module may open a transaction its own way within execute_first (an
        # idle-in-transaction timeout in force): counted only when fast BEGIN switched it.
        if opened and (driver.COUNTS_TRANSACTIONS or cursor.connection in driver._switched):
            _opened[0] += 1

    class Counting(TransactionOpener):
        def execute(self, cursor: t.Any, *args: t.Any) -> bool:
            opened = super().execute(cursor, *args)
            count(cursor, opened)
            return opened

        def execute_no_params(self, cursor: t.Any, *args: t.Any) -> bool:
            opened = super().execute_no_params(cursor, *args)
            count(cursor, opened)
            return opened

    opener = Counting(t.cast(t.Any, driver))
    opener.install(sa.engine.Engine)
    if driver.COUNTS_TRANSACTIONS:
        return
    watched: weakref.WeakSet[t.Any] = weakref.WeakSet()

    def watch(dialect: t.Any, record: t.Any, cargs: t.Any, cparams: t.Any) -> None:
        if dialect.driver == driver.name and dialect not in watched:
            watched.add(dialect)
            opener._watch_ends(dialect)

    sa.event.listen(sa.engine.Engine, "do_connect", watch)


def pytest_sessionfinish(session: t.Any) -> None:
    target = os.environ.get("FAST_BEGIN_COUNT_FILE")
    if target:
        pathlib.Path(target).write_text(str(_opened[0]))
