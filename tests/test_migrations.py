"""Flask-Migrate with flask-neon, on real databases: a project's life cycle and the example app.

Flask-Migrate's stock ``env.py`` finds the engine and the metadata through ``db.get_engine()``
and ``db.metadatas``; these tests show that NeonDB provides both, from ``flask db init`` to
``flask db downgrade base``.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import typing as t

import flask_migrate  # type: ignore[import-untyped]
import psycopg2.errors  # type: ignore[import-untyped]
import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import Mapped, mapped_column

from example_app import MIGRATIONS_DIR, create_app
from example_app.extensions import db as example_db
from flask_neon import NeonDB

from .conftest import admin_execute

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


# -- what the database holds ---------------------------------------------------------------------


def tables(url: str) -> set[str]:
    rows = admin_execute(
        url, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    )
    return {row[0] for row in rows}


def columns(url: str, table: str) -> set[str]:
    rows = admin_execute(
        url,
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = %s",
        (table,),
    )
    return {row[0] for row in rows}


def current_revision(url: str) -> str | None:
    """The revision in ``alembic_version``, None when it is empty (at base)."""
    rows = admin_execute(url, "SELECT version_num FROM alembic_version")
    return rows[0][0] if rows else None


# -- a project of the test's own -----------------------------------------------------------------


def project_app(url: str, directory: pathlib.Path, *, with_due_column: bool) -> Flask:
    """A one-model project at one point of its history.

    Each call builds its own NeonDB and model, as a process started after editing
    ``models.py`` would: first ``items (id, name)``, then with a ``due`` column added.
    """
    db = NeonDB(env_file=None)

    class Item(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "items"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(sa.String(80), unique=True)

    if with_due_column:
        # Declared outside the class body so both versions share one class statement.
        Item.__table__.append_column(sa.Column("due", sa.Date, nullable=True))

    app = Flask("project")
    app.config["DB_URL"] = url
    db.init_app(app)
    flask_migrate.Migrate(app, db, directory=str(directory))
    return app


def test_project_migration_life_cycle(fresh_database: str, tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "migrations"
    versions = directory / "versions"

    first = project_app(fresh_database, directory, with_due_column=False)
    with first.app_context():
        flask_migrate.init(str(directory))
        assert (directory / "env.py").is_file()
        flask_migrate.migrate(str(directory), message="create items")
        [create_script] = versions.glob("*_create_items.py")
        assert "op.create_table(" in create_script.read_text()
        # NeonDB's naming convention names the constraints, so they can be dropped later.
        assert "uq_items_name" in create_script.read_text()
        flask_migrate.upgrade(str(directory))
    assert {"items", "alembic_version"} <= tables(fresh_database)
    assert columns(fresh_database, "items") == {"id", "name"}
    create_revision = current_revision(fresh_database)
    assert create_revision is not None
    assert create_script.name.startswith(create_revision)

    second = project_app(fresh_database, directory, with_due_column=True)
    with second.app_context():
        flask_migrate.migrate(str(directory), message="add items due")
        [add_script] = versions.glob("*_add_items_due.py")
        assert "op.add_column(" in add_script.read_text()
        assert f"down_revision = '{create_revision}'" in add_script.read_text()
        flask_migrate.upgrade(str(directory))
        assert columns(fresh_database, "items") == {"id", "name", "due"}
        assert current_revision(fresh_database) != create_revision

        # With the schema up to date, autogenerate finds nothing and writes no script.
        flask_migrate.migrate(str(directory), message="nothing")
        assert sorted(path.name for path in versions.glob("*.py")) == sorted(
            [create_script.name, add_script.name]
        )

        flask_migrate.downgrade(str(directory), "-1")
        assert columns(fresh_database, "items") == {"id", "name"}
        assert current_revision(fresh_database) == create_revision

        flask_migrate.downgrade(str(directory), "base")
    assert "items" not in tables(fresh_database)
    assert current_revision(fresh_database) is None


# -- the example app's committed migrations --------------------------------------------------


def test_example_migrations_upgrade_and_downgrade(fresh_database: str) -> None:
    app = create_app({"TESTING": True, "DB_URL": fresh_database})
    try:
        with app.app_context():
            flask_migrate.upgrade()
            assert columns(fresh_database, "notes") == {
                "id",
                "title",
                "body",
                "done",
                "created_at",
                "updated_at",
            }
            # The database enforces the title rule too, not only the API.
            with pytest.raises(psycopg2.errors.CheckViolation, match="ck_notes_title_length"):
                admin_execute(fresh_database, "INSERT INTO notes (title) VALUES ('')")
            admin_execute(fresh_database, "INSERT INTO notes (title) VALUES ('by SQL')")
            assert admin_execute(fresh_database, "SELECT body, done FROM notes") == [("", False)]

            # The models and the committed migrations agree: autogenerate finds no change.
            flask_migrate.check()

            flask_migrate.downgrade(revision="base")
            assert "notes" not in tables(fresh_database)
            assert current_revision(fresh_database) is None
    finally:
        example_db.get_engine(app).dispose()


def test_example_migrations_are_stock_flask_migrate_plus_their_revisions() -> None:
    # env.py is Flask-Migrate's own, unchanged: NeonDB needs no adapted migration environment.
    stock_env = pathlib.Path(flask_migrate.__file__).parent / "templates" / "flask" / "env.py"
    assert (MIGRATIONS_DIR / "env.py").read_text() == stock_env.read_text()
    scripts = sorted(path.name for path in (MIGRATIONS_DIR / "versions").glob("*.py"))
    assert sorted(name.split("_", 1)[1] for name in scripts) == [
        "create_notes.py",
        "private_notes.py",
        "tags.py",
    ]


def test_flask_db_upgrade_cli(fresh_database: str, tmp_path: pathlib.Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("FLASK_")}
    # Run from elsewhere: the migrations directory must not depend on the working directory.
    env |= {"DB_URL": fresh_database, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "example_app", "db", "upgrade"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Running upgrade  -> " in result.stderr
    assert "notes" in tables(fresh_database)
    [script] = (MIGRATIONS_DIR / "versions").glob("*_tags.py")  # the head
    assert script.name.startswith(t.cast(str, current_revision(fresh_database)))
    # A DB_URL was given, so no local server was started.
    assert "local throwaway PostgreSQL" not in result.stderr
