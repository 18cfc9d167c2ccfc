"""A SQL step's statement result as JSON (docs/engine.md#sql-step-results).

``{"rows":[{col:value,...},...],"row_count":n}``, compact, keys in column order, with each
column's PostgreSQL type mapped to JSON (numeric as exact text, timestamps in RFC 3339...).
An unsupported column type fails the step with pg_durable's message.

Results are read in **binary** format: binary values do not depend on the session's
DateStyle, TimeZone, extra_float_digits or lc_* settings, which a role or database may set.
:func:`configure_connection` registers the binary loaders that turn each supported type
into its final JSON-ready Python value; :class:`ResultBuilder` assembles the text a batch of
rows at a time and stops at ``pg_durable.max_result_bytes``; :func:`check_columns` refuses
results that have no faithful JSON form (duplicate column names, unsupported types).

A step's result is read as it arrives, on a connection passed to
:func:`configure_connection` once, by ``pgdurable.worker.statement``.
"""

from __future__ import annotations

import json
import math
import re
import struct
import uuid
from collections.abc import Sequence
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from fractions import Fraction
from typing import Any

import psycopg
from psycopg.abc import AdaptContext
from psycopg.adapt import Buffer, Loader
from psycopg.pq import Format
from psycopg.types.bool import BoolBinaryLoader
from psycopg.types.numeric import Int2BinaryLoader, Int4BinaryLoader, Int8BinaryLoader

from ..core.interpreter import DEFAULT_MAX_BYTES

__all__ = [
    "DEFAULT_MAX_RESULT_BYTES",
    "MAX_RESULT_BYTES_SETTING",
    "NO_RESULT_SET",
    "SUPPORTED_TYPES",
    "TYPE_NAME_QUERY",
    "DuplicateColumn",
    "ResultBuilder",
    "ResultError",
    "ResultTooLarge",
    "UnsupportedColumnType",
    "check_columns",
    "configure_connection",
    "parse_size",
    "type_display_name",
    "unsupported_type",
]

NO_RESULT_SET = '{"rows":[],"row_count":0}'
"""The result of a statement that returns no rows at all (DML without RETURNING, DDL)."""


MAX_RESULT_BYTES_SETTING = "pg_durable.max_result_bytes"
DEFAULT_MAX_RESULT_BYTES = DEFAULT_MAX_BYTES
"""The default of ``pg_durable.max_result_bytes`` (10 MiB, as HTTP responses' default)."""

_MEMORY_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3, "tb": 1024**4}


def parse_size(text: str | None, default: int = DEFAULT_MAX_RESULT_BYTES) -> int:
    """A size setting (``pg_durable.max_result_bytes``, ``pg_durable.max_state_bytes``):
    bytes, or PostgreSQL's memory units (``'64kB'``, ``'10MB'``, ``'1GB'``). Unset or not a
    positive size: ``default``."""
    if text is None:
        return default
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _MEMORY_UNITS | {"": 1}:
        return default
    value = int(match.group(1)) * _MEMORY_UNITS.get(match.group(2).lower(), 1)
    return value if value > 0 else default


class ResultError(Exception):
    """A result that cannot be recorded as JSON; fails the step."""


class ResultTooLarge(ResultError):
    """A result bigger than ``pg_durable.max_result_bytes``; fails the step."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        super().__init__(
            f"SQL step result too large: more than {max_bytes} bytes ({MAX_RESULT_BYTES_SETTING})"
        )


class DuplicateColumn(ResultError):
    """Two result columns with one name: a JSON object could keep only one of them."""

    def __init__(self, column: str):
        self.column = column
        super().__init__(
            f"Duplicate column name '{column}' in the statement's result: give each column its "
            "own name (AS ...)"
        )


class UnsupportedColumnType(ResultError):
    """A result column whose type has no JSON mapping; fails the step."""

    def __init__(self, type_name: str, column: str):
        self.type_name = type_name
        self.column = column
        super().__init__(
            f"Unsupported column type '{type_name}' for column '{column}'. Supported types: "
            "bool, int2, int4, int8, float4, float8, text, varchar, numeric, uuid, timestamptz, "
            "timestamp, date, jsonb, json, void."
        )


# -- loaders: binary wire format -> JSON-ready Python values -----------------------------------

_F4 = struct.Struct("!f")
_F8 = struct.Struct("!d")
_I4 = struct.Struct("!i")
_I8 = struct.Struct("!q")
_U4 = struct.Struct("!I")  # the bits of a float4
_F4_INFINITY_BITS = 0x7F800000
_NUMERIC_HEAD = struct.Struct("!hhHH")

# PostgreSQL's binary epoch is 2000-01-01; "infinity" is the extreme integer of each type.
_EPOCH_DAYS_FROM_1970 = 10_957
_USECS_PER_DAY = 86_400_000_000
_INFINITIES = {
    8: {2**63 - 1: "infinity", -(2**63): "-infinity"},
    4: {2**31 - 1: "infinity", -(2**31): "-infinity"},
}

_NUMERIC_NEG = 0x4000
_NUMERIC_SPECIAL = {0xC000: "NaN", 0xD000: "Infinity", 0xF000: "-Infinity"}


class _EncodedLoader(Loader):
    """Base of the loaders of text-based values, sent in the connection's encoding."""

    format = Format.BINARY

    def __init__(self, oid: int, context: AdaptContext | None = None):
        super().__init__(oid, context)
        encoding = self.connection.info.encoding if self.connection else "utf-8"
        # SQL_ASCII means "no conversion": the bytes are whatever was stored; read as UTF-8.
        self._encoding = "utf-8" if encoding == "ascii" else encoding

    def decode(self, data: Buffer) -> str:
        return bytes(data).decode(self._encoding)


