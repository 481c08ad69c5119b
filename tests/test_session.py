"""The extension on a real PostgreSQL: engines per app, the request-scoped session, teardown."""

from __future__ import annotations

import logging
import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask, abort
from sqlalchemy import orm

from flask_neon import NeonDB, NeonStateError

from .conftest import AppFactory, admin_execute, terminate_backends


def checked_out(db: NeonDB, app: Flask) -> int:
    return t.cast(int, db.get_engine(app).pool.checkedout())  # type: ignore[attr-defined]


@pytest.fixture
def items_app(make_app: AppFactory, fresh_database: str) -> tuple[Flask, NeonDB]:
    """An app with an ``items`` table and views that read, write, fail and commit."""
    app, db = make_app(fresh_database)
    admin_execute(fresh_database, "CREATE TABLE items (id serial PRIMARY KEY, name text UNIQUE)")

    @app.post("/items/<name>")
    def add(name: str) -> dict[str, t.Any]:
        db.session.execute(sa.text("INSERT INTO items (name) VALUES (:n)"), {"n": name})
        db.session.commit()
        return {"ok": True}

    @app.post("/uncommitted/<name>")
    def add_uncommitted(name: str) -> dict[str, t.Any]:
        db.session.execute(sa.text("INSERT INTO items (name) VALUES (:n)"), {"n": name})
        return {"ok": True}

    @app.post("/fail-after-write/<name>")
    def fail_after_write(name: str) -> dict[str, t.Any]:
        db.session.execute(sa.text("INSERT INTO items (name) VALUES (:n)"), {"n": name})
        raise RuntimeError("the view failed after writing")

    @app.get("/count")
    def count() -> dict[str, t.Any]:
        return {"count": db.session.execute(sa.text("SELECT count(*) FROM items")).scalar()}

    @app.get("/maybe-fail/<int:n>")
    def maybe_fail(n: int) -> dict[str, t.Any]:
        db.session.execute(sa.text("SELECT 1"))
        if n % 2:
            raise ValueError("odd")
        return {"n": n}

    @app.get("/no-db")
    def no_db() -> str:
        return "plain"

    @app.get("/abort")
    def aborting() -> str:
        db.session.execute(sa.text("SELECT 1"))
        abort(409)

    return app, db


def count_items(url: str) -> int:
    return int(admin_execute(url, "SELECT count(*) FROM items")[0][0])


def test_commit_persists(items_app: tuple[Flask, NeonDB], fresh_database: str) -> None:
    app, db = items_app
    assert app.test_client().post("/items/a").status_code == 200
    assert count_items(fresh_database) == 1
    assert checked_out(db, app) == 0


def test_uncommitted_writes_are_rolled_back_at_teardown(
    items_app: tuple[Flask, NeonDB], fresh_database: str
) -> None:
    app, db = items_app
    assert app.test_client().post("/uncommitted/a").status_code == 200
    assert count_items(fresh_database) == 0
    assert app.test_client().get("/count").json == {"count": 0}
    assert checked_out(db, app) == 0


def test_view_that_raises_after_writing_commits_nothing(
    items_app: tuple[Flask, NeonDB], fresh_database: str
) -> None:
    app, db = items_app
    app.config["PROPAGATE_EXCEPTIONS"] = False
    assert app.test_client().post("/fail-after-write/a").status_code == 500
    assert count_items(fresh_database) == 0
    assert checked_out(db, app) == 0


def test_failed_commit_leaves_the_next_request_working(
    items_app: tuple[Flask, NeonDB], fresh_database: str
) -> None:
    app, db = items_app
    app.config["PROPAGATE_EXCEPTIONS"] = False
    client = app.test_client()
    assert client.post("/items/dup").status_code == 200
    assert client.post("/items/dup").status_code == 500  # unique violation at commit
    assert client.post("/items/other").status_code == 200
    assert count_items(fresh_database) == 2
    assert checked_out(db, app) == 0


def test_thousand_requests_half_failing_leave_no_connection_checked_out(
    items_app: tuple[Flask, NeonDB],
) -> None:
    app, db = items_app
    app.config["PROPAGATE_EXCEPTIONS"] = False
    client = app.test_client()
    statuses = [client.get(f"/maybe-fail/{n}").status_code for n in range(1000)]
    assert statuses.count(200) == 500
    assert statuses.count(500) == 500
    assert checked_out(db, app) == 0
    pool = db.get_engine(app).pool
    # Connections were reused, not opened per request.
    assert pool.checkedin() <= db.state(app).pool.max_connections  # type: ignore[attr-defined]


