"""Row-level security fails closed on every path: hostile values reach the server exactly as
given, a failure to apply the context never lets a later statement run without it, and a
transaction begun under one context never serves another.

Each test runs with fast BEGIN on and off, directly and through PgBouncer in transaction mode,
as a login role that neither owns the table nor is a superuser (so the policy applies), and on
each path by which a transaction can begin: fast BEGIN's single message, and the paths where it
steps aside (executemany, a named cursor, text with ``;``, another cursor class, another
``do_execute`` listener).
"""

from __future__ import annotations

import typing as t
import uuid
from collections.abc import Callable, Iterator

import psycopg
import psycopg2.extras
import pytest
import sqlalchemy as sa
from flask import Flask, request

from flask_neon import DatabaseContext, NeonConfigError, NeonDB, NeonStateError
from flask_neon._transactions import switch_contexts

from .conftest import admin_execute
from .servers import PgBouncer, pgbouncer_fixture  # noqa: F401 - a fixture, used by name

LOGIN = "flask_neon_rls"  # PgBouncer's user list (tests/servers.py) knows it
NARROW = "flask_neon_rls_paths_narrow"
#: Tenant names an application might be handed, each with a decoy: the name a second round of
#: %-formatting, a lost quote or a cut value would turn it into.
HOSTILE = {
    "A%%": "A%",
    "%s": "%",
    "50% off": "50",
    "O'Brien": "O",
    "x'; SET ROLE postgres; --": "x",
    "a;b": "a",
    "租户 ü \\ \\x": "租户",
    "long": "l" * 10_000,
    "backslash\\": "backslash",
}
SCHEMA = f"""
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{LOGIN}') THEN
    CREATE ROLE {LOGIN} LOGIN;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{NARROW}') THEN
    CREATE ROLE {NARROW} NOLOGIN;
  END IF;
END $$;
GRANT {NARROW} TO {LOGIN};
CREATE TABLE rows (id serial PRIMARY KEY, tenant text NOT NULL, body text NOT NULL);
ALTER TABLE rows ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON rows
  USING (tenant = nullif(current_setting('app.tenant', true), ''))
  WITH CHECK (tenant = nullif(current_setting('app.tenant', true), ''));
GRANT SELECT, INSERT ON rows TO {LOGIN}, {NARROW};
GRANT USAGE ON SEQUENCE rows_id_seq TO {LOGIN}, {NARROW};
-- Only the login role may read it: a statement that ran as the narrower role cannot.
CREATE TABLE login_only (secret text);
INSERT INTO login_only VALUES ('the login role read this');
GRANT SELECT ON login_only TO {LOGIN};
"""


def tenant_value(key: str) -> str:
    return "t" * 10_000 if key == "long" else key


