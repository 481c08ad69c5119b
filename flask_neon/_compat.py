"""The part of Flask-SQLAlchemy 3.1's ``db`` object that apps use beyond the session: the
``sqlalchemy`` / ``sqlalchemy.orm`` namespace (``db.Column``, ``db.select``...), the view
helpers (``get_or_404``, ``first_or_404``, ``one_or_404``, ``paginate``) and ``db.engines``."""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
from sqlalchemy import orm

from ._models import Query, abort_404
from ._pagination import Pagination, paginate_select


class FlaskSQLAlchemyAPI:
    """Mixed into ``NeonDB``; needs its ``session`` and ``engine``."""

    if t.TYPE_CHECKING:

        @property
        def session(self) -> orm.Session: ...

        @property
        def engine(self) -> sa.Engine: ...

        metadata: sa.MetaData

        def get_engine(self) -> sa.Engine: ...

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

    def create_all(self) -> None:
        """Create the tables of :attr:`metadata` that do not exist (on the migrations engine)."""
        self.metadata.create_all(self.get_engine())

    def drop_all(self) -> None:
        """Drop the tables of :attr:`metadata`."""
        self.metadata.drop_all(self.get_engine())

    @property
    def engines(self) -> dict[str | None, sa.Engine]:
        """``{None: engine}``: Flask-SQLAlchemy's mapping of binds to engines."""
        return {None: self.engine}

    def __getattr__(self, name: str) -> t.Any:
        # Flask-SQLAlchemy's namespace: db.Column, db.Integer, db.relationship, db.select ...
        for module in (sa, orm):
            if not name.startswith("_") and hasattr(module, name):
                return getattr(module, name)
        if name == "Query":
            return Query
        raise AttributeError(f"'NeonDB' object has no attribute {name!r}")
