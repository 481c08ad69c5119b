"""First statements for the differential fuzzer (tests/test_first_statement_fuzz.py), from a seed.

:func:`generate` makes ``count`` :class:`FirstStatement` s from ``seed``, the same ones for the
same seed. Each is a statement an application may send as a transaction's first through
SQLAlchemy's ``exec_driver_sql``, with or without parameters, built from a core of one kind
(queries, writes, errors, prepared statements, session side effects, utility commands,
transaction control, several statements, long text, comment-only text) and dressed with what
trips a statement's reader: quoting styles (standard strings with ``''``, ``E''`` with
backslash escapes, ``$$`` and ``$tag$``, quoted identifiers, ``U&''``), comments before,
inside and after it (``--``, nested ``/* */``), NUL bytes, ``%`` and ``%%``, semicolons in
literals, unicode.

Outcomes must be the same on every run of the same statement in a fresh session of the
schema :data:`SCHEMA`: nothing here reads the clock, pids, oids, transaction ids, the query
text the server records (``current_query()``...) or timing (EXPLAIN ANALYZE runs without
timing).
"""

from __future__ import annotations

import dataclasses
import random
import typing as t
from collections.abc import Callable

#: The schema each run starts from (the fuzzer re-creates it before every run).
SCHEMA = """
DO $$DECLARE r record;
BEGIN
    FOR r IN SELECT tablename FROM pg_tables WHERE schemaname = 'public' LOOP
        EXECUTE format('DROP TABLE IF EXISTS %I CASCADE', r.tablename);
    END LOOP;
END$$;
DROP SEQUENCE IF EXISTS fz_seq;
CREATE TABLE f (id int PRIMARY KEY, v text, n numeric);
INSERT INTO f VALUES (1, 'one', 1.5), (2, 'two', NULL), (3, 'it''s', -2);
CREATE TABLE fz_stale (id int, a int, b int);
INSERT INTO fz_stale VALUES (1, 10, 20);
CREATE SEQUENCE fz_seq;
CREATE OR REPLACE FUNCTION fz_lock() RETURNS int LANGUAGE plpgsql
    AS $$BEGIN PERFORM pg_advisory_lock(4242); RETURN 1; END$$;
CREATE OR REPLACE FUNCTION fz_notice(message text) RETURNS int LANGUAGE plpgsql
    AS $$BEGIN RAISE NOTICE 'fz: %', message; RETURN 1; END$$;
"""

#: The sequences whose values the fuzzer records after each run.
SEQUENCES = ("fz_seq",)


@dataclasses.dataclass(frozen=True)
class FirstStatement:
    """One generated case.

    Attributes:
        index: Its place in the generated list.
        kind: The kind of core it was built from (for the report).
        sql: The statement, as the application passes it to ``exec_driver_sql``.
        params: Its parameters (a dict or a tuple), or None: run without parameters.
        setup: Statements of an earlier transaction of the same session (after a first
            ``SELECT 1``, so that none of them is a transaction's first).
        change: SQL another session runs between ``setup`` and the first statement.
        follow_up: The next statement of the same transaction.
        end: ``"commit"`` or ``"rollback"``.
    """

    index: int
    kind: str
    sql: str
    params: dict[str, t.Any] | tuple[t.Any, ...] | None
    setup: tuple[str, ...] = ()
    change: str = ""
    follow_up: str = "SELECT 1"
    end: str = "rollback"

    def describe(self) -> str:
        lines = [f"#{self.index} ({self.kind}): {self.sql!r}"]
        if self.params is not None:
            lines.append(f"  params: {self.params!r}")
        if self.setup:
            lines.append(f"  setup: {self.setup!r}")
        if self.change:
            lines.append(f"  change: {self.change!r}")
        lines.append(f"  then: {self.follow_up!r}, {self.end}")
        return "\n".join(lines)


