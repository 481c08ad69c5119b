"""N+1 detection on the Flask-SQLAlchemy blog of the compatibility tests (posts, authors, tags
many-to-many), on a real PostgreSQL: every lazy N+1 a reviewer would find is reported with its
relationship and fix, the fixed views with nothing; repeated statements, the budget, the modes,
Server-Timing, the Prometheus counter, and the test helpers."""

from __future__ import annotations

import logging
import typing as t

import prometheus_client
import pytest
import sqlalchemy as sa
from flask import Flask, render_template_string
from sqlalchemy import orm

from flask_neon import NeonDB, NPlusOneError
from flask_neon._nplusone import _lazy_load
from flask_neon._transactions import _openers
from flask_neon.testing import round_trips

from .test_flask_sqlalchemy_compat import blog_app

USERS, POSTS_EACH = 6, 4


@pytest.fixture
def make_blog(
    fresh_database: str, monkeypatch: pytest.MonkeyPatch
) -> t.Callable[..., tuple[Flask, NeonDB]]:
    """The compatibility tests' blog on flask-neon (settings from the environment, as
    ``blog_app`` sets only the URL), with listings a reviewer would flag and their fixed forms."""

    def make(testing: bool = False, **settings: t.Any) -> tuple[Flask, NeonDB]:
        for key, value in settings.items():
            monkeypatch.setenv(key, str(value))
        app, db = build_blog(fresh_database)
        app.testing = testing  # an error in a view reaches the test
        return app, db

    return make


def build_blog(url: str) -> tuple[Flask, NeonDB]:
    db = NeonDB(env_file=None)
    app = blog_app(db, url)
    add_views(app, db)
    return app, db


def add_views(app: Flask, db: t.Any) -> None:
    """The listings and their data, for any ``db`` with the blog's models (NeonDB, or
    Flask-SQLAlchemy's in ``benchmarks/compare_nplusone_tools.py``)."""
    models = {mapper.class_.__name__: mapper.class_ for mapper in db.Model.registry.mappers}
    user, post = models["User"], models["BlogPost"]

    @app.get("/n1/posts")
    def posts_lazily() -> dict[str, t.Any]:
        posts = db.session.scalars(sa.select(post).order_by(post.id))
        return {"posts": [[p.title, p.author.name, [t.name for t in p.tags]] for p in posts]}

    @app.get("/fixed/posts")
    def posts_eagerly() -> dict[str, t.Any]:
        query = sa.select(post).order_by(post.id)
        query = query.options(orm.joinedload(post.author), orm.selectinload(post.tags))
        posts = db.session.scalars(query).unique()
        return {"posts": [[p.title, p.author.name, [t.name for t in p.tags]] for p in posts]}

    @app.get("/n1/users")
    def users_lazily() -> dict[str, t.Any]:
        users = db.session.scalars(sa.select(user).order_by(user.id))
        return {"users": [[u.name, len(u.posts)] for u in users]}

    @app.get("/fixed/users")
    def users_eagerly() -> dict[str, t.Any]:
        query = sa.select(user).order_by(user.id).options(orm.selectinload(user.posts))
        return {"users": [[u.name, len(u.posts)] for u in db.session.scalars(query)]}

    @app.get("/n1/template")
    def template() -> str:
        posts = db.session.scalars(sa.select(post).order_by(post.id)).all()
        return render_template_string(
            "{% for p in posts %}{{ p.author.name }} {% endfor %}", posts=posts
        )

    @app.get("/loop")
    def loop() -> dict[str, t.Any]:
        ids = db.session.scalars(sa.select(user.id).order_by(user.id)).all()
        names = [db.session.scalar(sa.select(user.name).where(user.id == i)) for i in ids]
        return {"names": names}

    with app.app_context():
        tag = models["Tag"](name="first")
        for number in range(USERS):
            author = user(name=f"user {number}")
            for index in range(POSTS_EACH):
                db.session.add(post(title=f"{number}.{index}", author=author, tags=[tag]))
        db.session.commit()


@pytest.fixture
def warnings_of(caplog: pytest.LogCaptureFixture) -> t.Callable[[], list[str]]:
    caplog.set_level(logging.WARNING, logger="flask_neon")

    def found() -> list[str]:
        return [r.getMessage() for r in caplog.records if "N+1" in r.getMessage()]

    return found


