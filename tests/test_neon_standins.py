"""flask-neon against stand-ins for what Neon runs: its pooler, TLS, read replicas, forked workers.

Neon puts PgBouncer in transaction mode behind every ``-pooler`` host, accepts TLS only, serves
read replicas that are hot standbys, and apps run in forking servers (gunicorn). Each section
below starts a local stand-in for one of these (see :mod:`tests.servers`) and shows that
flask-neon behaves there as it promises.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import importlib.util
import json
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import traceback
import typing as t
import uuid
import warnings
from collections.abc import Iterator

import flask_migrate  # type: ignore[import-untyped]
import psycopg2  # type: ignore[import-untyped]
import pytest
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from flask import Flask
from sqlalchemy.orm import Mapped, mapped_column

from flask_neon import DatabaseUnavailableError, NeonConfigError, NeonDB
from flask_neon._errors import classify
from flask_neon._probe import run_probe
from flask_neon._url import parse_url
from flask_neon.local import LocalPostgres

from .conftest import AppFactory, admin_execute, with_driver
from .servers import (  # noqa: F401 - the *_fixture functions are fixtures, used by name
    PgBouncer,
    Replica,
    TLSCluster,
    closed_port,
    pgbouncer_fixture,
    replica_fixture,
    tls_cluster_fixture,
    wait_until,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture
def apps(make_app: AppFactory) -> Iterator[AppFactory]:
    """``make_app``, disposing every engine (primary, admin, read) of the apps it built."""
    built: list[tuple[Flask, NeonDB]] = []

    def factory(url: str | None = None, **config: t.Any) -> tuple[Flask, NeonDB]:
        app, db = make_app(url, **config)
        built.append((app, db))
        return app, db

    yield factory
    for app, db in built:
        dispose(app, db)


def dispose(app: Flask, db: NeonDB) -> None:
    state = db.state(app)
    for bundle in {id(e): e for e in (state.primary, state.admin, state.read) if e}.values():
        bundle.engine.dispose()


def scalar(db: NeonDB, app: Flask, sql: str, *, read: bool = False) -> t.Any:
    """Run ``sql`` in a fresh app context through ``db.session`` (or ``db.read_session``)."""
    with app.app_context():
        session = db.read_session if read else db.session
        return session.execute(sa.text(sql)).scalar()


def database_name(url: str) -> str:
    return parse_url(url).database


def dsn(url: str) -> str:
    """A libpq connection string for psycopg2 from a SQLAlchemy URL."""
    return parse_url(url).to_sqlalchemy().set(drivername="postgresql").render_as_string(False)


def session_error(db: NeonDB, app: Flask, sql: str = "SELECT 1") -> BaseException:
    """The exception ``sql`` raises through ``db.session`` (the test fails if none)."""
    with app.app_context(), pytest.raises(sa_exc.DBAPIError) as info:
        db.session.execute(sa.text(sql))
    return info.value


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo what Flask-Migrate's ``env.py`` (``logging.config.fileConfig``) does to logging.

    It disables every logger it does not name, sets the root level and adds a handler; left
    alone that leaks into later tests that read logs.
    """
    root = logging.getLogger()
    root_level, root_handlers = root.level, list(root.handlers)
    loggers = {
        name: (logger.disabled, logger.level, logger.propagate, list(logger.handlers))
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    yield
    root.setLevel(root_level)
    root.handlers[:] = root_handlers
    for name, logger in logging.Logger.manager.loggerDict.items():
        if not isinstance(logger, logging.Logger):
            continue
        disabled, level, propagate, handlers = loggers.get(name, (False, 0, True, []))
        logger.disabled, logger.propagate = disabled, propagate
        logger.setLevel(level)
        logger.handlers[:] = handlers


# -- PgBouncer in transaction mode (Neon's -pooler host) ----------------------------------------


def pooled_app(
    apps: AppFactory, bouncer: PgBouncer, direct_url: str, **config: t.Any
) -> tuple[Flask, NeonDB]:
    """An app whose DB_URL goes through PgBouncer, with DB_DIRECT_URL on the server itself."""
    return apps(
        bouncer.url_for(database_name(direct_url)),
        DB_POOLED=True,
        DB_DIRECT_URL=direct_url,
        **config,
    )


@pytest.mark.slow
def test_requests_go_through_the_pooler_in_transaction_mode(
    apps: AppFactory, pgbouncer: PgBouncer, fresh_database: str
) -> None:
    """Requests on ``db.session`` are PgBouncer transactions, with per-transaction limits."""
    app, db = pooled_app(apps, pgbouncer, fresh_database)
    name = database_name(fresh_database)

    @app.get("/one")
    def one() -> dict[str, t.Any]:
        return {"one": db.session.execute(sa.text("SELECT 1")).scalar()}

    state = db.state(app)
    assert state.pooled
    assert state.session_limits["mode"] == "transaction"
    assert state.admin is not state.primary
    assert state.admin.url.port == parse_url(fresh_database).port

    before = pgbouncer.xact_count(name)
    client = app.test_client()
    for _ in range(5):
        response = client.get("/one")
        assert response.status_code == 200
        assert response.json == {"one": 1}
    wait_until(lambda: pgbouncer.xact_count(name) >= before + 5, message="5 pooler transactions")


@pytest.mark.slow
def test_statement_timeout_works_through_the_pooler(
    apps: AppFactory, pgbouncer: PgBouncer, fresh_database: str
) -> None:
    """SET LOCAL carries DB_STATEMENT_TIMEOUT through PgBouncer; the next request is fine."""
    app, db = pooled_app(apps, pgbouncer, fresh_database, DB_STATEMENT_TIMEOUT=0.2)
    started = time.monotonic()
    error = session_error(db, app, "SELECT pg_sleep(5)")
    assert classify(error).name == "statement_timeout"
    assert time.monotonic() - started < 4
    assert scalar(db, app, "SELECT 1") == 1


@pytest.mark.slow
def test_limits_do_not_leak_to_the_next_client_of_the_server_connection(
    apps: AppFactory, pgbouncer: PgBouncer, fresh_database: str
) -> None:
    """The server connection an app used goes back to PgBouncer without the app's limits.

    PgBouncer reuses server connections last-in first-out, so the next client gets the very
    backend the app used: it must see the server default, not the app's statement_timeout.
    """
    app, db = pooled_app(apps, pgbouncer, fresh_database, DB_STATEMENT_TIMEOUT=7)
    with app.app_context():
        pid, inside = db.session.execute(
            sa.text("SELECT pg_backend_pid(), current_setting('statement_timeout')")
        ).one()
    assert inside == "7s"

    connection = psycopg2.connect(dsn(pgbouncer.url_for(database_name(fresh_database))))
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid(), current_setting('statement_timeout')")
            assert cursor.fetchone() == (pid, "0")
    finally:
        connection.close()


@pytest.mark.slow
def test_startup_limits_are_rejected_by_the_pooler(
    apps: AppFactory, pgbouncer: PgBouncer, fresh_database: str
) -> None:
    """Why "transaction" is the default through a pooler: PgBouncer refuses startup options."""
    with pytest.raises(DatabaseUnavailableError) as info:
        pooled_app(
            apps,
            pgbouncer,
            fresh_database,
            DB_SESSION_LIMITS="startup",
            DB_CONNECT_ON_START=True,
        )
    cause = info.value.cause
    assert cause.name == "pooler_rejected_parameter"
    assert "unsupported startup parameter: options" in cause.detail


def read_twice_across_server_connections(engine: sa.Engine, bouncer: PgBouncer) -> list[int]:
    """The same parameterized read in two transactions of one client, the pooler's server
    connections replaced in between (PgBouncer's RECONNECT): as when it lends another one."""
    seen = []
    with engine.connect() as connection:
        for n in range(2):
            seen.append(connection.execute(sa.text("SELECT :n + 1"), {"n": n}).scalar_one())
            connection.commit()
            bouncer.admin(f"RECONNECT {database_name(str(engine.url))}")
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("prepare_threshold", ["default", 0])
def test_psycopg_prepares_nothing_by_default_through_the_pooler(
    apps: AppFactory, pgbouncer: PgBouncer, fresh_database: str, prepare_threshold: str | int
) -> None:
    """psycopg 3's prepared-statement policy (docs/drivers.md): no server-side prepared
    statements unless DB_ENGINE_OPTIONS' connect_args ask for them. Through a transaction-mode
    PgBouncer older than 1.22 a statement prepared in one transaction is gone in the next, on
    another server connection."""
    options = (
        {}
        if prepare_threshold == "default"
        else {"DB_ENGINE_OPTIONS": {"connect_args": {"prepare_threshold": prepare_threshold}}}
    )
    pooler_url = pgbouncer.url_for(database_name(fresh_database))
    direct = with_driver(fresh_database, "psycopg")
    app, db = apps(
        with_driver(pooler_url, "psycopg"), DB_POOLED=True, DB_DIRECT_URL=direct, **options
    )
    engine = db.state(app).primary.engine  # through the pooler (get_engine(): the direct host)
    if prepare_threshold == "default":
        assert read_twice_across_server_connections(engine, pgbouncer) == [1, 2]
    else:
        with pytest.raises(sa_exc.DBAPIError, match=r"prepared statement .* does not exist"):
            read_twice_across_server_connections(engine, pgbouncer)
    dispose(app, db)


MIGRATION = '''\
"""create widgets, needing session state across a commit"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "widgets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=80), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_widgets")),
    )
    # Session state: survives the commit below on a direct connection only. Behind a
    # transaction-mode pooler the next transaction may run on another server connection.
    op.execute("SET lock_timeout = '5s'")
    with op.get_context().autocommit_block():
        op.execute(
            "DO $$ BEGIN IF current_setting('lock_timeout') <> '5s' THEN "
            "RAISE EXCEPTION 'session state lost'; END IF; END $$"
        )


def downgrade() -> None:
    op.drop_table("widgets")
'''


@pytest.mark.slow
@pytest.mark.usefixtures("restore_logging")
def test_migrations_run_on_the_direct_host(
    pgbouncer: PgBouncer, fresh_database: str, tmp_path: pathlib.Path
) -> None:
    """``flask db upgrade`` (Flask-Migrate's stock env.py) bypasses the pooler entirely.

    The migration keeps session state across a commit, which only a direct connection
    guarantees; PgBouncer counts no transaction for the database while it runs, and counts
    the app's own queries right after.
    """
    name = database_name(fresh_database)
    db = NeonDB(env_file=None)

    class Widget(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "widgets"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(sa.String(80))

    app = Flask("pooled_project")
    app.config.update(DB_URL=pgbouncer.url_for(name), DB_POOLED=True, DB_DIRECT_URL=fresh_database)
    db.init_app(app)
    directory = tmp_path / "migrations"
    flask_migrate.Migrate(app, db, directory=str(directory))
    try:
        with app.app_context():
            flask_migrate.init(str(directory))
            (directory / "versions" / "0001_create_widgets.py").write_text(MIGRATION)
            before = pgbouncer.xact_count(name)
            flask_migrate.upgrade(str(directory))
            assert pgbouncer.xact_count(name) == before
        assert admin_execute(fresh_database, "SELECT version_num FROM alembic_version") == [
            ("0001",)
        ]
        assert admin_execute(fresh_database, "SELECT to_regclass('widgets')::text") == [
            ("widgets",)
        ]
        # The counter is live: the app's own session goes through the pooler.
        with app.app_context():
            assert db.session.scalar(sa.select(sa.func.count()).select_from(Widget)) == 0
        wait_until(lambda: pgbouncer.xact_count(name) > before, message="a pooler transaction")
    finally:
        dispose(app, db)


@pytest.mark.slow
def test_db_check_reports_the_pooled_host_and_checks_the_direct_one(
    apps: AppFactory, pgbouncer: PgBouncer, fresh_database: str
) -> None:
    """``flask db-check --json`` says "pooled" and probes the direct host, not the pooler."""
    from flask_neon import _cli as cli

    command = getattr(cli, "db_check", None)
    if command is None or "as_json" not in {param.name for param in command.params}:
        pytest.skip("flask db-check --json is not finished yet (flask_neon/cli.py)")
    app, _ = pooled_app(apps, pgbouncer, fresh_database)
    name = database_name(fresh_database)
    before = pgbouncer.xact_count(name)
    result = app.test_cli_runner().invoke(args=["db-check", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["reachable"] is True
    assert report["host_kind"] == "pooled"
    assert report["database"] == name
    assert f":{parse_url(fresh_database).port}/" in report["checked_url"]
    assert f":{pgbouncer.port}/" in report["url"]
    assert report["session_limits"]["mode"] == "transaction"
    assert pgbouncer.xact_count(name) == before


# -- TLS -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_verify_full_with_the_right_ca(apps: AppFactory, tls_cluster: TLSCluster) -> None:
    """verify-full against a certificate for ``localhost`` works, and the probe reports TLS."""
    app, db = apps(tls_cluster.url(sslmode="verify-full", sslrootcert=str(tls_cluster.ca)))
    assert scalar(db, app, "SELECT 1") == 1
    probe = run_probe(db.state(app).engine, [])
    assert probe.healthy, probe.cause
    assert probe.tls is True
    assert probe.tls_version is not None
    assert re.fullmatch(r"TLSv1\.[23]", probe.tls_version)
    assert probe.tls_cipher


@pytest.mark.slow
@pytest.mark.parametrize(
    ("host", "ca"),
    [("localhost", "wrong_ca"), ("127.0.0.1", "ca")],
    ids=["unrelated-ca", "host-name-mismatch"],
)
def test_certificate_that_does_not_verify(
    apps: AppFactory, tls_cluster: TLSCluster, host: str, ca: str
) -> None:
    """A certificate from another CA, or for another host name, is cert_verify_failed."""
    root = str(getattr(tls_cluster, ca))
    app, db = apps(tls_cluster.url(host, sslmode="verify-full", sslrootcert=root))
    assert classify(session_error(db, app)).name == "cert_verify_failed"


@pytest.mark.slow
def test_plaintext_to_a_tls_only_server_is_tls_required(
    apps: AppFactory, tls_cluster: TLSCluster
) -> None:
    """A server that rejects plaintext (as Neon does) is reported as tls_required."""
    app, db = apps(tls_cluster.url(sslmode="disable"))
    assert classify(session_error(db, app)).name == "tls_required"


def test_sslmode_require_on_a_server_without_tls(
    apps: AppFactory, local_pg: LocalPostgres | None
) -> None:
    """sslmode=require against a server without TLS is tls_required."""
    if local_pg is None:
        pytest.skip("needs the suite's own cluster (without TLS)")
    app, db = apps(local_pg.url + "?sslmode=require")
    assert classify(session_error(db, app)).name == "tls_required"


def test_missing_sslrootcert_is_a_config_error(apps: AppFactory) -> None:
    """A CA file that does not exist fails at init, naming DB_URL; "system" is accepted."""
    with pytest.raises(NeonConfigError, match=r"DB_URL.*sslrootcert='/no/such/file'"):
        apps("postgresql://app@localhost/app?sslmode=verify-full&sslrootcert=/no/such/file")
    app, db = apps("postgresql://app@db.example.com/app?sslmode=verify-full&sslrootcert=system")
    assert db.state(app).url.query_dict["sslrootcert"] == "system"


def test_production_tls_policy(apps: AppFactory) -> None:
    """In production a remote host that may fall back to plaintext is refused at init.

    DB_REQUIRE_TLS=false lets it through, and a Neon host without sslmode gets require.
    None of this connects.
    """
    remote = "postgresql://app:secret@db.example.com/app?sslmode=prefer"
    with pytest.raises(NeonConfigError, match=r"DB_URL.*db\.example\.com") as info:
        apps(remote)
    assert "secret" not in str(info.value)

    app, db = apps(remote, DB_REQUIRE_TLS=False)
    assert db.state(app).pool.profile == "production"
    assert db.state(app).url.sslmode == "prefer"

    app, db = apps("postgresql://app:pw@ep-x-123.us-east-2.aws.neon.tech/neondb")
    assert db.state(app).url.sslmode == "require"


# -- read replica (a hot standby) ----------------------------------------------------------------


@pytest.fixture
def replica_table(replica: Replica) -> Iterator[str]:
    """A new table on the primary (and so, soon, on the standby)."""
    name = f"items_{uuid.uuid4().hex[:8]}"
    replica.primary.execute(f"CREATE TABLE {name} (id serial PRIMARY KEY, label text)")
    # Replication is asynchronous: wait (bounded) until the standby has replayed it.
    wait_until(
        lambda: replica.standby.execute("SELECT to_regclass(%s)", params=(name,)) != [(None,)],
        timeout=15,
        message="the table on the standby",
    )
    yield name
    replica.primary.execute(f"DROP TABLE {name}")


@pytest.mark.slow
def test_committed_row_reaches_the_read_session_on_the_standby(
    apps: AppFactory, replica: Replica, replica_table: str
) -> None:
    """A row committed on ``db.session`` shows up on ``db.read_session``, which is the standby."""
    app, db = apps(replica.primary.url, DB_READ_URL=replica.standby.url)
    label = uuid.uuid4().hex
    with app.app_context():
        db.session.execute(
            sa.text(f"INSERT INTO {replica_table} (label) VALUES (:label)"), {"label": label}
        )
        db.session.commit()
    count = f"SELECT count(*) FROM {replica_table} WHERE label = '{label}'"

    # Replication is asynchronous: poll, bounded.
    wait_until(
        lambda: scalar(db, app, count, read=True) == 1,
        timeout=15,
        message="the row on the standby",
    )
    assert scalar(db, app, "SELECT pg_is_in_recovery()", read=True) is True
    assert scalar(db, app, "SELECT pg_is_in_recovery()") is False
    assert scalar(db, app, "SHOW port", read=True) == str(replica.standby.port)


@pytest.mark.slow
def test_write_through_the_read_session_is_read_only(
    apps: AppFactory, replica: Replica, replica_table: str
) -> None:
    """A write on the replica's session fails with the read_only cause."""
    app, db = apps(replica.primary.url, DB_READ_URL=replica.standby.url)
    with app.app_context(), pytest.raises(sa_exc.DBAPIError) as info:
        db.read_session.execute(sa.text(f"INSERT INTO {replica_table} (label) VALUES ('x')"))
    assert classify(info.value).name == "read_only", info.value


def test_read_session_without_replica_reads_the_primary_read_only(
    apps: AppFactory, fresh_database: str
) -> None:
    """Without DB_READ_URL, db.read_session reads the primary (own writes at once) read-only."""
    admin_execute(fresh_database, "CREATE TABLE items (label text)")
    app, db = apps(fresh_database)
    with app.app_context():
        db.session.execute(sa.text("INSERT INTO items VALUES ('mine')"))
        db.session.commit()
        assert db.read_session.execute(sa.text("SELECT label FROM items")).scalar() == "mine"
        assert db.read_session.execute(sa.text("SELECT pg_is_in_recovery()")).scalar() is False
    with app.app_context(), pytest.raises(sa_exc.DBAPIError) as info:
        db.read_session.execute(sa.text("INSERT INTO items VALUES ('nope')"))
    assert classify(info.value).name == "read_only", info.value
    assert admin_execute(fresh_database, "SELECT count(*) FROM items") == [(1,)]


def test_read_url_equal_to_the_primary_is_a_config_error(
    apps: AppFactory, database_url: str
) -> None:
    """DB_READ_URL naming the primary itself is a mistake caught at init."""
    with pytest.raises(NeonConfigError, match="DB_READ_URL"):
        apps(database_url, DB_READ_URL=database_url)


# -- fork safety ---------------------------------------------------------------------------------


def fork() -> int:
    """``os.fork()``; Python 3.12+ warns when other threads exist (pytest may hold some)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*fork\(\) may lead to deadlocks", DeprecationWarning)
        return os.fork()


def wait_for_child(pid: int, timeout: float = 30.0) -> int:
    """The exit code of child ``pid``; it is killed and the test fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not exit within {timeout:g} s")
        time.sleep(0.02)


def test_forked_child_opens_its_own_connection(apps: AppFactory, database_url: str) -> None:
    """A forked child never uses nor closes the connections its parent's pool holds."""
    app, db = apps(database_url)
    parent_backend = scalar(db, app, "SELECT pg_backend_pid()")
    assert db.pool_stats(app)["checked_in"] == 1

    child = fork()
    if child == 0:
        code = 1
        try:
            child_backend = scalar(db, app, "SELECT pg_backend_pid()")
            code = 0 if child_backend != parent_backend else 3
        except BaseException:
            traceback.print_exc()
            code = 2
        finally:
            os._exit(code)

    assert wait_for_child(child) == 0, "the child failed (2) or used the parent's backend (3)"
    # The parent's pooled connection is intact: the same backend answers.
    assert scalar(db, app, "SELECT pg_backend_pid()") == parent_backend


def request(port: int, method: str, path: str, body: t.Any = None) -> tuple[int, t.Any]:
    """One HTTP request to 127.0.0.1 (no proxy); returns the status and the decoded JSON."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        payload = json.dumps(body) if body is not None else None
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        connection.close()


@pytest.mark.slow
def test_gunicorn_preload_workers_share_no_connection(
    fresh_database: str, tmp_path: pathlib.Path
) -> None:
    """gunicorn --preload forks 2 workers from a master that already holds a pooled connection.

    ``DB_CONNECT_ON_START`` makes ``create_app()`` connect in the master; each worker must
    open its own connections, or concurrent requests would interleave on one socket.
    """
    if importlib.util.find_spec("gunicorn") is None:
        pytest.skip("gunicorn is not installed")
    import example_app.models  # noqa: F401 - registers the notes table
    from example_app.extensions import db as example_db

    engine = sa.create_engine(parse_url(fresh_database).to_sqlalchemy())
    try:
        example_db.metadata.create_all(engine)
    finally:
        engine.dispose()

    port = closed_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "FLASK_"))}
    env |= {
        "DB_URL": fresh_database,
        "DB_CONNECT_ON_START": "true",
        "PYTHONPATH": str(REPO_ROOT),
    }
    command = [
        sys.executable, "-m", "gunicorn", "--preload", "--workers", "2",
        "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "5",
        "example_app:create_app()",
    ]  # fmt: skip
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    try:

        def ready() -> bool:
            if server.poll() is not None:
                raise AssertionError(f"gunicorn exited:\n{log_path.read_text()}")
            with contextlib.suppress(OSError):
                return request(port, "GET", "/health/live")[0] == 200
            return False

        wait_until(ready, timeout=30, message="gunicorn answering")

        def call(i: int) -> int:
            if i % 2:
                return request(port, "GET", "/notes")[0]
            return request(port, "POST", "/notes", {"title": f"note {i}"})[0]

        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            statuses = list(pool.map(call, range(40)))
        assert all(status in (200, 201) for status in statuses), statuses
        assert statuses.count(201) == 20
        assert request(port, "GET", "/notes?limit=100")[1]["total"] == 20
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
    assert server.returncode == 0, log_path.read_text()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()
