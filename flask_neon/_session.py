"""The session class of ``db.session``: Flask-SQLAlchemy's routing of models to databases."""

from __future__ import annotations

import functools
import typing as t

import sqlalchemy as sa
from sqlalchemy import orm


class RoutingSession(orm.Session):
    """A session that runs a model's statements on the database of its ``__bind_key__``.

    A table's bind key is its ``MetaData``'s ``info["bind_key"]`` (``db.Model`` gives each bind
    key its own metadata); a table without one uses the session's own engine.
    """

    def __init__(self, *args: t.Any, engines: t.Mapping[str, sa.Engine], **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self._engines = engines

    def get_bind(
        self,
        mapper: t.Any = None,
        clause: t.Any = None,
        bind: t.Any = None,
        **kwargs: t.Any,
    ) -> t.Any:
        if bind is None:
            key = _mapper_bind_key(mapper) if mapper is not None else None
            if key is None:
                table = _clause_table(clause)
                key = table.metadata.info.get("bind_key") if table is not None else None
            if key is not None:
                if key not in self._engines:
                    raise sa.exc.UnboundExecutionError(
                        f"Bind key {key!r} is not in DB_BINDS (or SQLALCHEMY_BINDS)."
                    )
                return self._engines[key]
        return super().get_bind(mapper, clause=clause, bind=bind, **kwargs)


@functools.lru_cache(maxsize=1024)  # every statement asks; a model's table never changes
def _mapper_bind_key(mapper: t.Any) -> str | None:
    table = sa.inspect(mapper).local_table
    return table.metadata.info.get("bind_key") if isinstance(table, sa.Table) else None


def _clause_table(clause: t.Any) -> sa.Table | None:
    if isinstance(clause, sa.Table):
        return clause
    if isinstance(clause, sa.sql.dml.UpdateBase) and isinstance(clause.table, sa.Table):
        return clause.table
    return None