def test_the_blog_s_lazy_loads_are_named_with_their_fix(
    make_blog: t.Callable[..., tuple[Flask, NeonDB]], warnings_of: t.Callable[[], list[str]]
) -> None:
    app, db = make_blog(DB_PROFILE="development")
    client = app.test_client()
    try:
        for _ in range(2):  # one warning per endpoint and pattern, not per request
            assert client.get("/n1/posts").status_code == 200
            assert client.get("/n1/users").status_code == 200
        found = warnings_of()
        assert len(found) == 3, found
        (author,) = [m for m in found if "of BlogPost.author" in m]
        (tags,) = [m for m in found if "of BlogPost.tags" in m]
        (posts,) = [m for m in found if "of User.posts" in m]
        assert "N+1 in GET posts_lazily: 6 lazy loads of BlogPost.author (6 round trips)" in author
        assert ".options(joinedload(BlogPost.author))" in author
        assert "N+1 in GET posts_lazily: 24 lazy loads of BlogPost.tags (24 round trips)" in tags
        assert ".options(selectinload(BlogPost.tags))" in tags
        assert "N+1 in GET users_lazily: 6 lazy loads of User.posts (6 round trips)" in posts
        assert ".options(selectinload(User.posts))" in posts
        for message in found:
            assert "test_nplusone.py:" in message  # the line of the view that loaded them
        # The fixed views: no false positive.
        for path in ("/fixed/posts", "/fixed/users"):
            assert client.get(path).json == client.get(path.replace("fixed", "n1")).json
        assert len(warnings_of()) == 3
    finally:
        with app.app_context():
            db.engine.dispose()


def test_a_repeated_statement_is_named_by_its_text_and_line(
    make_blog: t.Callable[..., tuple[Flask, NeonDB]], warnings_of: t.Callable[[], list[str]]
) -> None:
    app, db = make_blog(DB_PROFILE="development")
    try:
        assert app.test_client().get("/loop").status_code == 200
        (message,) = warnings_of()
        assert "the same statement 6 times: SELECT " in message
        assert "%(id_1)s" in message  # the placeholder, never the value
        assert "test_nplusone.py:" in message
    finally:
        with app.app_context():
            db.engine.dispose()


@pytest.mark.parametrize("mode", ["warn", "count", "raise"])
def test_every_kind_of_statement_runs_under_detection(
    make_blog: t.Callable[..., tuple[Flask, NeonDB]], mode: str
) -> None:
    """Text, DML and DDL through the session, the ORM's unit of work, Core on a connection:
    detection only looks (SQLAlchemy raises when a non-SELECT's load options are read)."""
    app, db = make_blog(DB_NPLUSONE=mode, DB_METRICS=mode == "count")

    @app.post("/mixed")
    def mixed() -> dict[str, t.Any]:
        session = db.session
        one = session.execute(sa.text("SELECT 1")).scalar()
        session.execute(sa.text("CREATE TEMP TABLE scratch (n int)"))
        session.execute(sa.text("INSERT INTO scratch VALUES (:n)"), [{"n": 1}, {"n": 2}])
        session.execute(sa.text("UPDATE scratch SET n = n + 1"))
        session.execute(sa.text("DELETE FROM scratch WHERE n = 3"))
        left = session.execute(sa.text("SELECT count(*) FROM scratch")).scalar()
        models = {m.class_.__name__: m.class_ for m in db.Model.registry.mappers}
        session.add(models["User"](name="new"))
        session.flush()
        rows = session.connection().execute(sa.text("SELECT 2")).scalar()
        session.rollback()
        return {"values": [one, left, rows]}

    try:
        reply = app.test_client().post("/mixed")
        assert reply.status_code == 200, reply.text
        assert reply.json == {"values": [1, 1, 2]}
    finally:
        with app.app_context():
            db.engine.dispose()


def test_a_lazy_load_in_a_template_points_at_the_template(
    make_blog: t.Callable[..., tuple[Flask, NeonDB]], warnings_of: t.Callable[[], list[str]]
) -> None:
    app, db = make_blog(DB_PROFILE="development")
    try:
        assert app.test_client().get("/n1/template").status_code == 200
        (message,) = warnings_of()
        assert "6 lazy loads of BlogPost.author" in message
        assert "at <template>:1 (a template)" in message  # the template's line, not Jinja's
    finally:
        with app.app_context():
            db.engine.dispose()


