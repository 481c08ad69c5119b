"""psycopg2's C layout, read through its own attribute descriptors and checked: the fields
fast BEGIN reads and writes (the transaction flag, the count of ended transactions, an error's
text and libpq result), and psycopg2's own libpq.

Every place is located at import from psycopg2's ``PyMemberDef`` declarations and used only
when they match what psycopg2 2.9 declares; :data:`FOUND` is false otherwise, and fast BEGIN
stays off.
"""

from __future__ import annotations

import ctypes
import sys
import typing as t

import psycopg2  # type: ignore[import-untyped]
import psycopg2._psycopg as _psycopg_module  # type: ignore[import-untyped]
import psycopg2.extensions as ext  # type: ignore[import-untyped]

_PG_DIAG_SQLSTATE, _PG_DIAG_STATEMENT_POSITION = ord("C"), ord("P")


class _MemberDef(ctypes.Structure):
    # CPython's PyMemberDef: what a read-only C attribute such as ``status`` is made of.
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("type", ctypes.c_int),
        ("offset", ctypes.c_ssize_t),
        ("flags", ctypes.c_int),
        ("doc", ctypes.c_char_p),
    ]


_T_INT, _T_LONG, _T_OBJECT = 1, 2, 6  # structmember.h
_READONLY = 1
_POINTER = ctypes.sizeof(ctypes.c_void_p)


def _member_offset(owner: type, member: str, kind: int) -> int | None:
    """Where instances of the C type ``owner`` keep the read-only attribute ``member``.

    A member descriptor (``PyMemberDescrObject``) is an object header, three pointers (type,
    name, qualified name) and a pointer to the ``PyMemberDef`` psycopg2 declared. The result
    is used only when that declaration names ``member``, of C type ``kind``, read-only.
    """
    descriptor = owner.__dict__.get(member)
    if sys.implementation.name != "cpython" or type(descriptor).__name__ != "member_descriptor":
        return None
    header = object.__basicsize__ + 3 * _POINTER
    member_pointer = ctypes.c_void_p.from_address(id(descriptor) + header).value
    if not member_pointer:
        return None
    declared = _MemberDef.from_address(member_pointer)
    if (
        declared.name != member.encode()
        or declared.type != kind
        or not declared.flags & _READONLY
        or not 0 < declared.offset < owner.__basicsize__
    ):
        return None
    return int(declared.offset)


def _mark_offset(status_offset: int | None) -> int | None:
    """Where psycopg2 counts ended transactions (``mark``); None when it cannot be verified.

    ``mark`` has no attribute: psycopg2's ``connectionObject`` declares it as the one ``long``
    between ``closed`` and ``status``, which have. Used only when those two are exactly one
    ``long`` apart.
    """
    closed_offset = _member_offset(ext.connection, "closed", _T_LONG)
    size = ctypes.sizeof(ctypes.c_long)
    if status_offset is None or closed_offset is None or closed_offset + 2 * size != status_offset:
        return None
    return closed_offset + size


def _error_result_offset() -> int | None:
    """Where a psycopg2 error keeps its libpq result (``pgres``), which ``diag`` reads.

    psycopg2's ``errorObject`` declares ``pgerror``, ``pgcode`` and ``cursor`` (attributes),
    then a decoder and the result, and nothing after: used only when the three attributes are
    consecutive and the object ends one decoder and one result after ``cursor``.
    """
    offsets = [
        _member_offset(psycopg2.Error, n, _T_OBJECT) for n in ("pgerror", "pgcode", "cursor")
    ]
    if None in offsets:
        return None
    pgerror, pgcode, cursor = t.cast(list[int], offsets)
    if pgcode != pgerror + _POINTER or cursor != pgcode + _POINTER:
        return None
    if psycopg2.Error.__basicsize__ != cursor + 3 * _POINTER:
        return None
    return cursor + 2 * _POINTER