class _Builder:
    """One statement being built: its text pieces decide ``%`` escaping and parameters."""

    def __init__(self, rng: random.Random, with_params: bool, positional: bool) -> None:
        self.rng = rng
        self.with_params = with_params
        self.positional = positional
        self.values: list[t.Any] = []
        self.names: dict[str, t.Any] = {}

    def text(self, raw: str) -> str:
        """Literal text of the statement: with parameters psycopg2 reads ``%``, so it is
        doubled -- nearly always (a lone ``%`` then is a client-side error, also compared)."""
        if self.with_params and self.rng.random() < 0.95:
            return raw.replace("%", "%%")
        return raw

    def param(self, value: t.Any) -> str:
        """A placeholder for ``value`` (a literal when the statement runs without them)."""
        if not self.with_params:
            return literal(self.rng, value)
        if self.positional:
            self.values.append(value)
            return "%s"
        name = f"p{len(self.names)}"
        self.names[name] = value
        return f"%({name})s"

    def params(self) -> dict[str, t.Any] | tuple[t.Any, ...] | None:
        if not self.with_params:
            return None
        return tuple(self.values) if self.positional else dict(self.names)


# -- literals ------------------------------------------------------------------------------------

_WORDS = [
    "plain",
    "it's",
    "semi;colon",
    "100%",
    "50%%",
    "back\\slash",
    "dash -- dash",
    "/* not a comment */",
    "$$",
    "ünïcødé",
    "漢字",
    "🙂",
    '"double"',
    "tab\there",
    "new\nline",
    "%(p0)s",
    "%s",
    ":name",
]


def _words(rng: random.Random, count: int = 3) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, count)))


def standard_string(content: str) -> str:
    return "'" + content.replace("'", "''") + "'"


def escape_string(content: str) -> str:
    escaped = (
        content.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\t", "\\t")
    )
    return "E'" + escaped + "'"


def dollar_string(content: str, tag: str = "") -> str:
    while f"${tag}$" in content:
        tag += "x"
    return f"${tag}${content}${tag}$"


def unicode_string(content: str) -> str:
    return "U&'" + "".join(f"\\{ord(c):04x}" if ord(c) < 0x10000 else c for c in content) + "'"


def quoted_identifier(content: str) -> str:
    return '"' + content.replace('"', '""').replace("\x00", "") + '"'