def test_http_abort_returns_the_connection(items_app: tuple[Flask, NeonDB]) -> None:
    app, db = items_app
    assert app.test_client().get("/abort").status_code == 409
    assert checked_out(db, app) == 0


def test_request_without_database_checks_out_nothing(items_app: tuple[Flask, NeonDB]) -> None:
    app, db = items_app
    engine = db.get_engine(app)
    checkouts: list[object] = []
    sa.event.listen(engine, "checkout", lambda *args: checkouts.append(args))
    assert app.test_client().get("/no-db").data == b"plain"
    assert checkouts == []
    assert app.test_client().get("/count").status_code == 200
    assert len(checkouts) == 1


def test_session_is_per_app_context_and_removed_at_teardown(
    items_app: tuple[Flask, NeonDB],
) -> None:
    app, db = items_app
    with app.app_context():
        outer = db.session
        assert db.session is outer
        outer.execute(sa.text("SELECT 1"))
        assert checked_out(db, app) == 1
        with app.app_context():
            inner = db.session
            assert inner is not outer
        assert db.session is outer
    assert checked_out(db, app) == 0
    with app.app_context():
        assert db.session is not outer


def test_engine_is_built_once_per_app(items_app: tuple[Flask, NeonDB]) -> None:
    app, db = items_app
    with app.app_context():
        first = db.engine
    with app.test_request_context():
        assert db.engine is first
        assert db.get_engine() is first
        assert db.session.get_bind() is first


def test_one_extension_serves_two_apps_on_two_databases(
    make_app: AppFactory, fresh_database: str, database_url: str
) -> None:
    db = NeonDB(env_file=None)
    first, _ = make_app(fresh_database, db=db)
    second, _ = make_app(database_url, db=db)
    names = []
    for app in (first, second):
        with app.app_context():
            names.append(db.session.execute(sa.text("SELECT current_database()")).scalar())
    assert names[0] != names[1]
    assert db.get_engine(first) is not db.get_engine(second)


def test_init_app_twice_is_an_error(make_app: AppFactory) -> None:
    app, db = make_app()
    with pytest.raises(NeonStateError, match="already initialised"):
        db.init_app(app)
    with pytest.raises(NeonStateError, match="already initialised"):
        NeonDB(app, env_file=None)


def test_use_outside_app_context_is_a_clear_error(make_app: AppFactory) -> None:
    _, db = make_app()
    for use in (lambda: db.engine, lambda: db.session, lambda: db.pool_config):
        with pytest.raises(NeonStateError, match="needs an application context"):
            use()


def test_use_before_init_app_is_a_clear_error() -> None:
    db = NeonDB(env_file=None)
    app = Flask(__name__)
    with app.app_context():
        with pytest.raises(NeonStateError, match="not initialised on app"):
            db.session  # noqa: B018
        with pytest.raises(NeonStateError, match="not initialised on app"):
            db.engine  # noqa: B018


def test_teardown_with_a_dead_connection_never_raises(
    items_app: tuple[Flask, NeonDB], fresh_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    app, db = items_app

    @app.get("/die")
    def die() -> str:
        db.session.execute(sa.text("INSERT INTO items (name) VALUES ('x')"))
        # Kill our own backend mid-transaction: teardown then rolls back on a dead socket.
        assert terminate_backends(fresh_database) >= 1
        return "written"

    with caplog.at_level(logging.WARNING):
        assert app.test_client().get("/die").data == b"written"
    assert checked_out(db, app) == 0
    assert count_items(fresh_database) == 0
    # The next request gets a working connection.
    assert app.test_client().get("/count").json == {"count": 0}


def test_nothing_is_committed_implicitly_by_app_context(
    items_app: tuple[Flask, NeonDB], fresh_database: str
) -> None:
    app, db = items_app
    with app.app_context():
        db.session.execute(sa.text("INSERT INTO items (name) VALUES ('ctx')"))
    assert count_items(fresh_database) == 0


def test_model_base_and_metadata_for_migrations(make_app: AppFactory, fresh_database: str) -> None:
    db = NeonDB(env_file=None)

    class Thing(db.Model):  # type: ignore[name-defined, misc]
        __tablename__ = "things"
        id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
        name: orm.Mapped[str]

    app, _ = make_app(fresh_database, db=db)
    assert db.metadatas[None] is db.metadata
    assert "things" in db.metadata.tables
    with app.app_context():
        db.metadata.create_all(db.engine)
        db.session.add(Thing(name="a"))
        db.session.commit()
        assert db.session.scalars(sa.select(Thing.name)).all() == ["a"]