@pytest.fixture(scope="module")
def database(database_url: str) -> Iterator[str]:
    name = f"rls_paths_{uuid.uuid4().hex[:8]}"
    admin_execute(database_url, f'CREATE DATABASE "{name}"')
    url = sa.make_url(database_url).set(database=name).render_as_string(hide_password=False)
    admin_execute(url, SCHEMA)
    for key, decoy in HOSTILE.items():
        for tenant in (tenant_value(key), decoy):
            admin_execute(
                url, "INSERT INTO rows (tenant, body) VALUES (%s, %s)", [tenant, f"of {tenant}"]
            )
    try:
        yield url
    finally:
        admin_execute(database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Target(t.NamedTuple):
    """Where the app connects: the URL for the login role, and whether it is a pooler."""

    url: str
    pooled: bool


@pytest.fixture(params=["direct", "pgbouncer"])
def target(request: pytest.FixtureRequest, database: str) -> Target:
    url = sa.make_url(database)
    if request.param == "pgbouncer":
        bouncer: PgBouncer = request.getfixturevalue("pgbouncer")
        url = sa.make_url(bouncer.url_for(url.database or ""))
    login = url.set(username=LOGIN).render_as_string(hide_password=False)
    return Target(login, request.param == "pgbouncer")


@pytest.fixture(params=[True, False], ids=["fast", "psycopg2-begin"])
def fast_begin(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def make_app(target: Target, fast_begin: bool, **settings: t.Any) -> tuple[Flask, NeonDB]:
    """An app whose request context comes from the ``X-Tenant`` / ``X-Role`` headers."""
    app = Flask(f"rls_paths_{uuid.uuid4().hex[:6]}")
    app.config.update(
        DB_URL=target.url, DB_FAST_BEGIN=fast_begin, DB_POOLED=target.pooled, **settings
    )
    db = NeonDB(app, env_file=None)

    @db.request_context
    def context() -> DatabaseContext:
        tenant = request.headers.get("X-Tenant")
        role = request.headers.get("X-Role")
        return DatabaseContext({"app.tenant": tenant} if tenant else {}, role=role)

    return app, db


# -- each way a transaction can begin -------------------------------------------------------

Read = Callable[[NeonDB], list[str]]
SELECT = "SELECT tenant FROM rows ORDER BY id"


def plain(db: NeonDB) -> list[str]:
    return list(db.session.scalars(sa.text(SELECT)))


def with_parameters(db: NeonDB) -> list[str]:
    statement = sa.text("SELECT tenant FROM rows WHERE body LIKE :pattern ORDER BY id")
    return list(db.session.scalars(statement, {"pattern": "%"}))


def percent_in_text(db: NeonDB) -> list[str]:
    # No parameters at all (do_execute_no_params): psycopg2 leaves the % alone.
    connection = db.session.connection().execution_options(no_parameters=True)
    rows = connection.exec_driver_sql("SELECT tenant FROM rows WHERE body LIKE 'of %' ORDER BY id")
    return [row[0] for row in rows]


def named_cursor(db: NeonDB) -> list[str]:
    result = db.session.execute(sa.text(SELECT), execution_options={"stream_results": True})
    return [row[0] for row in result]


def several_statements(db: NeonDB) -> list[str]:
    result = db.session.connection().exec_driver_sql(f"SELECT 1; {SELECT}")
    cursor = result.cursor
    if db.engine.dialect.driver == "psycopg":
        cursor.nextset()  # psycopg 3 stands on the first result, psycopg2 on the last
    return [row[0] for row in cursor.fetchall()]


def executemany_first(db: NeonDB) -> list[str]:
    tenant = request.headers.get("X-Tenant") or ""
    db.session.execute(
        sa.text("INSERT INTO rows (tenant, body) VALUES (:t, :b)"),
        [{"t": tenant, "b": "many 1"}, {"t": tenant, "b": "many 2"}],
    )
    found = [t for t in db.session.scalars(sa.text(SELECT)) if t]
    db.session.rollback()
    return found


PATHS: list[Read] = [
    plain,
    with_parameters,
    percent_in_text,
    named_cursor,
    several_statements,
    executemany_first,
]


def expected(key: str, path: Read) -> list[str]:
    tenant = tenant_value(key)
    return [tenant] * (3 if path is executemany_first else 1)


@pytest.mark.parametrize("path", PATHS, ids=lambda path: path.__name__)
def test_hostile_values_reach_the_server_exactly_as_given(
    target: Target, fast_begin: bool, path: Read
) -> None:
    app, db = make_app(target, fast_begin)

    @app.get("/read")
    def read() -> dict[str, t.Any]:
        return {"tenants": path(db)}

    try:
        client = app.test_client()
        for key in HOSTILE:
            reply = client.get("/read", headers={"X-Tenant": tenant_value(key)})
            assert reply.status_code == 200, reply.text
            assert reply.json == {"tenants": expected(key, path)}, key
        if path is not executemany_first:  # which could not insert rows of no tenant
            # Without a tenant the policy denies every row (NULL setting).
            assert client.get("/read").json == {"tenants": []}
    finally:
        with app.app_context():
            db.engine.dispose()


@pytest.mark.parametrize("kind", ["cursor class", "listener"])
def test_where_fast_begin_steps_aside_the_context_still_applies(
    target: Target, fast_begin: bool, kind: str
) -> None:
    settings: dict[str, t.Any] = {}
    if kind == "cursor class":
        psycopg2_url = sa.make_url(target.url).get_driver_name() == "psycopg2"
        cursor_class = psycopg2.extras.NamedTupleCursor if psycopg2_url else psycopg.ClientCursor
        factory = {"cursor_factory": cursor_class}
        settings["DB_ENGINE_OPTIONS"] = {"connect_args": factory}
    app, db = make_app(target, fast_begin, **settings)
    seen: list[str] = []
    if kind == "listener":
        with app.app_context():
            sa.event.listen(db.engine, "do_execute", lambda c, s, p, x: seen.append(s))

    @app.get("/read")
    def read() -> dict[str, t.Any]:
        return {"tenants": with_parameters(db)}

    try:
        reply = app.test_client().get("/read", headers={"X-Tenant": "A%%"})
        assert reply.json == {"tenants": ["A%%"]}
        if kind == "listener":
            # The library's listener saw the application's statement, as written.
            assert seen
            assert "LIKE %(pattern)s" in seen[-1]
    finally:
        with app.app_context():
            db.engine.dispose()


def test_a_nul_in_a_value_is_a_config_error_naming_the_setting() -> None:
    with pytest.raises(NeonConfigError, match=r"'app\.tenant': the value holds a NUL") as raised:
        DatabaseContext({"app.tenant": "a\x00b"})
    assert "a\x00b" not in str(raised.value)
    with pytest.raises(NeonConfigError, match="role must be a role name"):
        DatabaseContext(role="a\x00b")


# -- a failure to apply the context is never followed by a statement without it --------------


def test_after_the_context_function_failed_nothing_runs_without_it(
    target: Target, fast_begin: bool
) -> None:
    app, db = make_app(target, fast_begin)
    failures = {"left": 0}

    @db.request_context
    def flaky() -> DatabaseContext:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("the token service is down")
        return DatabaseContext({"app.tenant": request.headers["X-Tenant"]}, role=NARROW)

    @app.get("/retry/<how>")
    def retry(how: str) -> dict[str, t.Any]:
        # A view that catches the failure and queries again, as careless code does.
        attempts = []
        for _ in range(3):
            try:
                if how == "session":
                    rows = list(db.session.scalars(sa.text(SELECT)))
                else:
                    with db.engine.connect() as connection:
                        rows = list(connection.execute(sa.text(SELECT)).scalars())
                attempts.append(rows)
            except RuntimeError as exc:
                attempts.append(str(exc))
                db.session.rollback()
        return {"attempts": attempts}

    try:
        client = app.test_client()
        for how in ("session", "engine"):
            failures["left"] = 2
            reply = client.get(f"/retry/{how}", headers={"X-Tenant": "A%%"})
            assert reply.json == {
                "attempts": ["the token service is down"] * 2 + [["A%%"]],
            }, how
    finally:
        with app.app_context():
            db.engine.dispose()


@pytest.mark.parametrize("how", ["same connection", "new connection", "session"])
def test_after_the_role_failed_to_apply_nothing_runs_as_the_login_role(
    target: Target, fast_begin: bool, how: str
) -> None:
    app, db = make_app(target, fast_begin)

    @app.get("/secret")
    def secret() -> dict[str, t.Any]:
        outcomes: list[str] = []
        query = sa.text("SELECT secret FROM login_only")
        connection = db.engine.connect()
        try:
            for _ in range(3):
                try:
                    if how == "session":
                        outcomes.append(str(db.session.scalar(query)))
                    else:
                        if how == "new connection":
                            connection.close()
                            connection = db.engine.connect()
                        outcomes.append(str(connection.execute(query).scalar()))
                except sa.exc.DBAPIError as exc:
                    outcomes.append(type(exc.orig).__name__)
                    connection.rollback()
                    db.session.rollback()
        finally:
            connection.close()
        return {"outcomes": outcomes}

    try:
        reply = app.test_client().get(
            "/secret", headers={"X-Tenant": "A%%", "X-Role": "no_such_role"}
        )
        assert reply.json == {"outcomes": ["InvalidParameterValue"] * 3}
        # With a real role, the narrower one: it may not read the login role's table.
        reply = app.test_client().get("/secret", headers={"X-Tenant": "A%%", "X-Role": NARROW})
        assert reply.json == {"outcomes": ["InsufficientPrivilege"] * 3}
    finally:
        with app.app_context():
            db.engine.dispose()


# -- a transaction serves the context it began under, and no other ---------------------------


def test_another_context_cannot_use_an_open_transaction(target: Target, fast_begin: bool) -> None:
    app, db = make_app(target, fast_begin)

    @app.get("/switch")
    def switch() -> dict[str, t.Any]:
        first = plain(db)  # the request's transaction, under A%%
        try:
            with db.context({"app.tenant": "A%"}):
                leaked: t.Any = plain(db)
        except NeonStateError as exc:
            leaked = str(exc)
        db.session.rollback()
        with db.context({"app.tenant": "A%"}):
            own = plain(db)  # a transaction of its own: B's rows
            db.session.rollback()
        return {"first": first, "leaked": leaked, "own": own}

    try:
        reply = app.test_client().get("/switch", headers={"X-Tenant": "A%%"})
        assert reply.json["first"] == ["A%%"]
        assert "began under another database context" in reply.json["leaked"]
        assert reply.json["own"] == ["A%"]
    finally:
        with app.app_context():
            db.engine.dispose()


def test_autocommit_statements_refuse_a_context(target: Target, fast_begin: bool) -> None:
    app, db = make_app(target, fast_begin)
    try:
        with app.app_context(), db.engine.connect() as connection:
            autocommit = connection.execution_options(isolation_level="AUTOCOMMIT")
            with (
                db.context({"app.tenant": "A%%"}),
                pytest.raises(NeonStateError, match="autocommit"),
            ):
                autocommit.execute(sa.text(SELECT))
            # On purpose without settings: allowed, and the policy denies every row.
            with db.context():
                assert list(autocommit.execute(sa.text(SELECT))) == []
    finally:
        with app.app_context():
            db.engine.dispose()


@pytest.mark.parametrize("how", ["raw cursor first", "COMMIT statement"])
def test_a_transaction_begun_behind_flask_neons_back_refuses_a_context(
    target: Target, fast_begin: bool, how: str
) -> None:
    app, db = make_app(target, fast_begin)
    try:
        with (
            app.app_context(),
            db.context({"app.tenant": "A%%"}),
            db.engine.connect() as connection,
        ):
            if how == "raw cursor first":
                dbapi_connection = connection.connection.dbapi_connection
                assert dbapi_connection is not None
                with dbapi_connection.cursor() as cursor:
                    cursor.execute("SELECT 1")  # psycopg2 opens the transaction itself
            else:
                assert list(connection.execute(sa.text(SELECT)).scalars()) == ["A%%"]
                connection.exec_driver_sql("COMMIT")  # the server's transaction ends
            if how == "COMMIT statement" and connection.dialect.driver == "psycopg":
                # psycopg 3 reads the server's state: it opens a new transaction, under the
                # context like any other.
                assert list(connection.execute(sa.text(SELECT)).scalars()) == ["A%%"]
            else:
                with pytest.raises(NeonStateError, match="could not apply the database context"):
                    connection.execute(sa.text(SELECT))
            connection.rollback()
            assert list(connection.execute(sa.text(SELECT)).scalars()) == ["A%%"]
    finally:
        with app.app_context():
            db.engine.dispose()


def test_nothing_outlives_the_transaction_through_pgbouncer(
    database: str, pgbouncer: PgBouncer, fast_begin: bool
) -> None:
    # Every transaction on the one server connection PgBouncer lends: what one transaction
    # set must be gone for the next one.
    url = sa.make_url(pgbouncer.url_for(sa.make_url(database).database or ""))
    login = Target(url.set(username=LOGIN).render_as_string(hide_password=False), True)
    app, db = make_app(login, fast_begin, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0)

    @app.get("/who")
    def who() -> dict[str, t.Any]:
        row = db.session.execute(
            sa.text("SELECT current_user, current_setting('app.tenant', true)")
        ).one()
        return {"user": row[0], "tenant": row[1]}

    try:
        client = app.test_client()
        for _ in range(3):
            assert client.get("/who", headers={"X-Tenant": "A%%", "X-Role": NARROW}).json == {
                "user": NARROW,
                "tenant": "A%%",
            }
            assert client.get("/who").json["user"] == LOGIN
            assert client.get("/who").json["tenant"] in (None, "")
    finally:
        with app.app_context():
            db.engine.dispose()


def test_a_test_harness_switches_contexts_inside_one_transaction(
    target: Target, fast_begin: bool
) -> None:
    # flask_neon.testing runs requests one after another in the test's transaction: each
    # statement runs under its own context, also after a savepoint rolled back what a context
    # set inside it.
    app, db = make_app(target, fast_begin)

    def tenants(connection: sa.Connection) -> list[str]:
        return list(connection.execute(sa.text(SELECT)).scalars())

    try:
        with app.app_context(), db.engine.connect() as connection:
            dbapi_connection = connection.connection.dbapi_connection
            switch_contexts(dbapi_connection)
            try:
                with db.context({"app.tenant": "A%%"}):
                    assert tenants(connection) == ["A%%"]
                    savepoint = connection.begin_nested()
                with db.context({"app.tenant": "A%"}, role=NARROW):
                    assert tenants(connection) == ["A%"]
                    # The server goes back to A%% as the login role; the next statement must
                    # not run so.
                    savepoint.rollback()
                    assert tenants(connection) == ["A%"]
                    assert connection.scalar(sa.text("SELECT current_user")) == NARROW
                assert tenants(connection) == []  # no context: no tenant, the login role
                assert connection.scalar(sa.text("SELECT current_user")) == LOGIN
                connection.rollback()
            finally:
                switch_contexts(dbapi_connection, switching=False)
    finally:
        with app.app_context():
            db.engine.dispose()