def literal(rng: random.Random, value: t.Any) -> str:
    """``value`` written in SQL, in a quoting style picked by ``rng``."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    style = rng.randrange(5)
    if style == 0 or "\x00" in text:
        return standard_string(text)
    if style == 1:
        return escape_string(text)
    if style == 2:
        return dollar_string(text, rng.choice(["", "tag", "q"]))
    if style == 3 and "\\" not in text:
        return unicode_string(text)
    return standard_string(text)


def _value(rng: random.Random) -> t.Any:
    return rng.choice(
        [
            1,
            -7,
            2**40,
            1.25,
            None,
            True,
            "x",
            _words(rng),
            "it's; 100%",
            "ünïcødé 漢字",
        ]
    )


# -- cores ---------------------------------------------------------------------------------------

Core = Callable[[_Builder], "tuple[str, dict[str, t.Any]]"]
_CORES: dict[str, Core] = {}


def core(kind: str, weight: int = 1) -> Callable[[Core], Core]:
    def register(fn: Core) -> Core:
        for index in range(weight):
            _CORES[f"{kind}#{index}"] = fn
        return fn

    return register


@core("select", 3)
def _select(b: _Builder) -> tuple[str, dict[str, t.Any]]:
    rng = b.rng
    items = []
    for i in range(rng.randint(1, 3)):
        expr = rng.choice(
            [
                lambda: b.param(_value(rng)),
                lambda: b.text(literal(rng, _words(rng))),
                lambda: f"{b.param(rng.randint(-5, 5))} + {rng.randint(0, 9)}",
                lambda: "count(*)",
                lambda: b.text(literal(rng, "x") + " || " + literal(rng, "y")),
            ]
        )()
        if expr == "count(*)":
            expr = "(SELECT count(*) FROM f)"
        alias = rng.choice(["", f" AS c{i}", f" AS {b.text(quoted_identifier(_words(rng, 2)))}"])
        items.append(expr + alias)
    sql = "SELECT " + ", ".join(items)
    return sql, {}


@core("select_table", 2)
def _select_table(b: _Builder) -> tuple[str, dict[str, t.Any]]:
    rng = b.rng
    condition = rng.choice(
        [
            f"id = {b.param(rng.randint(0, 4))}",
            "v = " + b.param(rng.choice(["one", "two", "it's", "nope"])),
            f"v LIKE {b.text(literal(rng, 'o%'))}",
            "n IS NULL",
            "true",
        ]
    )
    order = rng.choice(["id", "id DESC", "v"])
    return f"SELECT id, v, n FROM f WHERE {condition} ORDER BY {order}", {}


@core("write", 3)
def _write(b: _Builder) -> tuple[str, dict[str, t.Any]]:
    rng = b.rng
    new_id = rng.choice([1, 4, 5, 6])  # 1 exists: a unique violation
    text = b.param(_words(rng)) if rng.random() < 0.5 else b.text(literal(rng, _words(rng)))
    sql = rng.choice(
        [
            f"INSERT INTO f VALUES ({b.param(new_id)}, {text}, 2.5)",
            f"INSERT INTO f (id, v) VALUES ({new_id}, {text}) RETURNING id, v",
            f"UPDATE f SET v = {text} WHERE id = {b.param(rng.randint(1, 4))}",
            f"UPDATE f SET n = n / {rng.choice([0, 2])} WHERE id = 1",
            f"DELETE FROM f WHERE id = {b.param(rng.randint(1, 4))} RETURNING v",
            f"INSERT INTO f VALUES (nextval('fz_seq') + 10, {text})",
            "INSERT INTO f VALUES (NULL, 'no id')",
        ]
    )
    return sql, {}


@core("invalid", 3)
def _invalid(b: _Builder) -> tuple[str, dict[str, t.Any]]:
    rng = b.rng
    sql = rng.choice(
        [
            "SELEC 1",
            "SELECT (",
            "SELECT 1 +",
            f"SELECT {b.text(literal(rng, 'x'))}::int",
            "SELECT 'unterminated",
            "SELECT $$unterminated",
            'SELECT "unterminated',
            "SELECT nope FROM f",
            "SELECT 1 FROM nope",
            f"SELECT no_such_function({b.param(1)})",
            "SELECT 1 / (id - id) FROM f",
            f"SELECT v::int FROM f WHERE id = {b.param(1)}",
            f"SELECT {b.param('x')}::int",
            "SELECT E'\\u12'",
            "SELECT U&'\\zzzz'",
            f"SELECT nextval('fz_seq'), nope FROM f WHERE v = {b.param('one')}",
            "SELECT nextval('fz_seq') / 0",
            "SELECT fz_notice('failing'), nope FROM f",
            "SELECT fz_notice('runtime') / 0",
            "SELECT fz_lock(), 1 / 0",
            "SELECT a_long_identifier_" + "z" * 60 + " FROM f",
            "SELECT 'a\\b', nope FROM f",
            "SELECT $1",
            f"SELECT {b.param(1)}, $2",
            "SELECT id FROM f WHERE $1 IS NULL",
        ]
    )
    return sql, {}


@core("comment_only")
def _comment_only(b: _Builder) -> tuple[str, dict[str, t.Any]]:
    rng = b.rng
    return (
        rng.choice(
            [
                "-- only a comment",
                "/* only a comment */",
                "/* a /* nested */ comment */",
                "-- one\n-- two\n",
                "  \n\t ",
                "",
                b.text("/* 100% */"),
                "\x00",
                "\x00SELECT 1",
                "-- %(p0)s" if b.with_params and not b.positional else "-- nothing",
            ]
        ),
        {},
    )


@core("prepared", 2)
def _prepared(b: _Builder) -> tuple[str, dict[str, t.Any]]:
    rng = b.rng
    choice = rng.randrange(7)
    if choice == 0:
        return "PREPARE fz_q(int) AS SELECT $1 + 1", {"follow_up": "EXECUTE fz_q(41)"}
    if choice == 1:
        return (
            f"PREPARE fz_q AS SELECT {b.text(literal(rng, _words(rng)))}",
            {"follow_up": "SELECT name, statement FROM pg_prepared_statements"},
        )
    setup = ("PREPARE fz_p(int) AS SELECT b FROM fz_stale WHERE id = $1",)
    if choice == 2:
        return f"EXECUTE fz_p({b.param(1)})", {"setup": setup}
    if choice == 3:
        argument = rng.choice(["nextval('fz_seq')::int", "fz_lock()", "fz_notice('stale')"])
        change = rng.choice(
            ["ALTER TABLE fz_stale DROP COLUMN b", "ALTER TABLE fz_stale ALTER b TYPE text"]
        )
        prefix = rng.choice(["", "EXPLAIN ANALYZE ", "CREATE TABLE fz_made AS "])
        return f"{prefix}EXECUTE fz_p({argument})", {"setup": setup, "change": change}
    if choice == 4:
        return rng.choice(["DEALLOCATE fz_p", "DEALLOCATE ALL", "DEALLOCATE fz_none"]), {
            "setup": setup
        }
    if choice == 5:
        return "EXECUTE fz_none", {}
    return (
        "PREPARE fz_q(int) AS SELECT b FROM fz_stale WHERE id = $1",
        {"follow_up": "EXECUTE fz_q(1)"},
    )


@core("session", 3)
def _session(b: _Builder) -> tuple[str, dict[str, t.Any]]:
    rng = b.rng
    choice = rng.randrange(13)
    if choice == 0:
        return rng.choice(
            [
                "SET search_path = public, pg_catalog",
                "SET extra_float_digits = 1",
                "SET datestyle = 'SQL, DMY'",
                "SET SESSION work_mem = '8MB'",
                "RESET work_mem",
            ]
        ), {}
    if choice == 1:
        return f"SELECT set_config('work_mem', {b.param('7MB')}, false)", {}
    if choice == 2:
        return f"SELECT pg_advisory_lock({b.param(rng.randint(1, 3))})", {}
    if choice == 3:
        return f"SELECT pg_advisory_xact_lock({rng.randint(1, 3)})", {}
    if choice == 4:
        return f"SELECT pg_try_advisory_lock({rng.randint(1, 3)}), fz_lock()", {}
    if choice == 5:
        return "SELECT nextval('fz_seq'), nextval('fz_seq')", {}
    if choice == 6:
        return "CREATE TEMP TABLE fz_tmp (a int)", {"follow_up": "INSERT INTO fz_tmp VALUES (1)"}
    if choice == 7:
        return "LISTEN fz_channel", {"follow_up": "NOTIFY fz_channel, 'payload'"}
    if choice == 8:
        return (
            "DECLARE fz_held CURSOR WITH HOLD FOR SELECT id FROM f ORDER BY id",
            {"follow_up": "FETCH 1 FROM fz_held"},
        )
    if choice == 9:
        return (
            "DECLARE fz_cursor CURSOR FOR SELECT v FROM f ORDER BY id",
            {"follow_up": "SELECT name, statement FROM pg_cursors"},
        )
    if choice == 10:
        return "SELECT 'a\\b'", {"setup": ("SET standard_conforming_strings = off",)}
    if choice == 11:
        return "SELECT a_long_identifier_" + "y" * 60 + " FROM f", {}
    return f"SELECT fz_notice({b.param('hello')})", {}


@core("utility", 3)
def _utility(b: _Builder) -> tuple[str, dict[str, t.Any]]:
    rng = b.rng
    return (
        rng.choice(
            [
                "SHOW statement_timeout",
                "SHOW transaction_isolation",
                "SET LOCAL statement_timeout = 1234",
                "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
                "SET TRANSACTION READ ONLY",
                "EXPLAIN (COSTS OFF) SELECT * FROM f WHERE id = 1",
                "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT count(*) FROM f",
                "EXPLAIN ANALYZE SELECT 1 / 0",
                "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) "
                "INSERT INTO f VALUES (7, 'explained')",
                "VACUUM",
                "VACUUM f",
                "ANALYZE f",
                "CREATE TABLE fz_new (a int, b text)",
                "CREATE TABLE fz_new AS SELECT * FROM f",
                "DROP TABLE f",
                "DROP TABLE IF EXISTS fz_none",
                "TRUNCATE f",
                "LOCK TABLE f IN ACCESS EXCLUSIVE MODE",
                "COPY f TO STDOUT",
                "COPY f FROM STDIN",
                "COPY (SELECT 1) TO STDOUT",
                f"COMMENT ON TABLE f IS {b.text(literal(rng, _words(rng)))}",
                "CREATE INDEX ON f (v)",
                "CREATE INDEX CONCURRENTLY ON f (v)",
                "DISCARD ALL",
                "CHECKPOINT",
                "SELECT pg_cancel_backend(pg_backend_pid())",
            ]
        ),
        {},
    )


@core("transaction_control", 2)
def _transaction_control(b: _Builder) -> tuple[str, dict[str, t.Any]]:
    return (
        b.rng.choice(
            [
                "BEGIN",
                "START TRANSACTION ISOLATION LEVEL REPEATABLE READ",
                "COMMIT",
                "ROLLBACK",
                "END",
                "ABORT",
                "SAVEPOINT fz_sp",
                "RELEASE SAVEPOINT fz_sp",
                "ROLLBACK TO SAVEPOINT fz_sp",
                "PREPARE TRANSACTION 'fz_never'",
                "COMMIT PREPARED 'fz_never'",
            ]
        ),
        {},
    )


@core("several", 2)
def _several(b: _Builder) -> tuple[str, dict[str, t.Any]]:
    rng = b.rng
    return (
        rng.choice(
            [
                "SELECT 1; SELECT 2",
                "SELECT 1;",
                f"SELECT {b.text(literal(rng, 'a;b'))}",
                f"SELECT {b.text(literal(rng, 'a;b'))}; SELECT nope",
                "INSERT INTO f VALUES (8, 'eight'); SELECT 1 / 0",
                f"SELECT {b.param('x;y')} AS semi",
                f"SELECT 1 -- ;\n, {b.text(standard_string('--'))}",
                "SELECT 1 /* ; */",
                "BEGIN; SELECT 1",
            ]
        ),
        {},
    )


@core("long")
def _long(b: _Builder) -> tuple[str, dict[str, t.Any]]:
    rng = b.rng
    size = rng.randint(1000, 4000)
    choice = rng.randrange(4)
    if choice == 0:
        return "SELECT " + b.text(literal(rng, ("ünï 漢 " * size)[:size])) + " AS long", {}
    if choice == 1:
        values = ", ".join(str(i) for i in range(size // 4))
        return f"SELECT count(*) FROM f WHERE id IN ({values})", {}
    if choice == 2:
        return "SELECT 1 AS " + quoted_identifier("x" * 200) + ", " + "1 + " * (
            size // 4
        ) + "1", {}
    return "SELECT " + ", ".join(f"{b.param(i)}" for i in range(size // 20)), {}


# -- dressing ------------------------------------------------------------------------------------

_LEADING = [
    "-- leading comment\n",
    "/* leading */ ",
    "/* a /* nested */ leading */\n",
    "\n\n  ",
    "-- it's; 100%\n",
    "\t",
]
_TRAILING = [" -- trailing", " /* trailing */", "\n", " -- it's; 50%", "  \n  "]


def _dress(b: _Builder, sql: str) -> str:
    rng = b.rng
    if rng.random() < 0.3:
        sql = b.text(rng.choice(_LEADING)) + sql
    if rng.random() < 0.3:
        sql = sql + b.text(rng.choice(_TRAILING))
    if rng.random() < 0.15 and sql.startswith("SELECT "):
        sql = (
            "SELECT "
            + b.text(rng.choice(["/* inside */ ", "/* a /* b */ c */ ", "--x\n"]))
            + sql[7:]
        )
    if rng.random() < 0.03:
        sql = "\x00" + sql
    if rng.random() < 0.03 and "'" in sql:
        at = sql.index("'") + 1
        sql = sql[:at] + "\x00" + sql[at:]
    return sql


def generate(seed: int, count: int) -> list[FirstStatement]:
    """``count`` first statements made from ``seed`` (the same for the same seed)."""
    rng = random.Random(seed)
    kinds = sorted(_CORES)
    made = []
    for index in range(count):
        key = rng.choice(kinds)
        builder = _Builder(rng, with_params=rng.random() < 0.4, positional=rng.random() < 0.3)
        sql, extra = _CORES[key](builder)
        sql = _dress(builder, sql)
        params = builder.params()
        if params is not None and rng.random() < 0.03 and isinstance(params, dict):
            params = {**params, "nul": "a\x00b"}  # a NUL in a parameter value
            sql = sql + " -- " + "%(nul)s"
        made.append(
            FirstStatement(
                index=index,
                kind=key.split("#")[0],
                sql=sql,
                params=params,
                setup=tuple(extra.get("setup", ())),
                change=str(extra.get("change", "")),
                follow_up=str(
                    extra.get(
                        "follow_up",
                        rng.choice(
                            [
                                "SELECT 1",
                                "SELECT count(*) FROM f",
                                "SHOW transaction_isolation",
                                "SELECT txid_current_if_assigned() IS NOT NULL",
                            ]
                        ),
                    )
                ),
                end=rng.choice(["commit", "rollback"]),
            )
        )
    return made
