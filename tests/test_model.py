"""``db.Model``: a declarative base made once per ``NeonDB``, or the application's own."""

from __future__ import annotations

import pathlib
import textwrap

import mypy.api
import pytest
import sqlalchemy as sa
from sqlalchemy import orm

from flask_neon import NeonConfigError, NeonDB


def test_each_extension_has_its_own_model_class_bound_to_its_metadata() -> None:
    first, second = NeonDB(env_file=None), NeonDB(env_file=None)
    assert isinstance(first.Model, type)
    assert first.Model is first.Model  # made once, not per attribute access
    assert first.Model is not second.Model
    assert first.Model.metadata is first.metadata

    class Note(first.Model):  # type: ignore[name-defined, misc]
        __tablename__ = "notes"
        id: orm.Mapped[int] = orm.mapped_column(primary_key=True)

    assert "notes" in first.metadata.tables
    assert "notes" not in second.metadata.tables


def test_model_class_is_flask_sqlalchemys_model_class() -> None:
    class Base(orm.DeclarativeBase):
        pass

    db = NeonDB(model_class=Base, env_file=None)
    assert db.Model is Base
    assert db.metadata is Base.metadata
    with pytest.raises(NeonConfigError, match="metadata"):
        NeonDB(model_class=Base, metadata=sa.MetaData(), env_file=None)


def test_models_on_the_applications_base_type_check(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mypy accepts a base class only when it can name it: the documented typed way.
    source = tmp_path / "models.py"
    source.write_text(
        textwrap.dedent(
            """
            from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
            from flask_neon import NeonDB

            class Base(DeclarativeBase):
                pass

            db = NeonDB(model_class=Base)

            class Note(Base):
                __tablename__ = "notes"
                id: Mapped[int] = mapped_column(primary_key=True)
                title: Mapped[str]

            note = Note(id=1, title="typed")
            title: str = note.title
            model: type[DeclarativeBase] = db.Model
            """
        )
    )
    # An editable install is found through an import hook mypy does not run.
    monkeypatch.setenv("MYPYPATH", str(pathlib.Path(__file__).resolve().parent.parent))
    stdout, stderr, status = mypy.api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(source)]
    )
    assert status == 0, stdout + stderr
