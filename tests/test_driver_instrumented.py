"""Fast BEGIN under the tools people put on the drivers and SQLAlchemy: OpenTelemetry's psycopg2,
psycopg (3) and SQLAlchemy instrumentation, Sentry's SQLAlchemy integration, psycopg2's
LoggingConnection.

Outcomes stay those of the driver's own transaction handling (the differential cases run again
with the tools on), and what the tools record is the SQL the application wrote.

OpenTelemetry's driver instrumentation gives each connection a cursor class of its own (psycopg2:
``cursor_factory`` at connect; psycopg 3: ``Connection.cursor_factory``, a subclass of
``psycopg.Cursor`` that traces ``execute``): fast BEGIN steps aside there (``plain_cursor``), and
the driver sends its own BEGIN. SQLAlchemy's instrumentation alone leaves the cursor class as
it is: fast BEGIN engages under it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import typing as t
from collections.abc import Iterator

import psycopg
import psycopg.pq
import psycopg2.extras
import pytest
import sentry_sdk
import sqlalchemy as sa
from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
from opentelemetry.instrumentation.psycopg2 import Psycopg2Instrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sentry_sdk.integrations import sqlalchemy as sentry_sqlalchemy
from sentry_sdk.integrations.sqlalchemy import SqlalchemyIntegration
from sentry_sdk.transport import Transport

from flask_neon import driver

from . import parity
from .test_driver_parity import (  # noqa: F401 - the *_fixture function is a fixture
    DRIVERS,
    World,
    make_world,
    parity_database_fixture,
)

# The cases that go through SQLAlchemy's execution path, where fast BEGIN acts, and a few raw
# ones where a fast transaction is open when the application reaches for psycopg2.
CASES = [
    *parity.SQLALCHEMY,
    *(
        parity.inside_sqlalchemy(steps)
        for steps in parity.RAW
        if steps.__name__
        in {"insert_rollback", "named_cursor_client_error", "real_dict_cursor", "with_block_error"}
    ),
]
CASE_IDS = [case.__name__ for case in CASES]


@contextlib.contextmanager
def instrumented(*instrumentors: t.Any) -> Iterator[InMemorySpanExporter]:
    """``instrumentors`` on, exporting to memory; off again afterwards (left on, they would
    trace, and change the cursor class of, every later test)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        for instrumentor in instrumentors:
            instrumentor.instrument(tracer_provider=provider, skip_dep_check=True)
        yield exporter
    finally:
        for instrumentor in instrumentors:
            if instrumentor.is_instrumented_by_opentelemetry:
                instrumentor.uninstrument()


# Class-scoped: the instrumentation is on for the tests of TestUnderOpenTelemetry only.
@pytest.fixture(scope="class")
def spans() -> Iterator[InMemorySpanExporter]:
    """OpenTelemetry's psycopg2 and SQLAlchemy instrumentation, on for the module's engines."""
    with instrumented(Psycopg2Instrumentor(), SQLAlchemyInstrumentor()) as exporter:
        yield exporter


@pytest.fixture(scope="class")
def traced(parity_database: str, spans: InMemorySpanExporter) -> Iterator[World]:
    world = make_world(parity_database, parity_database, fast_expected=False)
    yield world
    world.plain.dispose()
    world.fast.dispose()


# -- Sentry -------------------------------------------------------------------------------------


class Collected(Transport):  # type: ignore[misc]
    """A Sentry transport that keeps the envelopes instead of sending them."""

    def __init__(self, options: t.Any = None) -> None:
        super().__init__(options)
        self.envelopes: list[t.Any] = []

    def capture_envelope(self, envelope: t.Any) -> None:
        self.envelopes.append(envelope)


SENTRY_EVENTS = ("before_cursor_execute", "after_cursor_execute", "handle_error")


@pytest.mark.parametrize("driver", DRIVERS)
def test_sentry_spans_and_breadcrumbs_show_the_sql_as_written(
    parity_database: str, driver: str
) -> None:
    transport = Collected()
    sentry_sdk.init(
        dsn="http://public@127.0.0.1:9/1",
        transport=transport,
        integrations=[SqlalchemyIntegration()],
        traces_sample_rate=1.0,
        default_integrations=False,
    )
    # The integration is set up once a process; the first test here took its listeners off
    # again (below): a second one puts them back.
    for name in SENTRY_EVENTS:
        listener = getattr(sentry_sqlalchemy, f"_{name}")
        if not sa.event.contains(sa.Engine, name, listener):
            sa.event.listen(sa.Engine, name, listener)
    world = make_world(parity_database, parity_database, driver=driver)
    try:
        parity.reset_database(world.url)
        with sentry_sdk.start_transaction(name="fast begin"):
            with world.fast.connect() as connection:
                connection.exec_driver_sql("INSERT INTO t VALUES (1, 'a')")
                connection.rollback()
            sentry_sdk.capture_message("after the statement")
        sentry_sdk.flush()
    finally:
        world.plain.dispose()
        world.fast.dispose()
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)
        # Its setup put listeners on every Engine of the process, never taken off: later
        # tests would run on SQLAlchemy's event path (and be traced).
        for name in SENTRY_EVENTS:
            listener = getattr(sentry_sqlalchemy, f"_{name}")
            if sa.event.contains(sa.Engine, name, listener):
                sa.event.remove(sa.Engine, name, listener)
    items = [
        item.payload.json
        for envelope in transport.envelopes
        for item in envelope.items
        if item.payload.json
    ]
    breadcrumbs = [
        crumb["message"]
        for item in items
        for crumb in (item.get("breadcrumbs") or {}).get("values", [])
        if crumb.get("category") == "query"
    ]
    descriptions = [span["description"] for item in items for span in item.get("spans", [])]
    assert "INSERT INTO t VALUES (1, 'a')" in breadcrumbs
    assert "INSERT INTO t VALUES (1, 'a')" in descriptions
    assert not [text for text in breadcrumbs + descriptions if text.startswith("BEGIN;")]
    assert parity.kept(world.url)["t"] == []


