"""Row-level security per request (issue 16): transaction-local settings and role that travel
with ``BEGIN``, reach every transaction of the request, never outlive it (also through PgBouncer
in transaction mode), and fail closed.

The app logs in as ``flask_neon_rls``: not the tables' owner, not a superuser, so the policies
apply. ``auth.user_id()`` stands in for Neon's ``pg_session_jwt`` extension (not on this
machine): it reads the ``sub`` claim of ``request.jwt.claims`` the same way.
"""

from __future__ import annotations

import collections
import typing as t
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from flask import Flask, abort, request

from flask_neon import DatabaseContext, NeonConfigError, NeonDB, NeonStateError

from .conftest import DRIVER, SHOW_IDLE, admin_execute
from .http_server import LiveServer
from .proxy import FaultProxy
from .servers import PgBouncer, pgbouncer_fixture  # noqa: F401 - a fixture, used by name

LOGIN = "flask_neon_rls"
AUTHENTICATED = "flask_neon_rls_authenticated"
ROLES = f"""
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{LOGIN}') THEN
    CREATE ROLE {LOGIN} LOGIN;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{AUTHENTICATED}') THEN
    CREATE ROLE {AUTHENTICATED} NOLOGIN;
  END IF;
END $$;
GRANT {AUTHENTICATED} TO {LOGIN};
"""
SCHEMA = f"""
CREATE TABLE notes (id serial PRIMARY KEY, tenant_id int NOT NULL, body text NOT NULL);
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON notes
  USING (tenant_id = nullif(current_setting('app.tenant_id', true), '')::int)
  WITH CHECK (tenant_id = nullif(current_setting('app.tenant_id', true), '')::int);
GRANT SELECT, INSERT ON notes TO {LOGIN};
GRANT USAGE ON SEQUENCE notes_id_seq TO {LOGIN};
INSERT INTO notes (tenant_id, body) VALUES (1, 't1 a'), (1, 't1 b'), (2, 't2 a');

CREATE SCHEMA auth;
CREATE FUNCTION auth.user_id() RETURNS text LANGUAGE sql STABLE
  AS $f$ SELECT nullif(current_setting('request.jwt.claims', true), '')::json ->> 'sub' $f$;
GRANT USAGE ON SCHEMA auth TO {AUTHENTICATED};
CREATE TABLE todos (
  id serial PRIMARY KEY, user_id text NOT NULL DEFAULT auth.user_id(), task text NOT NULL
);
ALTER TABLE todos ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON todos TO {AUTHENTICATED}
  USING (user_id = auth.user_id()) WITH CHECK (user_id = auth.user_id());
GRANT SELECT, INSERT ON todos TO {AUTHENTICATED};
GRANT USAGE ON SEQUENCE todos_id_seq TO {AUTHENTICATED};
INSERT INTO todos (user_id, task) VALUES ('alice', 'a1'), ('bob', 'b1'), ('bob', 'b2');
"""


@pytest.fixture
def rls_database(new_database: t.Callable[[], str]) -> str:
    """A database with the policies, and its URL for the login role."""
    url = new_database()
    admin_execute(url, ROLES)
    admin_execute(url, SCHEMA)
    return as_login(url)


def as_login(url: str) -> str:
    return sa.make_url(url).set(username=LOGIN).render_as_string(hide_password=False)


def rls_app(url: str, **settings: t.Any) -> tuple[Flask, NeonDB]:
    app = Flask(f"rls_{uuid.uuid4().hex[:6]}")
    app.config.update(DB_URL=url, **settings)
    db = NeonDB(app, env_file=None)

    @db.request_context
    def context() -> DatabaseContext | dict[str, t.Any] | None:
        if request.path.startswith("/todos"):
            user = request.headers.get("X-User")
            if user is None:
                abort(401)
            claims = {"sub": user, "role": "authenticated"}
            return DatabaseContext({"request.jwt.claims": claims}, role=AUTHENTICATED)
        tenant = request.headers.get("X-Tenant")
        if tenant == "forgotten":
            return None  # a bug in the app: fails closed
        if tenant is None:
            return DatabaseContext()  # anonymous: no tenant, policies deny
        return {"app.tenant_id": int(tenant)}

    @app.get("/notes")
    def notes() -> dict[str, t.Any]:
        rows = db.session.execute(sa.text("SELECT tenant_id, body FROM notes ORDER BY id"))
        return {"notes": [list(row) for row in rows]}

    @app.post("/notes/<body>")
    def add(body: str) -> dict[str, t.Any]:
        tenant = int(request.headers["X-Tenant"])
        db.session.execute(
            sa.text("INSERT INTO notes (tenant_id, body) VALUES (:t, :b)"),
            {"t": tenant, "b": body},
        )
        db.session.commit()
        # A second transaction of the same request: the context again.
        return {"count": db.session.scalar(sa.text("SELECT count(*) FROM notes"))}

    @app.get("/todos")
    def todos() -> dict[str, t.Any]:
        rows = db.session.scalars(sa.text("SELECT task FROM todos ORDER BY id"))
        who = db.session.scalar(sa.text("SELECT current_user"))
        return {"todos": list(rows), "user": who}

    @app.get("/whoami")
    def whoami() -> dict[str, t.Any]:
        row = db.session.execute(
            sa.text("SELECT current_user, nullif(current_setting('app.tenant_id', true), '')")
        ).one()
        return {"user": row[0], "tenant": row[1]}

    return app, db


