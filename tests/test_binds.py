"""Several databases (``DB_BINDS`` / ``SQLALCHEMY_BINDS``): each bind is a full engine of its own
(profile, limits, TLS policy, liveness, health, ``flask db-check``), models are routed by
``__bind_key__``, and Flask-Migrate's multi-database template puts each table in its own
database, on Flask-SQLAlchemy and on flask-neon alike."""

from __future__ import annotations

import json
import pathlib
import typing as t
import uuid

import flask_migrate  # type: ignore[import-untyped]
import flask_sqlalchemy
import pytest
import sqlalchemy as sa
from flask import Flask

from flask_neon import NeonConfigError, NeonDB

from .test_cli import closed_url


def bind_app(db: t.Any, url: str, binds: dict[str, t.Any], **config: t.Any) -> Flask:
    app = Flask(f"binds_{uuid.uuid4().hex[:6]}")
    app.config.update(SQLALCHEMY_DATABASE_URI=url, SQLALCHEMY_BINDS=binds, **config)
    db.init_app(app)
    return app


def tables(url: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        return sorted(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def dispose(app: Flask, db: t.Any) -> None:
    with app.app_context():
        for engine in db.engines.values():
            engine.dispose()


def test_each_bind_has_an_engine_with_the_limits_and_the_routing(
    new_database: t.Callable[[], str],
) -> None:
    main, audit = new_database(), new_database()
    db = NeonDB(env_file=None)

    class Note(db.Model):  # type: ignore[name-defined, misc]
        id = db.Column(db.Integer, primary_key=True)

    class Event(db.Model):  # type: ignore[name-defined, misc]
        __bind_key__ = "audit"
        id = db.Column(db.Integer, primary_key=True)

    app = bind_app(db, main, {"audit": audit}, DB_STATEMENT_TIMEOUT=7)
    try:
        with app.app_context():
            assert set(db.engines) == {None, "audit"}
            assert db.bind_names() == ["audit"]
            assert db.get_engine(bind="audit") is db.engines["audit"]  # a direct host
            db.create_all()
            db.session.add_all([Note(), Event(), Event()])
            db.session.commit()
            assert db.session.scalar(sa.select(sa.func.count()).select_from(Event)) == 2
            with db.engines["audit"].connect() as connection:
                assert connection.exec_driver_sql("SHOW statement_timeout").scalar() == "7s"
                name = connection.exec_driver_sql("SELECT current_database()").scalar()
                assert name == sa.make_url(audit).database
            db.session.close()  # its transaction holds a lock on the table
            db.drop_all(bind_key="audit")
        assert tables(main) == ["note"]
        assert tables(audit) == []
    finally:
        dispose(app, db)


def test_a_bind_key_that_is_not_configured_is_refused(database_url: str) -> None:
    db = NeonDB(env_file=None)

    class Stray(db.Model):  # type: ignore[name-defined, misc]
        __bind_key__ = "nowhere"
        id = db.Column(db.Integer, primary_key=True)

    app = bind_app(db, database_url, {})
    with app.app_context():
        with pytest.raises(sa.exc.UnboundExecutionError, match="'nowhere' is not in DB_BINDS"):
            db.session.get(Stray, 1)
        with pytest.raises(sa.exc.UnboundExecutionError, match="'nowhere' is not in DB_BINDS"):
            db.create_all()
        with pytest.raises(Exception, match="no such bind in DB_BINDS"):
            db.get_engine(bind="nowhere")
        db.session.close()


def test_a_bind_on_a_neon_pooler_host_migrates_on_the_direct_host(database_url: str) -> None:
    pooled = "postgresql://alex:pw@ep-cool-123456-pooler.us-east-2.aws.neon.tech/audit"
    db = NeonDB(env_file=None)
    app = bind_app(db, database_url, {"audit": pooled})
    with app.app_context():
        assert db.engines["audit"].url.host == "ep-cool-123456-pooler.us-east-2.aws.neon.tech"
        assert db.get_engine(bind="audit").url.host == "ep-cool-123456.us-east-2.aws.neon.tech"
        assert db.engines["audit"].url.query["sslmode"] == "require"  # Neon's TLS policy
        # Through the pooler the limits travel per transaction, not as startup options.
        assert (
            "options"
            not in db.engines["audit"].dialect.create_connect_args(db.engines["audit"].url)[1]
        )
    dispose(app, db)


@pytest.mark.parametrize(
    ("binds", "message"),
    [
        ({"audit": {"pool_size": 2}}, r"DB_BINDS\['audit'\] has no url"),
        ({"audit": "mysql://u@h/d"}, r"DB_BINDS\['audit'\] must be a PostgreSQL URL"),
        ({"audit": {"url": "postgresql://u@localhost/d", "nonsense": 1}}, "nonsense"),
        (
            {"audit": {"url": "postgresql://u@localhost/d", "poolclass": None}},
            r"\['audit'\]: poolclass",
        ),
        ({"audit": 5}, "DB_BINDS must map bind keys to URLs"),
    ],
)
def test_bad_binds_are_config_errors_naming_the_bind(
    database_url: str, binds: dict[str, t.Any], message: str
) -> None:
    with pytest.raises(NeonConfigError, match=message):
        bind_app(NeonDB(env_file=None), database_url, binds)


def test_a_plaintext_remote_bind_is_refused_in_production(database_url: str) -> None:
    secret = "pa55word-audit"
    binds = {"audit": f"postgresql://alex:{secret}@db.example.com/audit"}
    with pytest.raises(NeonConfigError, match=r"DB_BINDS\['audit'\] connects to") as error:
        bind_app(NeonDB(env_file=None), database_url, binds)
    assert secret not in str(error.value)


def test_binds_from_the_environment_as_json(
    monkeypatch: pytest.MonkeyPatch, new_database: t.Callable[[], str]
) -> None:
    main = new_database()
    audit = sa.make_url(new_database()).set(password="env-s3cret")
    monkeypatch.setenv("DB_BINDS", json.dumps({"audit": audit.render_as_string(False)}))
    app = Flask("env_binds")
    app.config["DB_URL"] = main
    db = NeonDB(app, env_file=None)
    with app.app_context():
        assert db.bind_names() == ["audit"]
        assert (
            db.session.execute(
                sa.text("SELECT 1"), bind_arguments={"bind": db.engines["audit"]}
            ).scalar()
            == 1
        )
        result = app.test_cli_runner().invoke(args=["db-check", "config", "--json"])
        rows = json.loads(result.output)["settings"]
        assert rows["DB_BINDS"] == {
            "value": {"audit": audit.set(drivername="postgresql").render_as_string()},
            "source": "environment",
        }
        assert "env-s3cret" not in result.output
        db.session.close()
    dispose(app, db)


def test_health_and_db_check_have_a_line_per_bind(
    new_database: t.Callable[[], str], database_url: str
) -> None:
    main, audit = new_database(), new_database()
    secret_url = sa.make_url(closed_url(database_url)).set(password="hush-hush-77")
    down = secret_url.render_as_string(hide_password=False)
    db = NeonDB(env_file=None)
    app = bind_app(db, main, {"audit": audit}, DB_CONNECT_RETRY_SECONDS=0)
    broken_db = NeonDB(env_file=None)
    broken = bind_app(broken_db, main, {"audit": down}, DB_CONNECT_RETRY_SECONDS=0)
    try:
        body = app.test_client().get("/health/db").get_json()
        assert body["status"] == "healthy"
        assert body["binds"]["audit"]["status"] == "healthy"
        assert body["binds"]["audit"]["pool"]["status"] == "ok"

        reply = broken.test_client().get("/health/db")
        assert reply.status_code == 503
        assert reply.headers["Retry-After"] == "5"
        body = reply.get_json()
        assert body["binds"]["audit"] | {"latency_ms": 0} == {
            "status": "unhealthy",
            "host_kind": "direct",
            "latency_ms": 0,
            "cached": False,
            "cause": "connection_refused",
            "pool": body["binds"]["audit"]["pool"],
        }

        result = app.test_cli_runner().invoke(args=["db-check"])
        assert result.exit_code == 0, result.output
        assert "bind audit:" in result.output
        assert ": reachable, " in result.output

        result = broken.test_cli_runner().invoke(args=["db-check"])
        assert result.exit_code == 1
        assert "unreachable (connection_refused)" in result.output
        assert "error: connection_refused" in result.output
        assert "hush-hush-77" not in result.output
        report = json.loads(broken.test_cli_runner().invoke(args=["db-check", "--json"]).stdout)
        assert report["reachable"] is True  # DB_URL itself answers
        assert report["binds"]["audit"]["reachable"] is False
        assert "hush-hush-77" not in json.dumps(report)
    finally:
        dispose(app, db)
        dispose(broken, broken_db)


MULTIDB_MODELS = """
class User(db.Model):
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.String(128))


class Group(db.Model):
    __bind_key__ = "db1"
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.String(128))
"""


# Flask-Migrate's template calls db.get_engine(), which Flask-SQLAlchemy 3.1 deprecates.
@pytest.mark.filterwarnings("ignore:'get_engine' is deprecated:DeprecationWarning")
@pytest.mark.parametrize("peer", ["flask-sqlalchemy", "flask-neon"])
def test_flask_migrate_multidb_puts_each_table_in_its_database(
    new_database: t.Callable[[], str], tmp_path: pathlib.Path, peer: str
) -> None:
    main, other = new_database(), new_database()
    db: t.Any = (
        flask_sqlalchemy.SQLAlchemy() if peer == "flask-sqlalchemy" else NeonDB(env_file=None)
    )
    exec(MULTIDB_MODELS, {"db": db})  # the models of Flask-Migrate's own multidb test app
    app = bind_app(db, main, {"db1": other})
    flask_migrate.Migrate(app, db, directory=str(tmp_path / "migrations"))
    runner = app.test_cli_runner()
    try:
        for command in (["db", "init", "--multidb"], ["db", "migrate"], ["db", "upgrade"]):
            directory = ["-d", str(tmp_path / "migrations")]
            result = runner.invoke(args=[*command[:2], *directory, *command[2:]])
            assert result.exit_code == 0, (command, result.output, result.exception)
        assert tables(main) == ["alembic_version", "user"]
        assert tables(other) == ["alembic_version", "group"]
        result = runner.invoke(args=["db", "downgrade", "-d", str(tmp_path / "migrations")])
        assert result.exit_code == 0, result.output
        assert tables(main) == tables(other) == ["alembic_version"]
    finally:
        dispose(app, db)