# -- psycopg2's LoggingConnection -----------------------------------------------------------------


def logging_engine(url: str, log: io.StringIO, *, fast: bool) -> sa.Engine:
    engine = sa.create_engine(
        url, connect_args={"connection_factory": psycopg2.extras.LoggingConnection}
    )

    # Before SQLAlchemy's own first queries on the connection.
    @sa.event.listens_for(engine, "connect", insert=True)
    def _initialize(dbapi_connection: t.Any, record: t.Any) -> None:
        dbapi_connection.initialize(log)

    if fast:
        driver.install(engine)
    return engine


@pytest.mark.psycopg2_only  # psycopg2's LoggingConnection
def test_logging_connection_logs_the_sql_as_written(parity_database: str) -> None:
    outcomes = []
    logs = []
    for fast in (False, True):
        log = io.StringIO()
        engine = logging_engine(parity_database, log, fast=fast)
        try:
            parity.reset_database(parity_database)
            with engine.connect() as connection:
                connection.exec_driver_sql("INSERT INTO t VALUES (1, 'a')")
                connection.rollback()
                connection.exec_driver_sql("INSERT INTO t VALUES (2, 'b')")
                connection.commit()
        finally:
            engine.dispose()
        outcomes.append(parity.kept(parity_database))
        logs.append([line for line in log.getvalue().splitlines() if "INSERT" in line])
    assert outcomes[0] == outcomes[1]
    assert outcomes[0]["t"] == [(2, "b")]
    assert logs[0] == logs[1] == ["INSERT INTO t VALUES (1, 'a')", "INSERT INTO t VALUES (2, 'b')"]