class _TextLoader(_EncodedLoader):
    """text, varchar, bpchar, name: a string."""

    def load(self, data: Buffer) -> str:
        return self.decode(data)


class _JsonLoader(_EncodedLoader):
    """json: the JSON value itself."""

    def load(self, data: Buffer) -> object:
        return _parse_json(self.decode(data))


class _JsonbLoader(_EncodedLoader):
    """jsonb: a version byte (1), then the JSON text."""

    def load(self, data: Buffer) -> object:
        return _parse_json(self.decode(bytes(data)[1:]))


class _Float4Loader(Loader):
    """float4: the shortest decimal that reads back as the same float4 (as psql shows it)."""

    format = Format.BINARY

    def load(self, data: Buffer) -> float | None:
        (value,) = _F4.unpack(data)
        return _shortest_float4(value) if math.isfinite(value) else None


class _Float8Loader(Loader):
    """float8; NaN and ±Infinity have no JSON spelling and become null."""

    format = Format.BINARY

    def load(self, data: Buffer) -> float | None:
        (value,) = _F8.unpack(data)
        return value if math.isfinite(value) else None


class _NumericLoader(Loader):
    """numeric: the exact decimal text with the value's scale, e.g. "100.50"."""

    format = Format.BINARY

    def load(self, data: Buffer) -> str:
        return _numeric_text(bytes(data))


class _UuidLoader(Loader):
    format = Format.BINARY

    def load(self, data: Buffer) -> str:
        return str(uuid.UUID(bytes=bytes(data)))


class _TimestamptzLoader(Loader):
    format = Format.BINARY

    def load(self, data: Buffer) -> str:
        (usecs,) = _I8.unpack(data)
        return _INFINITIES[8].get(usecs) or _format_timestamp(usecs) + "+00:00"


class _TimestampLoader(Loader):
    format = Format.BINARY

    def load(self, data: Buffer) -> str:
        (usecs,) = _I8.unpack(data)
        return _INFINITIES[8].get(usecs) or _format_timestamp(usecs)


class _DateLoader(Loader):
    format = Format.BINARY

    def load(self, data: Buffer) -> str:
        (days,) = _I4.unpack(data)
        return _INFINITIES[4].get(days) or _format_date(days)


class _VoidLoader(Loader):
    format = Format.BINARY

    def load(self, data: Buffer) -> None:
        return None


# Built-in type OIDs are fixed by PostgreSQL (pg_type.dat); psycopg's registry lacks void.
_LOADERS: dict[int, type[Loader]] = {
    16: BoolBinaryLoader,  # bool
    21: Int2BinaryLoader,  # int2
    23: Int4BinaryLoader,  # int4
    20: Int8BinaryLoader,  # int8
    700: _Float4Loader,  # float4
    701: _Float8Loader,  # float8
    25: _TextLoader,  # text
    1043: _TextLoader,  # varchar
    1042: _TextLoader,  # bpchar
    19: _TextLoader,  # name
    1700: _NumericLoader,  # numeric
    2950: _UuidLoader,  # uuid
    1184: _TimestamptzLoader,  # timestamptz
    1114: _TimestampLoader,  # timestamp
    1082: _DateLoader,  # date
    114: _JsonLoader,  # json
    3802: _JsonbLoader,  # jsonb
    2278: _VoidLoader,  # void
}

SUPPORTED_TYPES: frozenset[int] = frozenset(_LOADERS)
"""OIDs of the column types a SQL step result may have."""


def configure_connection(conn: psycopg.AsyncConnection[Any] | psycopg.Connection[Any]) -> None:
    """Register on ``conn`` the binary loaders that step results are read with.

    Only binary-format results are affected; text-format queries on the same connection
    (bookkeeping) load as usual.
    """
    for oid, loader in _LOADERS.items():
        conn.adapters.register_loader(oid, loader)


# -- the I/O edge ------------------------------------------------------------------------------

