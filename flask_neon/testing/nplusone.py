"""Round trips in tests: ``db_round_trips`` and the ``no_nplusone`` marker."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import typing as t
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy import event

from .. import _nplusone, _transactions
from .._statements import first_word
from .schema import _neon_state

__all__ = ["RoundTrips", "db_round_trips", "neon_forbid_nplusone", "round_trips"]


@dataclasses.dataclass
class RoundTrips:
    """The round trips a block cost: each statement sent (each waits for its reply), each
    ``BEGIN`` sent on its own (where fast BEGIN steps aside or is off) and each ``COMMIT``.

    The ``ROLLBACK`` that ends a request is not counted: flask-neon sends a read's after the
    response, without waiting, under a WSGI server (Flask's test client waits for it). Nor are
    savepoints (``SAVEPOINT``, ``RELEASE``, ``ROLLBACK TO``): under ``neon_transaction`` they
    stand in for a request's ``BEGIN`` and ``ROLLBACK``; they are listed apart.
    """

    statements: list[str] = dataclasses.field(default_factory=list)
    savepoints: list[str] = dataclasses.field(default_factory=list)
    begins: int = 0
    commits: int = 0

    @property
    def count(self) -> int:
        return len(self.statements) + self.begins + self.commits

    def describe(self) -> str:
        """The statements by shape, most repeated first, without their parameters."""
        shapes: dict[str, int] = {}
        for statement in self.statements:
            shape = " ".join(statement.split())
            shapes[shape] = shapes.get(shape, 0) + 1
        lines = [f"{n} x {shape}" for shape, n in sorted(shapes.items(), key=lambda i: -i[1])]
        lines += [f"{self.begins} x BEGIN (sent on its own)"] if self.begins else []
        lines += [f"{self.commits} x COMMIT"] if self.commits else []
        if self.savepoints:
            lines.append(f"(and {len(self.savepoints)} savepoint statements, not counted)")
        return "\n".join(lines)


_lock = threading.Lock()


def _savepoint(statement: str) -> bool:
    """``SAVEPOINT``, ``RELEASE [SAVEPOINT]`` or ``ROLLBACK TO [SAVEPOINT]``."""
    word = first_word(statement)
    if word == "ROLLBACK":
        return " TO " in f" {' '.join(statement.upper().split())} "
    return word in ("SAVEPOINT", "RELEASE")


@contextlib.contextmanager
def round_trips(max: int | None = None) -> Iterator[RoundTrips]:
    """Count the round trips to the database inside the block, in any thread, on every
    flask-neon engine; with ``max``, fail (``AssertionError``) when there were more.

    Example::

        with round_trips(max=2):
            client.get("/posts")
    """
    counted = RoundTrips()

    def count(statement: str | None) -> None:
        with _lock:
            if statement is None:
                counted.begins += 1
            elif _savepoint(statement):
                counted.savepoints.append(statement)
            else:
                counted.statements.append(statement)

    def committed(connection: sa.Connection) -> None:
        with _lock:
            counted.commits += 1

    _transactions.counters.append(count)
    event.listen(sa.Engine, "commit", committed)
    try:
        yield counted
    finally:
        _transactions.counters.remove(count)
        event.remove(sa.Engine, "commit", committed)
    if max is not None and counted.count > max:
        raise AssertionError(
            f"{counted.count} round trips to the database, more than {max}:\n{counted.describe()}"
        )


@pytest.fixture
def db_round_trips() -> Callable[..., t.ContextManager[RoundTrips]]:
    """:func:`round_trips`, as a fixture: ``with db_round_trips(max=2): client.get("/")``."""
    return round_trips


@pytest.fixture
def neon_forbid_nplusone(neon_app: Flask) -> Iterator[None]:
    """Make an N+1 found in ``neon_app`` fail the test (``NPlusOneError``), whatever
    ``DB_NPLUSONE`` says: what the ``no_nplusone`` marker asks for."""
    state = _neon_state(neon_app)
    detector: _nplusone.Detector | None = state.nplusone
    if detector is None:
        settings = state.settings
        detector = _nplusone.Detector(
            state.app_name, "raise", settings.nplusone_threshold, settings.statement_budget
        )
        engines = {state.engine, state.admin.engine}
        _nplusone.install(engines, detector)
        state.nplusone = detector
        try:
            yield
        finally:
            state.nplusone = None
            for engine in engines:
                _transactions.observe(engine, None)
        return
    mode, detector.mode = detector.mode, "raise"
    try:
        yield
    finally:
        detector.mode = mode


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "no_nplusone: fail the test when flask-neon finds an N+1 in neon_app"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("no_nplusone") is not None:
            fixtures: list[str] = getattr(item, "fixturenames", [])
            if "neon_forbid_nplusone" not in fixtures:
                fixtures.insert(0, "neon_forbid_nplusone")
