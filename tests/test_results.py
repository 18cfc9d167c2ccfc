"""SQL step results as JSON (docs/engine.md#sql-step-results), against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import struct
import time
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from typing import Any

import psycopg
import pytest
from conftest import App, ThreadWorker

from pgdurable.worker import results
from pgdurable.worker.results import (
    NO_RESULT_SET,
    DuplicateColumn,
    ResultError,
    UnsupportedColumnType,
    configure_connection,
    type_display_name,
)
from pgdurable.worker.statement import run_statement

Conn = psycopg.Connection[Any]

SUPPORTED = (
    "Supported types: bool, int2, int4, int8, float4, float8, text, varchar, numeric, uuid, "
    "timestamptz, timestamp, date, jsonb, json, void."
)


class StepSession:
    """A session as a SQL step's: its statements' results read as the worker reads them
    (``run_statement``: one statement, extended protocol, binary results, read as they
    arrive); ``execute`` runs other statements in the same session (SET, DDL)."""

    def __init__(self, dsn: str, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn = self.loop.run_until_complete(
            psycopg.AsyncConnection.connect(dsn, autocommit=True, **options)
        )
        configure_connection(self.conn)

    def run(self, sql: str) -> str:
        statement = sql.encode(self.conn.info.encoding)
        text, _ = self.loop.run_until_complete(run_statement(self.conn, statement, 2**40))
        return text

    def execute(self, query: str) -> list[tuple[Any, ...]]:
        async def rows() -> list[tuple[Any, ...]]:
            cur = await self.conn.execute(query)
            return await cur.fetchall() if cur.description else []

        return self.loop.run_until_complete(rows())

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


@pytest.fixture
def db(dsn: str) -> Iterator[StepSession]:
    session = StepSession(dsn)
    yield session
    session.close()


def run(session: StepSession, sql: str) -> str:
    """What a SQL step does with ``sql``: its result JSON."""
    return session.run(sql)


def rows(conn: StepSession, sql: str) -> list[dict[str, Any]]:
    result = json.loads(run(conn, sql))
    assert result["row_count"] == len(result["rows"])
    return result["rows"]  # type: ignore[no-any-return]


def value(conn: StepSession, sql: str) -> Any:
    (row,) = rows(conn, sql)
    (v,) = row.values()
    return v


# -- the envelope ------------------------------------------------------------------------------


def test_select_one_is_compact_and_named_question_column(db: StepSession) -> None:
    assert run(db, "SELECT 1") == '{"rows":[{"?column?":1}],"row_count":1}'
    assert run(db, "SELECT count(*) FROM generate_series(1, 3)") == (
        '{"rows":[{"count":3}],"row_count":1}'
    )


def test_keys_follow_column_order(db: StepSession) -> None:
    assert run(db, "SELECT 2 AS z, 1 AS a, 3 AS m") == (
        '{"rows":[{"z":2,"a":1,"m":3}],"row_count":1}'
    )


DUPLICATE_A = (
    "Duplicate column name 'a' in the statement's result: give each column its own name (AS ...)"
)


def test_duplicate_column_names_fail_instead_of_losing_a_value(db: StepSession) -> None:
    # pg_durable keeps the last value silently; a JSON object cannot hold both.
    for sql in (
        "SELECT 1 AS a, 2 AS a",
        "SELECT 1 AS a, 2 AS b, 3 AS a",
        "SELECT 1 AS a, 2 AS a WHERE false",
    ):
        with pytest.raises(DuplicateColumn) as info:
            run(db, sql)
        assert str(info.value) == DUPLICATE_A
    with pytest.raises(DuplicateColumn, match="'a'"):
        run(db, "SELECT 1 AS a, NULL::int AS a")
    # Names differing in case are different columns.
    assert run(db, 'SELECT 1 AS a, 2 AS "A"') == '{"rows":[{"a":1,"A":2}],"row_count":1}'


def test_duplicate_column_names_fail_the_step(app: Any, worker: Any) -> None:
    instance, status = app.run("'SELECT 1 AS a, 2 AS a'")
    assert status == "failed"
    assert app.failure(instance) == DUPLICATE_A


def test_several_rows(db: StepSession) -> None:
    assert run(db, "SELECT g AS n FROM generate_series(1, 3) g") == (
        '{"rows":[{"n":1},{"n":2},{"n":3}],"row_count":3}'
    )


def test_zero_rows(db: StepSession) -> None:
    assert run(db, "SELECT 1 AS a WHERE false") == '{"rows":[],"row_count":0}'


def test_zero_columns(db: StepSession) -> None:
    assert run(db, "SELECT FROM generate_series(1, 2)") == '{"rows":[{},{}],"row_count":2}'


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE t (id int)",
        "DO $$ BEGIN PERFORM 1; END $$",
        "SET work_mem = '8MB'",
        "CREATE PROCEDURE p() LANGUAGE sql AS $$ SELECT 1 $$",
    ],
)
def test_statements_without_result_set(db: Conn, sql: str) -> None:
    assert run(db, sql) == NO_RESULT_SET == '{"rows":[],"row_count":0}'


def test_dml_counts_returned_rows_not_affected_rows(db: StepSession) -> None:
    db.execute("CREATE TABLE t (id int, name text)")
    assert run(db, "INSERT INTO t SELECT g, 'n' FROM generate_series(1, 3) g") == NO_RESULT_SET
    assert run(db, "UPDATE t SET name = 'x'") == NO_RESULT_SET
    assert run(db, "UPDATE t SET name = 'y' WHERE id = 2 RETURNING id, name") == (
        '{"rows":[{"id":2,"name":"y"}],"row_count":1}'
    )
    assert run(db, "DELETE FROM t WHERE id > 5 RETURNING id") == '{"rows":[],"row_count":0}'
    assert run(db, "DELETE FROM t") == NO_RESULT_SET


def test_call_without_and_with_out_parameters(db: StepSession) -> None:
    db.execute("CREATE PROCEDURE nothing() LANGUAGE sql AS $$ SELECT 1 $$")
    db.execute("CREATE PROCEDURE answer(INOUT x int) LANGUAGE plpgsql AS $$ BEGIN x := 42; END $$")
    assert run(db, "CALL nothing()") == NO_RESULT_SET
    assert run(db, "CALL answer(0)") == '{"rows":[{"x":42}],"row_count":1}'


def test_unicode_and_quotes_in_values_and_column_names(db: StepSession) -> None:
    out = run(db, """SELECT 'O''Brien "q" \\ é ✓ 日本 😀' AS "it's ""q"" é" """)
    assert out == (
        '{"rows":[{"it\'s \\"q\\" é":"O\'Brien \\"q\\" \\\\ é ✓ 日本 😀"}],"row_count":1}'
    )
    assert value(db, "SELECT E'tab\\tnew\\nline'") == "tab\tnew\nline"


def test_multiple_statements_are_rejected_by_the_extended_protocol(db: StepSession) -> None:
    with pytest.raises(psycopg.errors.SyntaxError, match="multiple commands"):
        run(db, "SELECT 1; SELECT 2")


def test_large_result(db: StepSession) -> None:
    out = run(db, "SELECT g AS id, 'row ' || g AS name FROM generate_series(1, 100000) g")
    result = json.loads(out)
    assert result["row_count"] == 100_000
    assert len(result["rows"]) == 100_000
    assert result["rows"][0] == {"id": 1, "name": "row 1"}
    assert result["rows"][-1] == {"id": 100_000, "name": "row 100000"}
    assert out.endswith('{"id":100000,"name":"row 100000"}],"row_count":100000}')


# -- typed columns -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("true", True),
        ("false", False),
        ("NULL::bool", None),
        ("1::int2", 1),
        ("(-32768)::int2", -32768),
        ("2147483647::int4", 2147483647),
        ("(-9223372036854775808)::int8", -9223372036854775808),
        ("NULL::int8", None),
        ("1.5::float8", 1.5),
        ("0.1::float8", 0.1),
        ("(-0.0)::float8", -0.0),
        ("1e300::float8", 1e300),
        ("'NaN'::float8", None),
        ("'Infinity'::float8", None),
        ("'-Infinity'::float8", None),
        ("1.5::float4", 1.5),
        ("1.1::float4", 1.1),
        ("'NaN'::float4", None),
        ("'Infinity'::float4", None),
        ("'-Infinity'::float4", None),
        ("NULL::float4", None),
        ("'hello'::text", "hello"),
        ("''::text", ""),
        ("'v'::varchar(10)", "v"),
        ("'ab'::char(4)", "ab  "),
        ("'ab'::bpchar", "ab"),
        ("'nm'::name", "nm"),
        ("NULL::text", None),
        ("'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'::uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        ("NULL::uuid", None),
        ("'2026-03-01'::date", "2026-03-01"),
        ("'infinity'::date", "infinity"),
        ("'-infinity'::date", "-infinity"),
        ("NULL::date", None),
        ("pg_sleep(0)", None),
        ("NULL::void", None),
    ],
)
def test_scalar_types(db: Conn, sql: str, expected: object) -> None:
    got = value(db, f"SELECT {sql} AS v")
    assert got == expected
    assert type(got) is type(expected)


def test_float_values_are_exact_json_numbers(db: StepSession) -> None:
    assert run(db, "SELECT 1.1::float4 AS a, 0.1::float8 AS b, 3::float8 AS c") == (
        '{"rows":[{"a":1.1,"b":0.1,"c":3.0}],"row_count":1}'
    )
    assert run(db, "SELECT 'NaN'::float8 AS a") == '{"rows":[{"a":null}],"row_count":1}'


def _float4_samples() -> list[float]:
    """float4 values from bit patterns: random ones, powers of two (where the gap below
    is half the gap above), their neighbours, subnormals and the extremes."""
    rng = random.Random(7)
    patterns = [rng.randrange(1, 0x7F800000) for _ in range(3000)]
    for exponent in range(0, 255):
        patterns += [exponent << 23, (exponent << 23) + 1, max((exponent << 23) - 1, 1)]
    patterns += [1, 2, 3, 0x007FFFFF, 0x7F7FFFFF, 0x7F7FFFFE]
    values = [struct.unpack("!f", struct.pack("!I", p))[0] for p in patterns]
    return values + [-v for v in values[::5]]


def test_float4_renders_as_postgresql_prints_it(db: StepSession) -> None:
    # float4 widened to float8 would read 1.100000023841858; PostgreSQL prints 1.1, and the
    # server's own text is the oracle for every sample.
    samples = _float4_samples()
    literals = ",".join(f"'{v:.9g}'" for v in samples)
    sql = f"SELECT f, f::text AS t FROM unnest(ARRAY[{literals}]::float4[]) f"
    checked = rows(db, sql)
    assert len(checked) == len(samples)
    for row in checked:
        assert row["f"] == float(row["t"]), row["t"]
    assert value(db, "SELECT 1.1::float4") == 1.1
    assert value(db, "SELECT '-2.0608719e+09'::float4") == -2.0608719e09


NUMERICS = [
    "100.50",
    "0",
    "0.00",
    "-1.5",
    "0.0001",
    "-0.001",
    "1000000",
    "10000.0001",
    "12345678901234567890.123456789",
    "99999999",
    "100000000",
    "0.000000000000000000012",
    "1e20",
    "123.4500000",
    "-98765.4321",
    "NaN",
    "Infinity",
    "-Infinity",
]


@pytest.mark.parametrize("text", NUMERICS)
def test_numeric_is_the_exact_server_text(db: Conn, text: str) -> None:
    ((server,),) = db.execute(f"SELECT '{text}'::numeric::text")
    assert value(db, f"SELECT '{text}'::numeric AS n") == server


def test_numeric_examples(db: StepSession) -> None:
    assert run(db, "SELECT 100.50::numeric AS price") == (
        '{"rows":[{"price":"100.50"}],"row_count":1}'
    )
    assert value(db, "SELECT 1e20::numeric") == "100000000000000000000"
    assert value(db, "SELECT NULL::numeric") is None


def test_numeric_matches_server_text_for_random_values(db: StepSession) -> None:
    sql = (
        "SELECT n, n::text AS t FROM (SELECT round(((random() - 0.5) * 10 ^ (random() * 60"
        " - 30))::numeric, (random() * 40)::int - 5) AS n FROM generate_series(1, 3000)) s"
    )
    for row in rows(db, sql):
        assert row["n"] == row["t"]


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        ("2026-03-01 10:00:00+00", "2026-03-01T10:00:00+00:00"),
        ("2026-03-01 10:00:00.123+00", "2026-03-01T10:00:00.123+00:00"),
        ("2026-03-01 10:00:00.12+00", "2026-03-01T10:00:00.120+00:00"),
        ("2026-03-01 10:00:00.1+00", "2026-03-01T10:00:00.100+00:00"),
        ("2026-03-01 10:00:00.123456+00", "2026-03-01T10:00:00.123456+00:00"),
        ("2026-03-01 10:00:00.000001+00", "2026-03-01T10:00:00.000001+00:00"),
        ("2026-03-01 10:00:00.120001+00", "2026-03-01T10:00:00.120001+00:00"),
        ("2026-03-01 15:30:00+05:30", "2026-03-01T10:00:00+00:00"),
        ("2026-03-01 00:30:00-02", "2026-03-01T02:30:00+00:00"),
        ("2000-01-01 00:00:00+00", "2000-01-01T00:00:00+00:00"),
        ("1999-12-31 23:59:59.999999+00", "1999-12-31T23:59:59.999999+00:00"),
        ("1970-01-01 00:00:00+00", "1970-01-01T00:00:00+00:00"),
        ("2024-02-29 12:00:00+00", "2024-02-29T12:00:00+00:00"),
        ("0044-03-15 12:00:00+00 BC", "-0043-03-15T12:00:00+00:00"),
        ("12345-06-07 08:09:10+00", "+12345-06-07T08:09:10+00:00"),
        ("infinity", "infinity"),
        ("-infinity", "-infinity"),
    ],
)
def test_timestamptz(db: Conn, literal: str, expected: str) -> None:
    assert value(db, f"SELECT '{literal}'::timestamptz") == expected


def test_timestamptz_ignores_session_timezone_and_datestyle(db: StepSession) -> None:
    db.execute("SET TimeZone = 'America/New_York'")
    db.execute("SET DateStyle = 'German, DMY'")
    db.execute("SET extra_float_digits = -15")
    out = run(
        db,
        "SELECT '2026-03-01 10:00:00.5+00'::timestamptz AS tz, '2026-03-01 10:00'::timestamp"
        " AS ts, '2026-03-01'::date AS d, 0.1::float8 AS f",
    )
    assert out == (
        '{"rows":[{"tz":"2026-03-01T10:00:00.500+00:00","ts":"2026-03-01T10:00:00",'
        '"d":"2026-03-01","f":0.1}],"row_count":1}'
    )


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        ("2026-03-01 10:00:00", "2026-03-01T10:00:00"),
        ("2026-03-01 10:00:00.5", "2026-03-01T10:00:00.500"),
        ("2026-03-01 10:00:00.123456", "2026-03-01T10:00:00.123456"),
        ("0001-01-01 00:00:00 BC", "0000-01-01T00:00:00"),
        ("infinity", "infinity"),
    ],
)
def test_timestamp_without_zone(db: Conn, literal: str, expected: str) -> None:
    assert value(db, f"SELECT '{literal}'::timestamp") == expected


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        ("0044-03-15 BC", "-0043-03-15"),
        ("0001-01-01 BC", "0000-01-01"),
        ("0001-01-01", "0001-01-01"),
        ("4713-01-01 BC", "-4712-01-01"),
        ("9999-12-31", "9999-12-31"),
        ("10000-01-01", "+10000-01-01"),
        ("5874897-12-31", "+5874897-12-31"),
    ],
)
def test_date_outside_common_years(db: Conn, literal: str, expected: str) -> None:
    assert value(db, f"SELECT '{literal}'::date") == expected


def test_bc_dates_and_timestamps_use_astronomical_year_numbering(db: StepSession) -> None:
    # On purpose: ISO 8601 / RFC 3339 consumers parse year -4712 (= 4713 BC, year 0 = 1 BC),
    # and pg_durable renders it so too; PostgreSQL's own text would be "4713-01-01 BC".
    sql = (
        "SELECT '4713-01-01 BC'::date AS d, '4713-01-01 12:30:00 BC'::timestamp AS ts,"
        " '4713-01-01 12:30:00+00 BC'::timestamptz AS tz, '0001-12-31 BC'::date AS one_bc"
    )
    assert run(db, sql) == (
        '{"rows":[{"d":"-4712-01-01","ts":"-4712-01-01T12:30:00",'
        '"tz":"-4712-01-01T12:30:00+00:00","one_bc":"0000-12-31"}],"row_count":1}'
    )


def test_dates_match_the_server_calendar(db: StepSession) -> None:
    sql = (
        "SELECT d::date AS d, to_char(d, 'YYYY-MM-DD') AS t"
        " FROM generate_series(timestamp '0001-01-01', '3000-12-31', interval '9 days') d"
    )
    checked = rows(db, sql)
    assert len(checked) > 100_000
    for row in checked:
        assert row["d"] == row["t"]


def _chrono_fraction(micros: str) -> str:
    """How chrono writes fractional seconds: none, or 3 or 6 digits, whichever is exact."""
    if int(micros) == 0:
        return ""
    return "." + (micros[:3] if int(micros) % 1000 == 0 else micros)


def test_timestamps_match_the_server_clock(db: StepSession) -> None:
    db.execute("SET TimeZone = 'UTC'")
    sql = (
        "SELECT t AS v, t::timestamptz AS z, to_char(t, 'YYYY-MM-DD\"T\"HH24:MI:SS') AS s,"
        " to_char(t, 'US') AS us FROM (SELECT timestamp '1900-01-01' + random()"
        " * interval '300 years' AS r FROM generate_series(1, 1000)) g,"
        " LATERAL (VALUES (r), (date_trunc('second', r)), (date_trunc('milliseconds', r))) x(t)"
    )
    checked = rows(db, sql)
    assert len(checked) == 3000
    for row in checked:
        expected = row["s"] + _chrono_fraction(row["us"])
        assert row["v"] == expected
        assert row["z"] == expected + "+00:00"


def test_format_date_matches_python_calendar() -> None:
    epoch = date(2000, 1, 1)
    for days in range(-730_119, 2_920_000, 97):  # 0001-01-01 .. 9994
        assert results._format_date(days) == (epoch + timedelta(days=days)).isoformat()


def test_json_and_jsonb(db: StepSession) -> None:
    assert run(db, """SELECT '{"b": 1, "a": [1, 2.5, {"c": null}], "s": "é"}'::json AS j""") == (
        '{"rows":[{"j":{"b":1,"a":[1,2.5,{"c":null}],"s":"é"}}],"row_count":1}'
    )
    # jsonb normalises key order (shorter keys first)
    assert run(db, """SELECT '{"bb": 1, "a": true}'::jsonb AS j""") == (
        '{"rows":[{"j":{"a":true,"bb":1}}],"row_count":1}'
    )
    assert value(db, """SELECT '{"a": 1, "a": 2}'::json""") == {"a": 2}
    assert value(db, "SELECT 'null'::jsonb") is None
    assert value(db, """SELECT '"x"'::jsonb""") == "x"
    assert value(db, """SELECT '"\\u00e9"'::json""") == "é"
    assert value(db, "SELECT '[]'::jsonb") == []
    assert value(db, "SELECT '12345678901234567890'::jsonb") == 12345678901234567890
    assert value(db, "SELECT NULL::jsonb") is None
    assert run(db, "SELECT 'null'::json AS a, NULL::json AS b") == (
        '{"rows":[{"a":null,"b":null}],"row_count":1}'
    )


def test_json_number_beyond_float_range_fails(db: StepSession) -> None:
    for query in ("SELECT '1e400'::json", "SELECT to_jsonb(1e400 + 0.5)"):
        with pytest.raises(ResultError, match="out of range"):
            run(db, query)


def test_a_step_returning_a_huge_jsonb_number_fails_instead_of_retrying_for_ever(
    app: App, worker: ThreadWorker
) -> None:
    """worker/results.py's _finite_float raises ValueError('JSON number out of range') (its
    comment says only json, not jsonb, can hold one: jsonb can). The ValueError escapes the
    step as a task error: the step is retried (attempt 1, 2, ...) and the instance stays
    'running' instead of the step failing."""
    instance = app.start("$$SELECT jsonb_build_object('big', 1e400 + 0.5) AS j$$")
    deadline = time.monotonic() + 20
    status = None
    while time.monotonic() < deadline:
        status = app.conn.execute("SELECT df.status(%s)", (instance,)).fetchone()[0]
        if status in ("failed", "completed"):
            break
        time.sleep(0.2)
    try:
        assert status == "failed", status
    finally:
        app.conn.execute("SELECT df.cancel(%s)", (instance,))


def test_domain_over_supported_type_is_its_base_type(db: StepSession) -> None:
    db.execute("CREATE DOMAIN money2 AS numeric(10, 2)")
    assert value(db, "SELECT 3::money2") == "3.00"


def test_client_encoding_is_honoured(db: StepSession) -> None:
    db.execute("SET client_encoding = 'LATIN1'")
    assert value(db, "SELECT 'é'::text") == "é"
    assert value(db, """SELECT '"é"'::jsonb""") == "é"


# -- unsupported types -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "type_name"),
    [
        ("'1 day'::interval", "INTERVAL"),
        ("ARRAY[1, 2]", "INT4[]"),
        ("ARRAY['a']::text[]", "TEXT[]"),
        ("ARRAY['a']::char(1)[]", "CHAR[]"),
        ("'\\x00'::bytea", "BYTEA"),
        ("1::oid", "OID"),
        ("'10:00'::time", "TIME"),
        ("'10:00+00'::timetz", "TIMETZ"),
        ("'127.0.0.1'::inet", "INET"),
        ("'a'::\"char\"", '"CHAR"'),
        ("ROW(1, 2)", "RECORD"),
        ("'[1,2)'::int4range", "INT4RANGE"),
        ("'1'::money", "MONEY"),
        ("'pg_class'::regclass", "REGCLASS"),
        ("'$.a'::jsonpath", "JSONPATH"),
    ],
)
def test_unsupported_types_fail_with_the_exact_message(db: Conn, sql: str, type_name: str) -> None:
    with pytest.raises(UnsupportedColumnType) as info:
        run(db, f"SELECT {sql} AS col")
    assert str(info.value) == f"Unsupported column type '{type_name}' for column 'col'. " + (
        SUPPORTED
    )
    assert info.value.type_name == type_name
    assert info.value.column == "col"


def test_interval_message(db: StepSession) -> None:
    with pytest.raises(UnsupportedColumnType) as info:
        run(db, "SELECT now() - now()")
    assert str(info.value) == (
        "Unsupported column type 'INTERVAL' for column '?column?'. Supported types: bool, int2, "
        "int4, int8, float4, float8, text, varchar, numeric, uuid, timestamptz, timestamp, date, "
        "jsonb, json, void."
    )


def test_enums_and_their_arrays_are_unsupported(db: StepSession) -> None:
    db.execute("CREATE TYPE mood AS ENUM ('happy', 'sad')")
    db.execute("CREATE TYPE \"Weird\" AS ENUM ('x')")
    for sql, name in [
        ("'happy'::mood", "MOOD"),
        ("ARRAY['sad']::mood[]", "MOOD[]"),
        ("'x'::\"Weird\"", "WEIRD"),
    ]:
        expected = f"^Unsupported column type '{re.escape(name)}' for column 'm'"
        with pytest.raises(UnsupportedColumnType, match=expected):
            run(db, f"SELECT {sql} AS m")


def test_unsupported_type_fails_even_without_rows(db: StepSession) -> None:
    with pytest.raises(UnsupportedColumnType, match="'INTERVAL' for column 'i'"):
        run(db, "SELECT '1 day'::interval AS i WHERE false")
    with pytest.raises(UnsupportedColumnType, match="'INTERVAL' for column 'i'"):
        run(db, "SELECT NULL::interval AS i")


def test_first_unsupported_column_is_reported(db: StepSession) -> None:
    with pytest.raises(UnsupportedColumnType, match="'BYTEA' for column 'b'"):
        run(db, "SELECT 1 AS a, '\\x01'::bytea AS b, '1 day'::interval AS c")


def test_unsupported_returning_column(db: StepSession) -> None:
    db.execute("CREATE TABLE t (id int, d interval)")
    with pytest.raises(UnsupportedColumnType, match="'INTERVAL' for column 'd'"):
        run(db, "INSERT INTO t VALUES (1, '1 day') RETURNING id, d")


def test_domain_over_unsupported_type_reports_its_base_type(db: StepSession) -> None:
    db.execute("CREATE DOMAIN span AS interval")
    with pytest.raises(UnsupportedColumnType, match="'INTERVAL' for column 's'"):
        run(db, "SELECT '1 day'::span AS s")


# -- the edge ----------------------------------------------------------------------------------


def test_configuration_leaves_text_format_queries_alone(db: StepSession) -> None:
    ((now,),) = db.execute("SELECT now()")
    assert isinstance(now, datetime)
    ((n,),) = db.execute("SELECT 1.5::numeric")
    assert str(n) == "1.5"


def test_row_factory_of_the_connection_does_not_matter(dsn: str) -> None:
    session = StepSession(dsn, row_factory=psycopg.rows.dict_row)
    try:
        assert run(session, "SELECT 1 AS a, 'x' AS b") == '{"rows":[{"a":1,"b":"x"}],"row_count":1}'
    finally:
        session.close()


def test_statements_without_rows_and_unsupported_types_even_without_rows(db: StepSession) -> None:
    assert run(db, "SELECT 100.50::numeric AS n, now() > '2000-01-01' AS t") == (
        '{"rows":[{"n":"100.50","t":true}],"row_count":1}'
    )
    assert run(db, "CREATE TABLE t (i int)") == NO_RESULT_SET
    with pytest.raises(UnsupportedColumnType) as info:
        run(db, "SELECT ARRAY[1]::int4[] AS xs WHERE false")
    assert str(info.value) == f"Unsupported column type 'INT4[]' for column 'xs'. {SUPPORTED}"


# -- pure helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typname", "element", "shown"),
    [
        ("interval", None, "INTERVAL"),
        ("_int4", "int4", "INT4[]"),
        ("_bpchar", "bpchar", "CHAR[]"),
        ("char", None, '"CHAR"'),
        ("mood", None, "MOOD"),
        ("_mood", "mood", "MOOD[]"),
    ],
)
def test_type_display_name(typname: str, element: str | None, shown: str) -> None:
    assert type_display_name(typname, element) == shown


def test_shortest_float4() -> None:
    for text in ["1.1", "0.1", "3.4028235e+38", "1e-45", "1.6777216e+07", "0.3", "-2.0608719e+09"]:
        widened = struct.unpack("!f", struct.pack("!f", float(text)))[0]
        assert results._shortest_float4(widened) == float(text)
    assert math.copysign(1, results._shortest_float4(-0.0)) == -1