def _libpq() -> t.Any:
    """psycopg2's own libpq (the one that made its connections), or None."""
    try:
        # PyDLL: calls keep the GIL. Each is a few microseconds and never blocks (the wait
        # for a reply is a poll()); CDLL would release and retake the GIL per call, and
        # under load every release lets another request thread in.
        lib = ctypes.PyDLL(_psycopg_module.__file__)
        pointer = ctypes.c_void_p
        for function_name, result, arguments in (
            ("PQsendQuery", ctypes.c_int, [pointer, ctypes.c_char_p]),
            ("PQconsumeInput", ctypes.c_int, [pointer]),
            ("PQisBusy", ctypes.c_int, [pointer]),
            ("PQgetResult", pointer, [pointer]),
            ("PQresultStatus", ctypes.c_int, [pointer]),
            ("PQresultErrorMessage", ctypes.c_char_p, [pointer]),
            ("PQresultErrorField", pointer, [pointer, ctypes.c_int]),
            ("PQclear", None, [pointer]),
            ("PQtransactionStatus", ctypes.c_int, [pointer]),
            ("PQerrorMessage", ctypes.c_char_p, [pointer]),
        ):
            function = getattr(lib, function_name)
            function.restype, function.argtypes = result, arguments
    except (OSError, AttributeError, ImportError):
        return None
    return lib


_STATUS_OFFSET = _member_offset(ext.connection, "status", _T_INT)
_MARK_OFFSET = _mark_offset(_STATUS_OFFSET)
_PGERROR_OFFSET = _member_offset(psycopg2.Error, "pgerror", _T_OBJECT)
_RESULT_OFFSET = _error_result_offset()
LIB = _libpq()
_base_status = ext.connection.status  # psycopg2's own attribute, past any subclass

#: True when every field could be located and checked.
FOUND = None not in (_STATUS_OFFSET, _MARK_OFFSET, _PGERROR_OFFSET, _RESULT_OFFSET, LIB)


def set_status(connection: t.Any, status: int) -> None:
    """Set psycopg2's own transaction flag, as its ``BEGIN`` / ``ROLLBACK`` set it."""
    assert _STATUS_OFFSET is not None
    field = ctypes.c_int.from_address(id(connection) + _STATUS_OFFSET)
    if field.value != _base_status.__get__(connection):  # not the layout checked at import
        raise RuntimeError("psycopg2's connection status field moved; disable DB_FAST_BEGIN")
    field.value = status


def pointer(address: int) -> t.Any:
    """A C pointer for libpq's functions (a ``PGconn *`` psycopg2 gives as an int)."""
    return ctypes.c_void_p(address)


def mark(connection: t.Any) -> int:
    """psycopg2's count of the transactions it ended on ``connection`` (0 when not found)."""
    if _MARK_OFFSET is None:
        return 0
    return int(ctypes.c_long.from_address(id(connection) + _MARK_OFFSET).value)


def end_transaction(connection: t.Any) -> None:
    """Record a transaction as ended, as psycopg2's ``rollback()`` does once it sent ``ROLLBACK``:
    one more ended transaction (which makes its named cursors invalid) and status "ready"."""
    assert _MARK_OFFSET is not None
    set_status(connection, ext.STATUS_READY)  # first: it checks the layout it writes to
    ctypes.c_long.from_address(id(connection) + _MARK_OFFSET).value += 1


def set_pgerror(exc: t.Any, text: str) -> None:
    # pickle's __setstate__ would also drop the error's cursor: the field itself is replaced.
    assert _PGERROR_OFFSET is not None
    address = id(exc) + _PGERROR_OFFSET
    old = ctypes.c_void_p.from_address(address).value
    if old != id(exc.pgerror):  # not the layout checked at import
        return
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(text))
    ctypes.c_void_p.from_address(address).value = id(text)
    ctypes.pythonapi.Py_DecRef(ctypes.cast(old, ctypes.py_object))


def set_result_position(exc: t.Any, position: int) -> bool:
    """Write ``position`` into the error's libpq result, where ``diag`` reads it."""
    assert _RESULT_OFFSET is not None
    result = ctypes.c_void_p.from_address(id(exc) + _RESULT_OFFSET).value
    if not result:
        return False
    code = LIB.PQresultErrorField(result, _PG_DIAG_SQLSTATE)
    if not code or ctypes.string_at(code).decode() != exc.pgcode:
        return False  # not the layout checked at import
    field = LIB.PQresultErrorField(result, _PG_DIAG_STATEMENT_POSITION)
    digits = str(position).encode()
    if not field or len(digits) > len(ctypes.string_at(field)):
        return False
    ctypes.memmove(field, digits + b"\0", len(digits) + 1)  # fewer or as many digits
    return True
