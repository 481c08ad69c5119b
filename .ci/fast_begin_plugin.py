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

    assert driver.AVAILABLE, "fast BEGIN is not available on this interpreter"

    class Counting(driver.FastBegin):
        def execute(self, cursor: t.Any, *args: t.Any) -> bool:
            opened = super().execute(cursor, *args)
            _opened[0] += opened
            return opened

    fast = Counting()
    sa.event.listen(sa.engine.Engine, "do_execute", fast.execute)
    sa.event.listen(sa.engine.Engine, "do_execute_no_params", fast.execute_no_params)
    sa.event.listen(sa.engine.Engine, "do_executemany", fast.executemany)


def pytest_sessionfinish(session: t.Any) -> None:
    target = os.environ.get("FAST_BEGIN_COUNT_FILE")
    if target:
        pathlib.Path(target).write_text(str(_opened[0]))
