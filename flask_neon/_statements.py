"""What flask-neon needs to know of a statement's text, read without a parser: the word it
starts with, and whether it can only read.

Both answers are conservative. A statement that :func:`opens_plainly` may carry its
transaction's ``BEGIN`` (fast BEGIN); any other gets psycopg2's own ``BEGIN``. A transaction all
of whose statements are :func:`plain_read` holds no lock but a plain read's (``ACCESS SHARE`` on
the tables it read), so ending it after the response cannot be observed by another request;
anything else ends before the response.
"""

from __future__ import annotations

import functools
import re

#: First words of the statements that may open a transaction in the message that carries its
#: ``BEGIN``: none of them makes the server keep the message's text (``PREPARE``, ``DECLARE``),
#: runs a prepared statement (``EXECUTE``, also inside ``EXPLAIN`` or ``CREATE ... AS``), or
#: puts libpq in a mode psycopg2 does not expect (``COPY``).
OPENING_WORDS = frozenset(
    {"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "WITH", "VALUES", "TABLE", "SHOW", "SET"}
)
_READ_WORDS = frozenset({"SELECT", "WITH", "VALUES", "TABLE", "SHOW"})
#: Statements that change nothing a transaction holds.
_NEUTRAL_WORDS = frozenset({"SAVEPOINT", "RELEASE", "SET", "RESET"})
#: Words after which a plain read is not one: writes (also in a WITH), SELECT ... INTO (a new
#: table), FOR UPDATE / SHARE (row locks), LOCK.
_WRITE_WORDS = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "INTO", "FOR", "LOCK"})
#: Words that a parenthesis may follow without calling a function.
_NOT_CALLS = frozenset(
    """ALL AND ANY ARRAY AS BETWEEN BY CASE CAST COLLATE CROSS CUBE DISTINCT ELSE EXCEPT
    EXISTS FILTER FROM FULL GROUP GROUPING HAVING ILIKE IN INNER INTERSECT IS JOIN LATERAL LEFT
    LIKE LIMIT MATERIALIZED NOT OFFSET ON OR ORDER OUTER OVER PARTITION RANGE RIGHT ROLLUP ROW
    ROWS SELECT SETS SIMILAR SOME THEN UNION USING VALUES WHEN WHERE WINDOW WITH WITHIN""".split()  # noqa: SIM905
)
#: Built-in functions that read or compute and take no lock, write nothing and wait for
#: nothing. Any other call (nextval, pg_advisory_xact_lock, a user's function) is not a plain
#: read. Type names with a modifier (``varchar(20)``) are here too.
_PURE_FUNCTIONS = frozenset(
    """abs age array_agg array_length array_position array_to_string avg bit_length bool_and
    bool_or btrim cardinality ceil ceiling char char_length character character_length
    coalesce concat concat_ws count cume_dist current_database current_schema current_setting
    date_part date_trunc decimal dense_rank every extract first_value float floor format
    generate_series greatest json_agg json_array_elements json_build_array json_build_object
    json_each json_extract_path_text json_object_agg jsonb_agg jsonb_array_elements
    jsonb_build_array jsonb_build_object jsonb_each jsonb_extract_path_text jsonb_object_agg lag
    last_value lead least left length lower lpad ltrim make_date make_interval max md5 min mod
    now nth_value ntile nullif numeric octet_length percent_rank pg_backend_pid position power
    rank regexp_match regexp_replace replace right round row_number row_to_json rpad rtrim
    split_part sqrt starts_with statement_timestamp string_agg string_to_array strpos substr
    substring sum time timestamp timezone to_char to_date to_json to_jsonb to_number
    to_timestamp transaction_timestamp trim trunc unnest upper varchar version""".split()  # noqa: SIM905 - a word list reads better as text
)
_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<comment>--[^\n]*|/\*)
    | (?P<string>[eE]'(?:[^'\\]|\\.|'')*'|[uUbBxXnN]?&?'(?:[^']|'')*')
    | (?P<dollar>\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$)
    | (?P<parameter>\$[0-9]+)
    | (?P<quoted>(?:[uU]&)?"(?:[^"]|"")*")
    | (?P<word>[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*)
    | (?P<cast>::)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)