def get(app: Flask, path: str, **headers: str) -> tuple[int, t.Any]:
    reply = app.test_client().get(path, headers=headers)
    return reply.status_code, reply.get_json(silent=True)


def dispose(app: Flask, db: NeonDB) -> None:
    with app.app_context():
        db.engine.dispose()


def test_each_request_sees_its_own_tenant(rls_database: str) -> None:
    app, db = rls_app(rls_database)
    try:
        assert get(app, "/notes", **{"X-Tenant": "1"}) == (
            200,
            {"notes": [[1, "t1 a"], [1, "t1 b"]]},
        )
        assert get(app, "/notes", **{"X-Tenant": "2"}) == (200, {"notes": [[2, "t2 a"]]})
        # No tenant: the setting reads as NULL (or '' once a transaction of this server
        # session has set it: nullif covers both) and the policy denies every row.
        assert get(app, "/notes") == (200, {"notes": []})
        # After a commit the request's next transaction has the context too.
        reply = app.test_client().post("/notes/new", headers={"X-Tenant": "2"})
        assert reply.get_json() == {"count": 2}
    finally:
        dispose(app, db)


def test_jwt_claims_and_a_role_as_neon_rls_uses_them(rls_database: str) -> None:
    app, db = rls_app(rls_database)
    try:
        assert get(app, "/todos", **{"X-User": "bob"}) == (
            200,
            {"todos": ["b1", "b2"], "user": AUTHENTICATED},
        )
        assert get(app, "/todos", **{"X-User": "alice"})[1]["todos"] == ["a1"]
        # A value is a quoted literal, never SQL.
        evil = "x'); DROP TABLE todos; --"
        assert get(app, "/todos", **{"X-User": evil})[1]["todos"] == []
        assert admin_execute(
            rls_database.replace(LOGIN, "postgres"), "SELECT count(*) FROM todos"
        ) == [(3,)]
    finally:
        dispose(app, db)


def test_the_context_travels_with_begin_and_never_outlives_the_request(
    rls_database: str, proxy: FaultProxy
) -> None:
    # One pooled connection: every request below runs on the same server session. (No
    # idle-in-transaction timeout: with one, psycopg 3 sends its own BEGIN.)
    app, db = rls_app(
        proxy.url(rls_database),
        DB_POOL_SIZE=1,
        DB_MAX_OVERFLOW=0,
        DB_IDLE_IN_TRANSACTION_TIMEOUT=0,
    )
    try:
        get(app, "/whoami")  # the dialect's own first-connect queries
        before = len(proxy.exchanges)
        assert get(app, "/todos", **{"X-User": "bob"})[0] == 200
        sent = proxy.exchanges[before:]
        # One round trip carries BEGIN, the settings, the role and the first statement.
        claims = 'SET LOCAL "request"."jwt"."claims" = E\'{'
        role = f'SET LOCAL ROLE "{AUTHENTICATED}"'
        if DRIVER == "psycopg2":  # one message
            assert sent[0][0].startswith(f"BEGIN; {claims}")
            assert f"{role};\nSELECT task FROM todos" in sent[0][0]
        else:  # one pipeline: each its own command, then what fast BEGIN reads of the timeout
            begin, settings, role_sent, first, show = sent[0]
            assert (begin, role_sent, show) == ("BEGIN", role, SHOW_IDLE)
            assert settings.startswith(claims)
            assert first.startswith("SELECT task FROM todos")
        assert sent[1:] == [["SELECT current_user"], ["ROLLBACK"]]
        # The next request on the same connection sees none of it.
        assert get(app, "/whoami") == (200, {"user": LOGIN, "tenant": None})
        assert get(app, "/notes", **{"X-Tenant": "1"})[0] == 200
        assert get(app, "/whoami") == (200, {"user": LOGIN, "tenant": None})
    finally:
        dispose(app, db)