def test_raise_mode_fails_the_request_at_the_threshold(
    make_blog: t.Callable[..., tuple[Flask, NeonDB]],
) -> None:
    app, db = make_blog(DB_NPLUSONE="raise", testing=True)
    client = app.test_client()
    try:
        with pytest.raises(NPlusOneError) as raised:
            client.get("/n1/posts")
        # Each post's tags are a load of their own; its author, once per author.
        assert raised.value.finding.pattern == "BlogPost.tags"
        assert raised.value.finding.count == 3
        assert client.get("/fixed/posts").status_code == 200
        assert client.get("/fixed/users").status_code == 200
    finally:
        with app.app_context():
            db.engine.dispose()


def test_the_statement_budget(
    make_blog: t.Callable[..., tuple[Flask, NeonDB]],
    warnings_of: t.Callable[[], list[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, db = make_blog(DB_PROFILE="production", DB_STATEMENT_BUDGET=3)
    # Filling the blog (an app context of 9 statements) was over the budget too.
    assert [m for m in warnings_of() if "N+1 in app context: 9 statements" in m]
    caplog.clear()
    try:
        assert app.test_client().get("/fixed/posts").status_code == 200  # 2 statements
        assert warnings_of() == []
        assert app.test_client().get("/n1/users").status_code == 200  # 7 statements
        (message,) = warnings_of()  # production: the N+1 itself is not watched, the budget is
        assert "7 statements, over DB_STATEMENT_BUDGET" in message
    finally:
        with app.app_context():
            db.engine.dispose()


def test_server_timing_names_the_n_plus_one(
    make_blog: t.Callable[..., tuple[Flask, NeonDB]],
) -> None:
    app, db = make_blog(DB_PROFILE="development", DB_SERVER_TIMING=True)
    try:
        header = app.test_client().get("/n1/users").headers["Server-Timing"]
        assert header.endswith('desc="7 statements, 7 round trips, N+1: User.posts x6"')
        assert "N+1" not in app.test_client().get("/fixed/users").headers["Server-Timing"]
    finally:
        with app.app_context():
            db.engine.dispose()


def test_count_mode_counts_in_prometheus_and_logs_nothing(
    make_blog: t.Callable[..., tuple[Flask, NeonDB]], warnings_of: t.Callable[[], list[str]]
) -> None:
    app, db = make_blog(DB_NPLUSONE="count", DB_METRICS=True)

    def counted(pattern: str) -> float:
        labels = {"app": app.name, "endpoint": "GET users_lazily", "pattern": pattern}
        value = prometheus_client.REGISTRY.get_sample_value(
            "flask_neon_nplusone_requests_total", labels
        )
        return value or 0.0

    try:
        for _ in range(3):
            app.test_client().get("/n1/users")
        assert counted("User.posts") == 3
        assert warnings_of() == []
    finally:
        with app.app_context():
            db.engine.dispose()


def test_off_installs_nothing(make_blog: t.Callable[..., tuple[Flask, NeonDB]]) -> None:
    app, db = make_blog(DB_PROFILE="production")
    try:
        with app.app_context():
            assert db.state().nplusone is None
            assert _openers[db.engine.dialect].observer is None
        assert app.test_client().get("/n1/posts").status_code == 200
    finally:
        with app.app_context():
            db.engine.dispose()


def test_other_libraries_sessions_pay_nothing(
    make_blog: t.Callable[..., tuple[Flask, NeonDB]],
) -> None:
    """The lazy-load listener is on flask-neon's session class only: a plain Session (another
    library's, in the same process) gets no do_orm_execute listener from flask-neon."""
    app, db = make_blog(DB_NPLUSONE="warn")
    try:
        assert app.test_client().get("/fixed/posts").status_code == 200
        with app.app_context():
            assert list(db.session.dispatch.do_orm_execute) == [_lazy_load]
            with orm.Session(db.engine) as plain:
                assert not plain.dispatch.do_orm_execute
    finally:
        with app.app_context():
            db.engine.dispose()


def test_round_trips_counts_what_a_block_cost(
    make_blog: t.Callable[..., tuple[Flask, NeonDB]],
) -> None:
    app, db = make_blog(DB_PROFILE="production")
    client = app.test_client()
    try:
        with round_trips(max=2) as fixed:
            client.get("/fixed/posts")
        assert fixed.count == 2
        # 1 listing + 6 authors + 24 posts' tags
        too_many = r"31 round trips to the database, more than 2:\n24 x SELECT tag.name"
        with pytest.raises(AssertionError, match=too_many), round_trips(max=2):
            client.get("/n1/posts")
        with round_trips() as write:
            client.post("/users", json={"name": "writer"})
        assert write.commits == 2
    finally:
        with app.app_context():
            db.engine.dispose()
