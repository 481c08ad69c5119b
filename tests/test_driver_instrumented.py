"""Fast BEGIN under the tools people put on psycopg2 and SQLAlchemy: OpenTelemetry's psycopg2
and SQLAlchemy instrumentation, Sentry's SQLAlchemy integration, psycopg2's LoggingConnection.

Outcomes stay those of psycopg2's own transaction handling (the differential cases run again
with the tools on), and what the tools record is the SQL the application wrote.
"""

from __future__ import annotations

import io
import logging
import typing as t
from collections.abc import Iterator

import psycopg2.extras
import pytest
import sentry_sdk
import sqlalchemy as sa
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


# Class-scoped: the instrumentation is on for the tests of TestUnderOpenTelemetry only.
@pytest.fixture(scope="class")
def spans() -> Iterator[InMemorySpanExporter]:
    """OpenTelemetry's psycopg2 and SQLAlchemy instrumentation, on for the module's engines."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentors = [Psycopg2Instrumentor(), SQLAlchemyInstrumentor()]
    try:
        for instrumentor in instrumentors:
            instrumentor.instrument(tracer_provider=provider, skip_dep_check=True)
        yield exporter
    finally:
        # Left on, they would trace (and change the cursor class of) every later test.
        for instrumentor in instrumentors:
            if instrumentor.is_instrumented_by_opentelemetry:
                instrumentor.uninstrument()


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


def test_sentry_spans_and_breadcrumbs_show_the_sql_as_written(
    parity_database: str,
) -> None:
    transport = Collected()
    sentry_sdk.init(
        dsn="http://public@127.0.0.1:9/1",
        transport=transport,
        integrations=[SqlalchemyIntegration()],
        traces_sample_rate=1.0,
        default_integrations=False,
    )
    world = make_world(parity_database, parity_database)
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
        for name in ("before_cursor_execute", "after_cursor_execute", "handle_error"):
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
            assert connection.connection.dbapi_connection.status == 2  # psycopg2's STATUS_BEGIN
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