def test_it_fails_closed(rls_database: str, proxy: FaultProxy) -> None:
    app, db = rls_app(proxy.url(rls_database))
    try:
        get(app, "/whoami")
        before = len(proxy.statements)
        assert get(app, "/todos")[0] == 401  # the function refused: nothing sent
        status, _ = get(app, "/notes", **{"X-Tenant": "forgotten"})
        assert status == 500  # returned nothing for a request that needs a context
        assert proxy.statements[before:] == []
    finally:
        dispose(app, db)


def test_health_and_db_check_run_without_a_context(rls_database: str) -> None:
    app, db = rls_app(rls_database)
    try:
        assert app.test_client().get("/health/db").status_code == 200
        assert app.test_cli_runner().invoke(args=["db-check"]).exit_code == 0
    finally:
        dispose(app, db)


def test_a_direct_context_for_commands_and_jobs(rls_database: str) -> None:
    app, db = rls_app(rls_database)
    try:
        with app.app_context():
            with db.context({"app.tenant_id": 2}):
                rows = db.session.scalars(sa.text("SELECT body FROM notes")).all()
                db.session.commit()
                again = db.session.scalars(sa.text("SELECT body FROM notes")).all()
            assert rows == again == ["t2 a"]
            # The transaction begun inside the block must not serve statements outside it:
            # they would run with tenant 2's settings.
            with pytest.raises(NeonStateError, match="began under another database context"):
                db.session.scalars(sa.text("SELECT body FROM notes")).all()
            db.session.rollback()  # the transaction begun inside the block ends here
            assert db.session.scalars(sa.text("SELECT body FROM notes")).all() == []
    finally:
        dispose(app, db)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"tenant": 1}, "'tenant': a custom setting needs a prefix"),
        ({"app.tenant-id": 1}, "'app.tenant-id'"),
        ({"app.tenants": [1, 2]}, "'app.tenants': list values are not allowed"),
        ({"app.tenant_id": None}, "NoneType values are not allowed"),
    ],
)
def test_bad_settings_are_config_errors_naming_them(
    settings: dict[str, t.Any], named: str
) -> None:
    with pytest.raises(NeonConfigError, match=named.replace("[", r"\[")):
        DatabaseContext(settings)


def test_an_unknown_role_is_a_clear_error(rls_database: str) -> None:
    app, db = rls_app(rls_database)
    try:
        with app.app_context(), db.context(role="no_such_role"):
            with pytest.raises(sa.exc.DBAPIError, match='role "no_such_role" does not exist'):
                db.session.execute(sa.text("SELECT 1"))
            db.session.rollback()
    finally:
        dispose(app, db)


def test_two_tenants_through_pgbouncer_never_see_each_other(
    rls_database: str, pgbouncer: PgBouncer
) -> None:
    database = sa.make_url(rls_database).database
    assert database is not None
    url = as_login(pgbouncer.url_for(database))
    app, db = rls_app(url, DB_POOLED=True, DB_POOL_SIZE=4)
    seen: collections.Counter[tuple[str, int]] = collections.Counter()
    try:
        with LiveServer(app) as server:

            def one(number: int) -> None:
                tenant = 1 + number % 2
                reply = server.request("GET", "/notes", headers={"X-Tenant": str(tenant)})
                for row_tenant, _ in reply.json()["notes"]:
                    seen[(f"asked {tenant}", row_tenant)] += 1

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(one, range(2000)))
        assert seen == {("asked 1", 1): 2000, ("asked 2", 2): 1000}
    finally:
        dispose(app, db)


def test_a_query_inside_the_context_function_is_refused(rls_database: str) -> None:
    # It would open the request's transaction without the context: unfiltered rows after it.
    app = Flask("rls_reentrant")
    app.config.update(DB_URL=rls_database, TESTING=True)  # the error reaches the test
    db = NeonDB(app, env_file=None)

    @db.request_context
    def context() -> dict[str, t.Any]:
        with db.engine.connect() as connection:
            return {"app.tenant_id": connection.exec_driver_sql("SELECT 1").scalar()}

    @app.get("/notes")
    def notes() -> dict[str, t.Any]:
        return {"n": db.session.scalar(sa.text("SELECT count(*) FROM notes"))}

    try:
        with pytest.raises(NeonStateError, match="the request_context function ran a query"):
            app.test_client().get("/notes")

        # Under an explicit empty context the lookup runs, without settings.
        @db.request_context
        def own_connection() -> dict[str, t.Any]:
            with db.context(), db.engine.connect() as connection:
                return {"app.tenant_id": connection.exec_driver_sql("SELECT 1").scalar()}

        assert app.test_client().get("/notes").get_json() == {"n": 2}
    finally:
        dispose(app, db)
