"""What Flask-SQLAlchemy 3.1 gives a model class: a derived ``__tablename__``, ``Model.query``
with ``get_or_404`` / ``first_or_404`` / ``one_or_404`` / ``paginate``, and the 404 helpers."""

from __future__ import annotations

import re
import typing as t
from collections.abc import Callable

import sqlalchemy as sa
from flask import abort
from sqlalchemy import orm

from ._pagination import Pagination, paginate_query

_CAMEL = re.compile(r"((?<=[a-z0-9])[A-Z]|(?!^)[A-Z](?=[a-z]))")


def table_name(class_name: str) -> str:
    """Flask-SQLAlchemy's table name for a model class: ``BlogPost`` -> ``blog_post``."""
    return _CAMEL.sub(r"_\1", class_name).lower().lstrip("_")


def abort_404(description: str | None) -> t.NoReturn:
    abort(404, description=description)


class Query(orm.Query[t.Any]):
    """The legacy query of ``Model.query``, with the 404 helpers of Flask-SQLAlchemy."""

    def get_or_404(self, ident: t.Any, description: str | None = None) -> t.Any:
        value = self.get(ident)
        if value is None:
            abort_404(description)
        return value

    def first_or_404(self, description: str | None = None) -> t.Any:
        value = self.first()
        if value is None:
            abort_404(description)
        return value

    def one_or_404(self, description: str | None = None) -> t.Any:
        try:
            return self.one()
        except (sa.exc.NoResultFound, sa.exc.MultipleResultsFound):
            abort_404(description)

    def paginate(
        self,
        *,
        page: int | None = None,
        per_page: int | None = None,
        max_per_page: int | None = None,
        error_out: bool = True,
        count: bool = True,
    ) -> Pagination:
        return paginate_query(
            self,
            count,
            page=page,
            per_page=per_page,
            max_per_page=max_per_page,
            error_out=error_out,
        )


class _QueryProperty:
    """``Model.query``: a query of the model on the current app context's session."""

    def __init__(self, session: Callable[[], orm.Session]) -> None:
        self._session = session

    def __get__(self, instance: object, owner: type[t.Any]) -> Query:
        return Query(owner, session=self._session())


def _defines_primary_key(cls: type) -> bool:
    return any(
        (isinstance(value, sa.Column) and value.primary_key)
        or (isinstance(value, orm.MappedColumn) and value.column.primary_key)
        for value in vars(cls).values()
    )


class ModelMixin:
    """Added to ``db.Model``: names tables as Flask-SQLAlchemy does when a class does not, and
    puts the table of a class with ``__bind_key__`` in that bind's metadata."""

    _metadata_for: t.ClassVar[Callable[[str | None], sa.MetaData]]

    def __init_subclass__(cls, **kwargs: t.Any) -> None:
        own_table = "metadata" in vars(cls) or "__table__" in vars(cls)
        if hasattr(cls, "__bind_key__") and not own_table:
            metadata = cls._metadata_for(getattr(cls, "__bind_key__"))  # noqa: B009
            if metadata is not getattr(cls, "metadata", None):
                setattr(cls, "metadata", metadata)  # noqa: B010
        inherited = any("__tablename__" in vars(base) for base in cls.__mro__[1:])
        if (
            orm.DeclarativeBase not in cls.__bases__  # db.Model itself has no table
            and "__tablename__" not in vars(cls)
            and "__table__" not in vars(cls)
            and not vars(cls).get("__abstract__", False)
            # A subclass of a mapped model shares its table (single-table inheritance) unless
            # it has its own primary key (joined-table inheritance).
            and (not inherited or _defines_primary_key(cls))
        ):
            setattr(cls, "__tablename__", table_name(cls.__name__))  # noqa: B010 - no annotation on purpose
        super().__init_subclass__(**kwargs)


def model_base(
    metadata_for: Callable[[str | None], sa.MetaData],
    session: Callable[[], orm.Session],
    model_class: type[t.Any] | None,
) -> type[orm.DeclarativeBase]:
    """The ``db.Model`` of one extension: the application's base or a new one, with the
    table naming, bind keys and ``query`` of Flask-SQLAlchemy. ``metadata_for(key)`` is the
    metadata of a bind key (``None``: the default one)."""
    namespace: dict[str, t.Any] = {"query": _QueryProperty(session), "query_class": Query}
    if model_class is not None:
        for name, value in namespace.items():
            if not hasattr(model_class, name):
                setattr(model_class, name, value)
        return t.cast(type[orm.DeclarativeBase], model_class)
    namespace["metadata"] = metadata_for(None)
    namespace["_metadata_for"] = staticmethod(metadata_for)
    return t.cast(
        type[orm.DeclarativeBase], type("Model", (ModelMixin, orm.DeclarativeBase), namespace)
    )
