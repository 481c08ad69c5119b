"""One app written for Flask-SQLAlchemy 3.1, run unchanged on Flask-SQLAlchemy and on flask-neon
(only the import and the constructor differ), against real PostgreSQL: the same answers."""

from __future__ import annotations

import typing as t
import uuid

import flask_sqlalchemy
import pytest
import sqlalchemy as sa
from flask import Flask, request

from flask_neon import NeonConfigError, NeonDB
from flask_neon._models import table_name


def blog_app(db: t.Any, url: str, audit_url: str | None = None) -> Flask:
    """A small Flask-SQLAlchemy blog; ``db`` is ``SQLAlchemy()`` or ``NeonDB()``. With
    ``audit_url``, an audit log lives in that second database (bind ``audit``)."""
    app = Flask(f"blog_{uuid.uuid4().hex[:6]}")
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    app.config["SQLALCHEMY_BINDS"] = {"audit": audit_url} if audit_url else {}

    class User(db.Model):  # type: ignore[name-defined, misc]
        id = db.Column(db.Integer, primary_key=True)
        name = db.Column(db.String(50), unique=True, nullable=False)

    class BlogPost(db.Model):  # type: ignore[name-defined, misc]
        id = db.Column(db.Integer, primary_key=True)
        title = db.Column(db.String(100), nullable=False)
        user_id = db.Column(db.Integer, db.ForeignKey("user.id"), nullable=False)
        author = db.relationship(User, backref="posts")
        tags = db.relationship("Tag", secondary=lambda: post_tag)

    class Tag(db.Model):  # type: ignore[name-defined, misc]
        name = db.Column(db.String(20), primary_key=True)

    post_tag = db.Table(
        "post_tag",
        db.Column("post_id", db.ForeignKey(BlogPost.id), primary_key=True),
        db.Column("tag_name", db.ForeignKey(Tag.name), primary_key=True),
    )

    class AuditEntry(db.Model):  # type: ignore[name-defined, misc]
        __bind_key__ = "audit" if audit_url else None
        id = db.Column(db.Integer, primary_key=True)
        action = db.Column(db.String(100), nullable=False)

    db.init_app(app)

    def audit(action: str) -> None:
        db.session.add(AuditEntry(action=action))

    @app.post("/users")
    def create_user() -> tuple[dict[str, t.Any], int]:
        user = User(name=request.json["name"])  # type: ignore[index]
        db.session.add(user)
        try:
            db.session.commit()
        except sa.exc.IntegrityError:
            db.session.rollback()
            return {"error": "taken"}, 409
        tag = db.session.get(Tag, "first") or Tag(name="first")
        for number in range(request.json.get("posts", 0)):  # type: ignore[union-attr]
            db.session.add(BlogPost(title=f"post {number}", author=user, tags=[tag]))
        audit(f"created {user.name}")
        db.session.commit()
        return {"id": user.id}, 201

    @app.get("/users/<int:ident>")
    def get_user(ident: int) -> dict[str, t.Any]:
        user = db.get_or_404(User, ident, description="no such user")
        return {"name": user.name, "posts": len(user.posts)}

    @app.get("/legacy/users/<int:ident>")
    def legacy_user(ident: int) -> dict[str, t.Any]:
        return {"name": User.query.get_or_404(ident).name}

    @app.get("/users/by-name/<name>")
    def by_name(name: str) -> dict[str, t.Any]:
        first = db.first_or_404(db.select(User).filter_by(name=name))
        one = db.one_or_404(db.select(User).filter_by(name=name), description="not one")
        return {"first": first.id, "one": one.id}

    @app.get("/posts")
    def posts() -> dict[str, t.Any]:
        page = db.paginate(db.select(BlogPost).order_by(BlogPost.id), max_per_page=5)
        return pagination(page, lambda post: post.title)

    @app.get("/legacy/users")
    def legacy_users() -> dict[str, t.Any]:
        page = User.query.order_by(User.id).paginate(error_out=False)
        return pagination(page, lambda user: user.name)

    @app.get("/tags/<name>")
    def tagged(name: str) -> dict[str, t.Any]:
        query = db.select(BlogPost).where(BlogPost.tags.any(Tag.name == name))
        return {"posts": len(db.session.scalars(query).all())}

    @app.get("/audit")
    def audit_log() -> dict[str, t.Any]:
        entries = db.session.scalars(db.select(AuditEntry).order_by(AuditEntry.id))
        return {"actions": [entry.action for entry in entries]}

    @app.get("/schema")
    def schema() -> dict[str, t.Any]:
        return {
            "tables": {str(key): sorted(meta.tables) for key, meta in db.metadatas.items()},
            "engines": sorted(map(str, db.engines)),
        }

    with app.app_context():
        db.create_all()
    return app