TYPE_NAME_QUERY = (
    "SELECT t.typname, e.typname FROM pg_catalog.pg_type t"
    " LEFT JOIN pg_catalog.pg_type e ON e.typarray = t.oid"
    " WHERE t.oid = %s::pg_catalog.oid"
)
"""The name of an unsupported column's type, and of its element type if it is an array."""


def unsupported_type(column: str, oid: int, names: Sequence[Any] | None) -> UnsupportedColumnType:
    """The error of an unsupported column, given what :data:`TYPE_NAME_QUERY` found."""
    if names is None:  # the type vanished meanwhile (a dropped enum): no name to give
        return UnsupportedColumnType(f"OID {oid}", column)
    typname, element = names
    return UnsupportedColumnType(type_display_name(typname, element), column)


# -- signal payloads --------------------------------------------------------------------------


# -- pure parts --------------------------------------------------------------------------------

# Names as pg_durable's driver (sqlx) displays them where they differ from typname.upper().
_DRIVER_TYPE_NAMES = {"bpchar": "CHAR", "char": '"CHAR"'}


def type_display_name(typname: str, element: str | None) -> str:
    """The upper-case name of a type in the unsupported-type message, e.g. ``INTERVAL``,
    ``INT4[]`` (``element`` is the element's typname when the type is an array)."""
    base = element if element is not None else typname
    shown = _DRIVER_TYPE_NAMES.get(base, base.upper())
    return f"{shown}[]" if element is not None else shown


def check_columns(names: Sequence[str], oids: Sequence[int]) -> int | None:
    """Check a result's columns before any row is read: raises :class:`DuplicateColumn` if
    two share a name; returns the index of the first column (in column order) whose type has
    no JSON mapping, if any (naming its type needs the catalog).

    A JSON object cannot hold two members of one name; pg_durable keeps the last value of a
    duplicate and loses the other silently; a step fails instead.
    """
    if len(set(names)) != len(names):
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise DuplicateColumn(name)
            seen.add(name)
    for index, oid in enumerate(oids):
        if oid not in SUPPORTED_TYPES:
            return index
    return None


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_ROWS_START = '{"rows":['
# Rows are loaded a batch at a time and the size checked after each batch: at most this many
# bytes of JSON (estimated from the rows so far) past the limit before the step fails.
_BATCH_BYTES = 64 * 1024
_MAX_BATCH_ROWS = 1024