def test_sqlalchemy_echo_logs_the_sql_as_written(
    parity_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = sa.create_engine(parity_database, echo=True)
    driver.install(engine)
    try:
        with caplog.at_level(logging.INFO, "sqlalchemy.engine"), engine.connect() as connection:
            connection.exec_driver_sql("SELECT 42")
            raw = connection.connection.dbapi_connection
            if engine.dialect.driver == "psycopg2":
                assert raw.status == 2  # psycopg2's STATUS_BEGIN
            else:  # psycopg 3: opened fast (no idle-in-transaction timeout on a plain engine)
                assert raw.autocommit
                assert raw.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    finally:
        engine.dispose()
    messages = [record.getMessage() for record in caplog.records]
    assert "SELECT 42" in messages
    assert not [m for m in messages if "BEGIN;" in m]


class TestUnderOpenTelemetry:
    @pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
    def test_same_outcome(self, case: parity.Case, traced: World) -> None:
        expected = parity.outcome(case, traced.plain, traced.url)
        actual = parity.outcome(case, traced.fast, traced.url)
        assert actual == expected

    def test_spans_show_the_sql_as_written(
        self, traced: World, spans: InMemorySpanExporter
    ) -> None:
        parity.reset_database(traced.url)
        spans.clear()
        with traced.fast.connect() as connection:
            connection.exec_driver_sql("INSERT INTO t VALUES (1, 'a')")
            connection.rollback()
        statements = [span.attributes.get("db.statement") for span in spans.get_finished_spans()]
        assert "INSERT INTO t VALUES (1, 'a')" in statements
        assert not [s for s in statements if str(s).startswith("BEGIN;")]
        # Both tools recorded the statement: SQLAlchemy's span and psycopg2's cursor span.
        assert statements.count("INSERT INTO t VALUES (1, 'a')") == 2
        assert parity.kept(traced.url)["t"] == []

    def test_a_request_that_does_not_commit_leaves_nothing(
        self, traced: World, make_app: t.Any
    ) -> None:
        # The failure that opened the driver issue: with psycopg2 instrumented, db.session's
        # statements autocommitted, so neither rollback() nor the teardown undid anything.
        parity.reset_database(traced.url)
        app, db = make_app(traced.url)

        @app.post("/write")
        def write() -> str:
            db.session.execute(sa.text("INSERT INTO t VALUES (1, 'rolled back')"))
            db.session.rollback()
            db.session.execute(sa.text("INSERT INTO t VALUES (2, 'never committed')"))
            return "ok"

        assert app.test_client().post("/write").status_code == 200
        assert parity.kept(traced.url)["t"] == []


# -- psycopg 3 ----------------------------------------------------------------------------------

# The SQLAlchemy cases, and raw ones where a transaction is open when the application reaches for
# psycopg.
CASES3 = [
    *parity.SQLALCHEMY,
    *(
        parity.inside_sqlalchemy(steps)
        for steps in parity.RAW3
        if steps.__name__
        in {"client_cursor", "named_cursor_errors", "row_factories", "transaction_blocks"}
    ),
]
CASE3_IDS = [case.__name__ for case in CASES3]


@pytest.fixture(scope="class")
def spans3() -> Iterator[InMemorySpanExporter]:
    """OpenTelemetry's psycopg and SQLAlchemy instrumentation."""
    with instrumented(PsycopgInstrumentor(), SQLAlchemyInstrumentor()) as exporter:
        yield exporter


@pytest.fixture(scope="class")
def traced3(parity_database: str, spans3: InMemorySpanExporter) -> Iterator[World]:
    # psycopg's instrumentation gives the connections its cursor class: fast BEGIN steps aside.
    world = make_world(parity_database, parity_database, driver="psycopg", fast_expected=False)
    yield world
    world.plain.dispose()
    world.fast.dispose()


@pytest.fixture(scope="class")
def sqlalchemy_spans() -> Iterator[InMemorySpanExporter]:
    """OpenTelemetry's SQLAlchemy instrumentation alone."""
    with instrumented(SQLAlchemyInstrumentor()) as exporter:
        yield exporter


@pytest.fixture(scope="class")
def sqlalchemy_traced3(
    parity_database: str, sqlalchemy_spans: InMemorySpanExporter
) -> Iterator[World]:
    # The cursor class is psycopg's own: fast BEGIN engages.
    world = make_world(parity_database, parity_database, driver="psycopg")
    yield world
    world.plain.dispose()
    world.fast.dispose()


def statements_of(spans: InMemorySpanExporter, world: World) -> list[t.Any]:
    """What the spans recorded of a transaction that inserts one row, then rolls back."""
    parity.reset_database(world.url)
    spans.clear()
    with world.fast.connect() as connection:
        connection.exec_driver_sql("INSERT INTO t VALUES (1, 'a')")
        connection.rollback()
    assert parity.kept(world.url)["t"] == []
    return [span.attributes.get("db.statement") for span in spans.get_finished_spans()]


class TestPsycopgUnderOpenTelemetry:
    @pytest.mark.parametrize("case", CASES3, ids=CASE3_IDS)
    def test_same_outcome(self, case: parity.Case, traced3: World) -> None:
        expected = parity.outcome(case, traced3.plain, traced3.url)
        actual = parity.outcome(case, traced3.fast, traced3.url)
        assert actual == expected

    def test_fast_begin_steps_aside_for_the_traced_cursor_class(self, traced3: World) -> None:
        with traced3.fast.connect() as connection:
            cursor = connection.exec_driver_sql("SELECT 1").cursor
            raw = connection.connection.dbapi_connection
            assert type(cursor) is not psycopg.Cursor
            assert isinstance(cursor, psycopg.Cursor)
            assert type(cursor).__name__ == "TracedCursorFactory"
            assert raw.cursor_factory is type(cursor)
            assert not raw.autocommit  # psycopg sent its own BEGIN
            assert raw.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            connection.rollback()

    def test_spans_show_the_sql_as_written(
        self, traced3: World, spans3: InMemorySpanExporter
    ) -> None:
        statements = statements_of(spans3, traced3)
        # Both tools recorded the statement: SQLAlchemy's span and psycopg's cursor span; no
        # BEGIN of flask-neon's among them.
        assert statements.count("INSERT INTO t VALUES (1, 'a')") == 2
        assert not [s for s in statements if str(s).upper().startswith("BEGIN")]


class TestPsycopgUnderSQLAlchemyInstrumentation:
    @pytest.mark.parametrize("case", CASES3, ids=CASE3_IDS)
    def test_same_outcome(self, case: parity.Case, sqlalchemy_traced3: World) -> None:
        expected = parity.outcome(case, sqlalchemy_traced3.plain, sqlalchemy_traced3.url)
        actual = parity.outcome(case, sqlalchemy_traced3.fast, sqlalchemy_traced3.url)
        assert actual == expected

    def test_spans_show_the_sql_as_written(
        self, sqlalchemy_traced3: World, sqlalchemy_spans: InMemorySpanExporter
    ) -> None:
        statements = statements_of(sqlalchemy_spans, sqlalchemy_traced3)
        # SQLAlchemy's span of the statement (its connect span has none), as written.
        assert [s for s in statements if s is not None] == ["INSERT INTO t VALUES (1, 'a')"]