PAGE_FIELDS = ("page", "per_page", "total", "pages", "first", "last", "has_prev", "prev_num")
PAGE_FIELDS += ("has_next", "next_num")


def pagination(page: t.Any, show: t.Callable[[t.Any], t.Any]) -> dict[str, t.Any]:
    return {
        "items": [show(item) for item in page],
        **{name: getattr(page, name) for name in PAGE_FIELDS},
        "iter_pages": list(page.iter_pages()),
        "next": [show(item) for item in page.next().items] if page.has_next else None,
    }


SCRIPT: list[tuple[str, str, dict[str, t.Any] | None]] = [
    ("POST", "/users", {"name": "ada", "posts": 23}),
    ("POST", "/users", {"name": "bob", "posts": 1}),
    ("POST", "/users", {"name": "ada"}),  # unique violation
    ("GET", "/users/1", None),
    ("GET", "/users/99", None),  # 404 with a description
    ("GET", "/legacy/users/2", None),
    ("GET", "/legacy/users/99", None),
    ("GET", "/users/by-name/bob", None),
    ("GET", "/users/by-name/nobody", None),
    ("GET", "/posts", None),
    ("GET", "/posts?page=3&per_page=4", None),
    ("GET", "/posts?page=2&per_page=50", None),  # capped by max_per_page
    ("GET", "/posts?page=99", None),  # out of range: 404
    ("GET", "/posts?page=0", None),
    ("GET", "/posts?page=x", None),
    ("GET", "/legacy/users?page=7", None),  # out of range without error_out
    ("GET", "/tags/first", None),
    ("GET", "/schema", None),
]
#: With the audit bind: the log in the second database, rolled back with the failed insert.
AUDIT_SCRIPT = [*SCRIPT, ("GET", "/audit", None)]


@pytest.fixture
def databases(new_database: t.Callable[[], str]) -> list[str]:
    """Four fresh databases: Flask-SQLAlchemy's main and audit, then flask-neon's."""
    return [new_database() for _ in range(4)]


def answers(app: Flask, script: list[tuple[str, str, t.Any]] = SCRIPT) -> list[tuple[int, t.Any]]:
    client = app.test_client()
    replies = [client.open(path, method=method, json=body) for method, path, body in script]
    return [(reply.status_code, reply.get_json(silent=True) or reply.text) for reply in replies]


# Query.get() is SQLAlchemy 2's legacy API: a warning in real apps, not the error this suite's
# filterwarnings makes of it.
@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.LegacyAPIWarning")
@pytest.mark.parametrize("with_bind", [False, True], ids=["one-database", "audit-bind"])
def test_the_same_app_answers_the_same(databases: list[str], with_bind: bool) -> None:
    theirs, ours = flask_sqlalchemy.SQLAlchemy(), NeonDB(env_file=None)
    audit = (databases[1], databases[3]) if with_bind else (None, None)
    original = blog_app(theirs, databases[0], audit[0])
    migrated = blog_app(ours, databases[2], audit[1])
    script = AUDIT_SCRIPT if with_bind else SCRIPT
    try:
        expected, actual = answers(original, script), answers(migrated, script)
    finally:
        for db, app in ((theirs, original), (ours, migrated)):
            with app.app_context():
                for engine in db.engines.values():
                    engine.dispose()
    assert actual == expected
    statuses = [status for status, _ in expected[: len(SCRIPT)]]
    assert (
        statuses
        == [201, 201, 409, 200, 404, 200, 404, 200, 404] + [200] * 3 + [404] * 3 + [200] * 3
    )
    assert "no such user" in expected[4][1]
    assert expected[len(SCRIPT) - 2][1] == {"posts": 24}
    schema = expected[len(SCRIPT) - 1][1]
    main_tables = ["blog_post", "post_tag", "tag", "user"]
    if not with_bind:
        tables = sorted([*main_tables, "audit_entry"])
        assert schema == {"tables": {"None": tables}, "engines": ["None"]}
        return
    assert schema == {
        "tables": {"None": main_tables, "audit": ["audit_entry"]},
        "engines": ["None", "audit"],
    }
    assert expected[-1][1] == {"actions": ["created ada", "created bob"]}
    # Each table in its own database, on both.
    for url, tables in zip(databases, [main_tables, ["audit_entry"]] * 2, strict=True):
        engine = sa.create_engine(url)
        try:
            assert sorted(sa.inspect(engine).get_table_names()) == tables
        finally:
            engine.dispose()