def _tokens(sql: str) -> list[tuple[str, str]] | None:
    """The statement's tokens as (kind, text), comments and spaces left out; None when it
    cannot be read (an unterminated literal or comment)."""
    tokens: list[tuple[str, str]] = []
    at, end = 0, len(sql)
    while at < end:
        match = _TOKEN.match(sql, at)
        if match is None:
            return None
        kind = match.lastgroup or "other"
        if kind == "other" and match.group() in "'\"":
            return None  # a literal or quoted name that never ends
        if kind == "comment" and match.group() == "/*":
            at = _end_of_block_comment(sql, match.end())
            if at < 0:
                return None
            continue
        if kind == "dollar":
            close = sql.find(match.group(), match.end())
            if close < 0:
                return None
            tokens.append(("string", sql[at : close + len(match.group())]))
            at = close + len(match.group())
            continue
        if kind not in ("space", "comment"):
            tokens.append((kind, match.group()))
        at = match.end()
    return tokens


def _end_of_block_comment(sql: str, at: int) -> int:
    # PostgreSQL's block comments nest.
    depth = 1
    while depth:
        opening, closing = sql.find("/*", at), sql.find("*/", at)
        if closing < 0:
            return -1
        if 0 <= opening < closing:
            depth, at = depth + 1, opening + 2
        else:
            depth, at = depth - 1, closing + 2
    return at


def first_word(sql: str) -> str | None:
    """The statement's first word in capitals, after spaces and comments; None when the text
    holds no word first (only comments, a parenthesis, an unterminated comment)."""
    tokens = _tokens_cached(sql)
    if not tokens or tokens[0][0] != "word":
        return None
    return tokens[0][1].upper()


def opens_plainly(sql: str) -> bool:
    """True when the statement may carry its transaction's ``BEGIN`` in its message: one
    statement (no ``;``), no NUL or backslash (psycopg2 refuses a NUL; a backslash may draw a
    warning that quotes the text), no ``$1``-style parameter outside literals and comments
    (psycopg 3 sends a statement without parameters in the simple protocol, where the server
    answers "there is no parameter $1", but in a pipeline in the extended one, where it answers
    otherwise), starting with one of :data:`OPENING_WORDS`."""
    return (
        ";" not in sql
        and "\x00" not in sql
        and "\\" not in sql
        and first_word(sql) in OPENING_WORDS
        and not any(kind == "parameter" for kind, _ in _tokens_cached(sql) or ())
    )


def plain_read(sql: str) -> bool | None:
    """True when the statement only reads and calls no function but :data:`_PURE_FUNCTIONS`;
    None when it changes nothing a transaction holds (a savepoint, a setting); False
    otherwise."""
    return _plain_read(sql)


@functools.lru_cache(maxsize=1024)
def _plain_read(sql: str) -> bool | None:
    tokens = _tokens_cached(sql)
    if not tokens or tokens[0][0] != "word":
        return False
    first = tokens[0][1].upper()
    if first in _NEUTRAL_WORDS or (
        first == "ROLLBACK" and len(tokens) > 1 and tokens[1][1].upper() == "TO"
    ):
        return None
    if first not in _READ_WORDS or ";" in sql or "\\" in sql:
        return False  # several statements; a backslash, which some literals read as an escape
    for index, (kind, text) in enumerate(tokens):
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if kind == "word":
            word = text.upper()
            if word in _WRITE_WORDS:
                return False
            if following != "(" or word in _NOT_CALLS:
                continue
            qualified = index > 0 and tokens[index - 1][1] == "."
            after_cast = index > 0 and tokens[index - 1][0] == "cast"
            if qualified or (text.lower() not in _PURE_FUNCTIONS and not after_cast):
                return False
        elif kind == "quoted" and following == "(":
            return False  # a function named with quotes: not one of the built-ins
    return True


@functools.lru_cache(maxsize=1024)
def _tokens_cached(sql: str) -> list[tuple[str, str]] | None:
    return _tokens(sql)
