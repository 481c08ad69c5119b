"""The part of Flask-SQLAlchemy 3.1's ``db`` object that apps use beyond the session: the
``sqlalchemy`` / ``sqlalchemy.orm`` namespace (``db.Column``, ``db.select``...), the view
helpers (``get_or_404``, ``first_or_404``, ``one_or_404``, ``paginate``), and several
databases (binds): ``db.engines``, ``db.metadatas``, ``db.Table(bind_key=)``, ``create_all``."""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
from sqlalchemy import orm

from ._models import Query, abort_404
from ._pagination import Pagination, paginate_select

#: The ``bind_key`` of ``create_all`` / ``drop_all`` / ``reflect`` that means every database.
ALL = "__all__"
BindKeys: t.TypeAlias = "str | t.Sequence[str | None] | None"


class FlaskSQLAlchemyAPI:
    """Mixed into ``NeonDB``; needs its ``session``, ``metadata`` and ``get_engine``."""

    metadata: sa.MetaData
    _bind_metadatas: dict[str, sa.MetaData]

    if t.TYPE_CHECKING:

        @property
        def session(self) -> orm.Session: ...

        @property
        def engines(self) -> dict[str | None, sa.Engine]: ...

        def get_engine(self, app: t.Any = None, bind: str | None = None) -> sa.Engine: ...

    def get_or_404(
        self, entity: type[t.Any], ident: t.Any, *, description: str | None = None
    ) -> t.Any:
        """``db.session.get(entity, ident)``, or abort with ``404``."""
        value = self.session.get(entity, ident)
        if value is None:
            abort_404(description)
        return value

    def first_or_404(
        self, statement: sa.Select[t.Any], *, description: str | None = None
    ) -> t.Any:
        """The first result's first column, or abort with ``404``."""
        value = self.session.execute(statement).scalar()
        if value is None:
            abort_404(description)
        return value

    def one_or_404(self, statement: sa.Select[t.Any], *, description: str | None = None) -> t.Any:
        """The only result's first column, or abort with ``404`` (none or several)."""
        try:
            return self.session.execute(statement).scalar_one()
        except (sa.exc.NoResultFound, sa.exc.MultipleResultsFound):
            abort_404(description)

    def paginate(
        self,
        select: sa.Select[t.Any],
        *,
        page: int | None = None,
        per_page: int | None = None,
        max_per_page: int | None = None,
        error_out: bool = True,
        count: bool = True,
    ) -> Pagination:
        """One page of ``select``; ``page`` / ``per_page`` default to the query string's."""
        return paginate_select(
            self.session,
            select,
            count,
            page=page,
            per_page=per_page,
            max_per_page=max_per_page,
            error_out=error_out,
        )

    @property
    def metadatas(self) -> dict[str | None, sa.MetaData]:
        """The metadata of each database: ``None`` for the default one, then each bind key."""
        metadatas: dict[str | None, sa.MetaData] = {None: self.metadata}
        metadatas.update(self._bind_metadatas.items())
        return metadatas

    def bind_names(self) -> list[str]:
        """The bind keys of ``DB_BINDS`` (Flask-Migrate's multi-database ``env.py`` asks)."""
        return [key for key in self.engines if key is not None]

    def create_all(self, bind_key: BindKeys = ALL) -> None:
        """Create the tables that do not exist, each in its own database (migrations engine).

        ``bind_key``: ``"__all__"`` (every database), ``None`` (the default one), a bind key
        or a list of them.
        """
        self._for_binds(bind_key, "create_all")

    def drop_all(self, bind_key: BindKeys = ALL) -> None:
        """Drop the tables of the given databases (``bind_key`` as for :meth:`create_all`)."""
        self._for_binds(bind_key, "drop_all")

    def reflect(self, bind_key: BindKeys = ALL) -> None:
        """Load the tables of the given databases into their metadata (see :meth:`create_all`)."""
        self._for_binds(bind_key, "reflect")

    def _for_binds(self, bind_key: BindKeys, method: str) -> None:
        if bind_key == ALL:
            keys: list[str | None] = list(self.metadatas)
        elif bind_key is None or isinstance(bind_key, str):
            keys = [bind_key]
        else:
            keys = list(bind_key)
        engines = self.engines
        for key in keys:
            if key not in engines:  # a model's __bind_key__ that DB_BINDS does not name
                raise sa.exc.UnboundExecutionError(
                    f"Bind key {key!r} is not in DB_BINDS (or SQLALCHEMY_BINDS)."
                )
            getattr(self._metadata_for(key), method)(bind=self.get_engine(bind=key))

    def _metadata_for(self, bind_key: str | None) -> sa.MetaData:
        """The metadata of ``bind_key``, made on first use with the default's conventions."""
        if bind_key is None:
            return self.metadata
        if bind_key not in self._bind_metadatas:
            self._bind_metadatas[bind_key] = sa.MetaData(
                naming_convention=self.metadata.naming_convention, info={"bind_key": bind_key}
            )
        return self._bind_metadatas[bind_key]

    def Table(  # noqa: N802 - Flask-SQLAlchemy's name
        self, name: str, *args: t.Any, bind_key: str | None = None, **kwargs: t.Any
    ) -> sa.Table:
        """``sa.Table`` in the metadata of ``bind_key`` unless one is given, as
        Flask-SQLAlchemy's ``db.Table("tags", db.Column(...))``."""
        if args and isinstance(args[0], sa.MetaData):
            return sa.Table(name, *args, **kwargs)
        return sa.Table(name, self._metadata_for(bind_key), *args, **kwargs)

    def __getattr__(self, name: str) -> t.Any:
        # Flask-SQLAlchemy's namespace: db.Column, db.Integer, db.relationship, db.select ...
        for module in (sa, orm):
            if not name.startswith("_") and hasattr(module, name):
                return getattr(module, name)
        if name == "Query":
            return Query
        raise AttributeError(f"'NeonDB' object has no attribute {name!r}")