class ResultBuilder:
    """``{"rows":[...],"row_count":n}`` assembled a batch of rows at a time.

    Raises :class:`ResultTooLarge` as soon as the text passes ``max_bytes`` (UTF-8 bytes,
    None: no limit), so a caller that feeds rows as they arrive never holds more than about
    ``max_bytes`` of result. The text is byte-identical to ``json.dumps`` of the whole
    result with compact separators, keys in column order.
    """

    def __init__(self, names: Sequence[str], max_bytes: int | None = None):
        self._names = list(names)
        self._max_bytes = max_bytes
        self._parts: list[str] = []
        self._bytes = len(_ROWS_START)
        self._count = 0

    @property
    def row_count(self) -> int:
        """Rows added so far."""
        return self._count

    def add(self, rows: Sequence[Sequence[object]]) -> None:
        """Append loaded rows (tuples in column order, from the loaders of
        :func:`configure_connection`)."""
        if not rows:
            return
        names = self._names
        text = _ENCODER.encode([dict(zip(names, row, strict=True)) for row in rows])[1:-1]
        self._bytes += (len(text) if text.isascii() else len(text.encode())) + (
            1 if self._parts else 0  # the comma before this batch
        )
        self._count += len(rows)
        if self._max_bytes is not None and self._bytes > self._max_bytes:
            raise ResultTooLarge(self._max_bytes)
        self._parts.append(text)

    def batch_rows(self) -> int:
        """How many rows to load next so that one batch is about ``_BATCH_BYTES`` of JSON,
        judging by the rows so far (one row at first: rows may be of any width)."""
        if not self._count:
            return 1
        average = max((self._bytes - len(_ROWS_START)) // self._count, 1)
        return max(1, min(_MAX_BATCH_ROWS, _BATCH_BYTES // average))

    def text(self) -> str:
        """The result JSON (checked against ``max_bytes`` once more, with its row count)."""
        end = f'],"row_count":{self._count}}}'
        if self._max_bytes is not None and self._bytes + len(end) > self._max_bytes:
            raise ResultTooLarge(self._max_bytes)
        return _ROWS_START + ",".join(self._parts) + end


def _parse_json(text: str) -> object:
    # json/jsonb hold JSON by construction; a number beyond the float range (json keeps the
    # text, jsonb its numeric, e.g. 1e400) has no JSON spelling once parsed: fail the step.
    return json.loads(text, parse_float=_finite_float)


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ResultError(f"JSON number out of range: {text}")
    return value


def _shortest_float4(value: float) -> float:
    """The float4 ``value`` (widened to a float) as the decimal PostgreSQL prints for it.

    Widening gives e.g. 1.100000023841858 where PostgreSQL prints 1.1: the fewest
    significant digits strictly inside the float4's rounding interval (PostgreSQL's Ryu
    never relies on an exact tie with a neighbour), and of those the closest to the value
    (ties to an even last digit).
    """
    magnitude = abs(value)
    if magnitude == 0:
        return value
    bits = _U4.unpack(_F4.pack(magnitude))[0]
    exact = Fraction(magnitude)
    previous = Fraction(_float4_from_bits(bits - 1))
    lower = (exact + previous) / 2
    if bits + 1 < _F4_INFINITY_BITS:
        upper = (exact + Fraction(_float4_from_bits(bits + 1))) / 2
    else:  # the largest float4: the gap above it is as wide as the one below
        upper = exact + (exact - previous) / 2
    decimal = Decimal(magnitude)
    for digits in range(1, 10):
        quantum = Decimal(1).scaleb(decimal.adjusted() - digits + 1)
        candidates = [decimal.quantize(quantum, rounding=r) for r in (ROUND_FLOOR, ROUND_CEILING)]
        inside = [c for c in candidates if lower < Fraction(c) < upper]
        if inside:
            # the closest to the value; on a tie the one ending in an even digit, as Ryu does
            best = min(
                inside, key=lambda c: (abs(Fraction(c) - exact), c.as_tuple().digits[-1] % 2)
            )
            return math.copysign(float(best), value)
    return value


def _float4_from_bits(bits: int) -> float:
    return float(_F4.unpack(_U4.pack(bits))[0])


def _numeric_text(data: bytes) -> str:
    """The text of a binary numeric: base-10000 digits, a weight and a display scale."""
    ndigits, weight, sign, dscale = _NUMERIC_HEAD.unpack_from(data)
    if sign in _NUMERIC_SPECIAL:
        return _NUMERIC_SPECIAL[sign]
    digits = struct.unpack_from(f"!{ndigits}H", data, _NUMERIC_HEAD.size)

    def group(index: int) -> int:  # the digit at 10000**(weight - index); zeros outside
        return digits[index] if 0 <= index < ndigits else 0

    if weight < 0:
        integer = "0"
    else:
        integer = str(group(0)) + "".join(f"{group(i):04d}" for i in range(1, weight + 1))
    text = "-" + integer if sign == _NUMERIC_NEG else integer
    if dscale > 0:
        groups = (dscale + 3) // 4
        fraction = "".join(f"{group(weight + i):04d}" for i in range(1, groups + 1))
        text += "." + fraction[:dscale]
    return text


def _format_timestamp(usecs: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS[.fff|.ffffff]`` of microseconds since 2000-01-01 00:00.

    Fractional seconds as chrono prints them (pg_durable's RFC 3339 rendering): none when
    zero, else the shortest of 3, 6 or 9 digits that is exact.
    """
    days, usec_of_day = divmod(usecs, _USECS_PER_DAY)
    seconds, fraction = divmod(usec_of_day, 1_000_000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if fraction == 0:
        frac = ""
    elif fraction % 1000 == 0:
        frac = f".{fraction // 1000:03d}"
    else:
        frac = f".{fraction:06d}"
    return f"{_format_date(days)}T{hours:02d}:{minutes:02d}:{secs:02d}{frac}"


def _format_date(days: int) -> str:
    """``YYYY-MM-DD`` of days since 2000-01-01 (proleptic Gregorian, 1 BC is year 0).

    Years outside 0..9999 get a sign and at least four digits (``-0044``, ``+10000``), as
    chrono writes them.
    """
    year, month, day = _civil_from_days(days + _EPOCH_DAYS_FROM_1970)
    shown = f"{year:04d}" if 0 <= year <= 9999 else f"{year:+05d}"
    return f"{shown}-{month:02d}-{day:02d}"


def _civil_from_days(days: int) -> tuple[int, int, int]:
    """(year, month, day) of days since 1970-01-01, for any year.

    Howard Hinnant's algorithm: count in 400-year eras of a calendar starting on March 1,
    so the leap day is the last day of the year.
    """
    shifted = days + 719_468  # days since 0000-03-01
    era = shifted // 146_097
    day_of_era = shifted - era * 146_097
    year_of_era = (
        day_of_era - day_of_era // 1460 + day_of_era // 36_524 - day_of_era // 146_096
    ) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    month_index = (5 * day_of_year + 2) // 153  # 0 = March
    day = day_of_year - (153 * month_index + 2) // 5 + 1
    month = month_index + 3 if month_index < 10 else month_index - 9
    year = year_of_era + era * 400 + (1 if month <= 2 else 0)
    return year, month, day