@pytest.mark.parametrize(
    ("name", "table"),
    [
        ("User", "user"),
        ("BlogPost", "blog_post"),
        ("HTTPRequest", "http_request"),
        ("APIKey2", "api_key2"),
        ("Item", "item"),
        ("ABC", "abc"),
    ],
)
def test_table_names_are_derived_as_flask_sqlalchemy_derives_them(name: str, table: str) -> None:
    assert table_name(name) == table == flask_sqlalchemy.model.camel_to_snake_case(name)


def test_iter_pages_matches_flask_sqlalchemy() -> None:
    from flask_sqlalchemy.pagination import Pagination as Theirs

    from flask_neon._pagination import Pagination as Ours

    class Fixed(Theirs):
        def _query_items(self) -> list[t.Any]:
            return [1]

        def _query_count(self) -> int:
            return int(self._query_args["total"])

    for total in (0, 1, 19, 20, 21, 100, 400):
        for page in range(1, max(2, total // 20 + 2)):
            theirs = Fixed(page=page, per_page=20, error_out=False, total=total)
            ours = Ours(
                lambda offset, limit: [1],
                lambda total=total: total,
                page=page,
                per_page=20,
                error_out=False,
            )
            assert list(ours.iter_pages()) == list(theirs.iter_pages()), (total, page)
            assert (ours.pages, ours.has_next, ours.next_num) == (
                theirs.pages,
                theirs.has_next,
                theirs.next_num,
            )


def test_two_names_for_one_setting_must_agree(database_url: str) -> None:
    app = Flask("conflict")
    app.config.update(DB_URL=database_url, SQLALCHEMY_DATABASE_URI=database_url + "x")
    with pytest.raises(NeonConfigError, match="DB_URL and SQLALCHEMY_DATABASE_URI"):
        NeonDB(app, env_file=None)


def test_flask_shell_has_db_and_the_models(database_url: str) -> None:
    db = NeonDB(env_file=None)
    app = blog_app(db, database_url)
    try:
        context = app.make_shell_context()
        assert context["db"] is db
        assert {"User", "BlogPost"} <= set(context)
        assert context["User"].__tablename__ == "user"
    finally:
        with app.app_context():
            db.drop_all()
            db.engine.dispose()


def test_engine_options_go_on_top_of_the_profile(database_url: str) -> None:
    app = Flask("options")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=database_url,
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 3, "connect_args": {"application_name": "mine"}},
    )
    db = NeonDB(app, env_file=None)
    with app.app_context():
        try:
            assert db.engine.pool.size() == 3
            name = db.session.execute(sa.text("SHOW application_name")).scalar()
            assert name == "mine"
        finally:
            db.session.close()
            db.engine.dispose()


@pytest.mark.parametrize(
    ("options", "named"),
    [({"no_such_option": 1}, "no_such_option"), ({"poolclass": None}, "poolclass")],
)
def test_an_engine_option_that_cannot_work_is_a_config_error_naming_it(
    database_url: str, options: dict[str, t.Any], named: str
) -> None:
    app = Flask("bad_options")
    app.config.update(DB_URL=database_url, DB_ENGINE_OPTIONS=options)
    with pytest.raises(NeonConfigError, match=named):
        NeonDB(app, env_file=None)


def test_db_check_config_never_shows_connect_args_values(database_url: str) -> None:
    app = Flask("shown")
    secret = "s3cret-passw0rd"
    app.config.update(
        DB_URL=database_url, DB_ENGINE_OPTIONS={"connect_args": {"password": secret}}
    )
    NeonDB(app, env_file=None)
    result = app.test_cli_runner().invoke(args=["db-check", "config", "--json"])
    assert result.exit_code == 0, result.output
    assert secret not in result.output
    assert "password" in result.output
