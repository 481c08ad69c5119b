"""Pages of a query, with Flask-SQLAlchemy 3.1's rules, fields and 404s.

``page`` and ``per_page`` come from the request's query string when not given. Out-of-range
input answers ``404`` (or falls back to page 1 / 20 per page with ``error_out=False``), as
Flask-SQLAlchemy does, so that a migrated app's pages and errors stay the same.
"""

from __future__ import annotations

import math
import typing as t
from collections.abc import Callable, Iterator

import sqlalchemy as sa
from flask import abort, has_request_context, request
from sqlalchemy import orm

DEFAULT_PER_PAGE = 20


def page_arguments(
    page: int | None, per_page: int | None, max_per_page: int | None, error_out: bool
) -> tuple[int, int]:
    """The page and page size to use, after the request's query string and the limits."""

    def from_request(name: str, default: int) -> int:
        if not has_request_context():
            return default
        try:
            return int(request.args.get(name, default))
        except (TypeError, ValueError):
            if error_out:
                abort(404)
            return default

    page = from_request("page", 1) if page is None else page
    per_page = from_request("per_page", DEFAULT_PER_PAGE) if per_page is None else per_page
    if max_per_page is not None:
        per_page = min(per_page, max_per_page)
    if error_out and (page < 1 or per_page < 1):
        abort(404)
    return max(page, 1), per_page if per_page >= 1 else DEFAULT_PER_PAGE


class Pagination:
    """One page of results: ``items`` and where they sit among all (``total``, ``pages``).

    Iterating over it iterates over :attr:`items`. Made by ``db.paginate(select)`` or
    ``Model.query.paginate()``.
    """

    def __init__(
        self,
        fetch: Callable[[int, int], list[t.Any]],
        count: Callable[[], int] | None,
        *,
        page: int | None = None,
        per_page: int | None = None,
        max_per_page: int | None = 100,
        error_out: bool = True,
    ) -> None:
        self._fetch, self._count = fetch, count
        self.page, self.per_page = page_arguments(page, per_page, max_per_page, error_out)
        self.max_per_page = max_per_page
        self.items: list[t.Any] = fetch((self.page - 1) * self.per_page, self.per_page)
        if not self.items and self.page != 1 and error_out:
            abort(404)
        #: All rows of the query, or None when counting was turned off (``count=False``).
        self.total: int | None = count() if count is not None else None

    @property
    def first(self) -> int:
        """The 1-based number of the first item on the page (0 when the page is empty)."""
        return (self.page - 1) * self.per_page + 1 if self.items else 0

    @property
    def last(self) -> int:
        """The number of the last item on the page."""
        return max(self.first, self.first + len(self.items) - 1)

    @property
    def pages(self) -> int:
        """How many pages there are (0 without a total)."""
        return math.ceil(self.total / self.per_page) if self.total else 0

    @property
    def has_prev(self) -> bool:
        return self.page > 1

    @property
    def prev_num(self) -> int | None:
        return self.page - 1 if self.has_prev else None

    @property
    def has_next(self) -> bool:
        return self.page < self.pages

    @property
    def next_num(self) -> int | None:
        return self.page + 1 if self.has_next else None

    def prev(self, *, error_out: bool = False) -> Pagination:
        """The previous page of the same query."""
        return self._other(self.page - 1, error_out)

    def next(self, *, error_out: bool = False) -> Pagination:
        """The next page of the same query."""
        return self._other(self.page + 1, error_out)

    def _other(self, page: int, error_out: bool) -> Pagination:
        return Pagination(
            self._fetch,
            self._count,
            page=page,
            per_page=self.per_page,
            max_per_page=self.max_per_page,
            error_out=error_out,
        )

    def iter_pages(
        self,
        *,
        left_edge: int = 2,
        left_current: int = 2,
        right_current: int = 4,
        right_edge: int = 2,
    ) -> Iterator[int | None]:
        """Page numbers for a pagination widget; ``None`` stands for a run of skipped pages.

        With 20 pages on page 7: ``1, 2, None, 5, 6, 7, 8, 9, 10, 11, None, 19, 20``.
        """
        previous = 0
        for number in range(1, self.pages + 1):
            edge = number <= left_edge or number > self.pages - right_edge
            if edge or self.page - left_current <= number <= self.page + right_current:
                if number != previous + 1:
                    yield None
                yield number
                previous = number

    def __iter__(self) -> Iterator[t.Any]:
        return iter(self.items)


def paginate_select(
    session: orm.Session, select: sa.Select[t.Any], count: bool, **kwargs: t.Any
) -> Pagination:
    """Pages of a ``select()`` (its first column's objects, as ``session.scalars``)."""

    def fetch(offset: int, limit: int) -> list[t.Any]:
        return list(session.execute(select.limit(limit).offset(offset)).unique().scalars())

    def total() -> int:
        counted = select.options(orm.lazyload("*")).order_by(None).subquery()
        return int(session.execute(sa.select(sa.func.count()).select_from(counted)).scalar_one())

    return Pagination(fetch, total if count else None, **kwargs)


def paginate_query(query: orm.Query[t.Any], count: bool, **kwargs: t.Any) -> Pagination:
    """Pages of a legacy ``Query``."""

    def fetch(offset: int, limit: int) -> list[t.Any]:
        return query.limit(limit).offset(offset).all()

    def total() -> int:
        return query.order_by(None).count()

    return Pagination(fetch, total if count else None, **kwargs)
