"""Cron schedules: df.wait_for_schedule and its validator in SQL, and pgdurable.core.cron.

The point of CASES is that the SQL builder and the worker's Python read cron expressions the
same way: every case runs through df._cron_error, df.wait_for_schedule and cron_error, and all
three must give the same answer. next_tick is checked against hand-computed dates and against
a brute-force reference on generated expressions.
"""

from __future__ import annotations

import calendar
import collections
import itertools
import json
import math
import random
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from conftest import App
from cronsim import CronSim, CronSimError
from sqlcheck import Conn, Error, outcome

from pgdurable.core.cron import CronError, cron_error, next_tick

FIELDS = "expected 5 fields (minute hour day-of-month month day-of-week), got"

# (expression, reason it is invalid or None). Shared by the SQL and the Python tests.
CASES: list[tuple[str, str | None]] = [
    # -- valid ----------------------------------------------------------------------------
    ("* * * * *", None),
    ("*/5 * * * *", None),
    ("0 9 * * 1-5", None),
    ("0 9 * * MON-FRI", None),
    ("0 9 * * mon-fri", None),
    ("0 9 * * Mon-fRi", None),
    ("0 0 1 jan,Jul *", None),
    ("0 0 1 JAN-DEC/3 *", None),
    ("0 0 * * 0", None),
    ("0 0 * * 7", None),
    ("0 0 * * SUN", None),
    ("0 0 * * 0-7", None),
    ("0 0 * * 5-7", None),
    ("0 0 * * SUN,SAT", None),
    ("0 0 * * MON/2", None),
    ("5/15 * * * *", None),
    ("0-30/10 * * * *", None),
    ("1,2,3-5,*/20,59 * * * *", None),
    ("59 23 31 12 6", None),
    ("0 0 1 1 0", None),
    ("00 07 01 01 00", None),
    ("  */5   *\t*\n*  * \r\n", None),
    ("*/5\v*\f* * *", None),
    ("*/59 */23 */31 */12 */7", None),
    ("*/1000 * * * *", None),
    ("*/99999999999 * * * *", None),
    ("0 0 1-31/40 * *", None),
    ("0 0 29 2 *", None),
    ("0 0 30 1,2 *", None),
    ("0 0 31 */2 *", None),
    ("0 0 31 2/1 *", None),  # February to December
    ("0 0 31 2,4 1", None),  # day-of-week restricted too: either matches, so it fires
    ("0 0 30 2 */1", None),
    # -- field count and macros -----------------------------------------------------------
    ("", f"{FIELDS} 0"),
    ("   \t ", f"{FIELDS} 0"),
    ("* * * *", f"{FIELDS} 4"),
    ("*", f"{FIELDS} 1"),
    ("* * * * * *", f"{FIELDS} 6"),  # a seconds field (or a year field) is not cron
    ("0 0 9 * * 1-5", f"{FIELDS} 6"),
    ("0 0 * * * 2024", f"{FIELDS} 6"),
    ("*\u00a0* * * *", f"{FIELDS} 4"),  # only ASCII whitespace separates fields
    ("*,* * * *", f"{FIELDS} 4"),
    ("@hourly", "macro '@hourly' is not supported; write the five fields instead"),
    ("  @daily ", "macro '@daily' is not supported; write the five fields instead"),
    ("@reboot", "macro '@reboot' is not supported; write the five fields instead"),
    ("@every 5m", "macro '@every' is not supported; write the five fields instead"),
    ("@ * * * *", "macro '@' is not supported; write the five fields instead"),
    ("* @ * * *", "invalid item '@' in hour field"),
    # -- out of range ---------------------------------------------------------------------
    ("60 * * * *", "minute value 60 out of range 0-59"),
    ("* 24 * * *", "hour value 24 out of range 0-23"),
    ("* * 0 * *", "day-of-month value 0 out of range 1-31"),
    ("* * 32 * *", "day-of-month value 32 out of range 1-31"),
    ("* * * 0 *", "month value 0 out of range 1-12"),
    ("* * * 13 *", "month value 13 out of range 1-12"),
    ("* * * * 8", "day-of-week value 8 out of range 0-7"),
    ("060 * * * *", "minute value 060 out of range 0-59"),
    ("99999999999 * * * *", "minute value 99999999999 out of range 0-59"),
    ("5-70 * * * *", "minute value 70 out of range 0-59"),
    ("70-80 * * * *", "minute value 70 out of range 0-59"),
    ("60/5 * * * *", "minute value 60 out of range 0-59"),
    ("60 24 * * *", "minute value 60 out of range 0-59"),  # the first error wins
    ("* * * * 1-8", "day-of-week value 8 out of range 0-7"),
    # -- ranges ---------------------------------------------------------------------------
    ("5-1 * * * *", "reversed range '5-1' in minute field"),
    ("* 23-0 * * *", "reversed range '23-0' in hour field"),
    ("* * * DEC-JAN *", "reversed range 'DEC-JAN' in month field"),
    ("* * * * FRI-SUN", "reversed range 'FRI-SUN' in day-of-week field"),
    ("* * * * 7-1", "reversed range '7-1' in day-of-week field"),
    ("10-5/2 * * * *", "reversed range '10-5' in minute field"),
    # -- steps ----------------------------------------------------------------------------
    ("*/0 * * * *", "invalid step 0 in '*/0'"),
    ("1-5/0 * * * *", "invalid step 0 in '1-5/0'"),
    ("3/0 * * * *", "invalid step 0 in '3/0'"),
    ("*/00 * * * *", "invalid step 00 in '*/00'"),
    ("* * * * */0", "invalid step 0 in '*/0'"),
    ("*/ * * * *", "missing step in '*/'"),
    ("*/x * * * *", "invalid step 'x' in '*/x'"),
    ("*/-1 * * * *", "invalid step '-1' in '*/-1'"),
    ("*/1.5 * * * *", "invalid step '1.5' in '*/1.5'"),
    ("*/5/2 * * * *", "invalid item '*/5/2' in minute field"),
    # -- list items -----------------------------------------------------------------------
    ("1,,2 * * * *", "empty list item in minute field"),
    (",1 * * * *", "empty list item in minute field"),
    ("1, * * * *", "empty list item in minute field"),
    ("* * * * 1,", "empty list item in day-of-week field"),
    ("* * , * *", "empty list item in day-of-month field"),
    # -- names ----------------------------------------------------------------------------
    ("* * * FOO *", "unknown name 'FOO' in month field"),
    ("* * * * foo", "unknown name 'foo' in day-of-week field"),
    ("* * * * JAN", "unknown name 'JAN' in day-of-week field"),
    ("* * * MON *", "unknown name 'MON' in month field"),
    ("* * * JANUARY *", "unknown name 'JANUARY' in month field"),
    ("* * * * MONDAY", "unknown name 'MONDAY' in day-of-week field"),
    ("MON * * * *", "unknown name 'MON' in minute field"),
    ("* JAN * * *", "unknown name 'JAN' in hour field"),
    ("x-5 * * * *", "unknown name 'x' in minute field"),
    ("* * L * *", "unknown name 'L' in day-of-month field"),
    ("* * LW * *", "unknown name 'LW' in day-of-month field"),
    # -- garbage: Quartz/croniter extensions and other junk -------------------------------
    ("* * 15W * *", "invalid item '15W' in day-of-month field"),
    ("* * * * 5L", "invalid item '5L' in day-of-week field"),
    ("* * * * 1#2", "invalid item '1#2' in day-of-week field"),
    ("* * ? * *", "invalid item '?' in day-of-month field"),
    ("1-2-3 * * * *", "invalid item '1-2-3' in minute field"),
    ("-5 * * * *", "invalid item '-5' in minute field"),
    ("5- * * * *", "invalid item '5-' in minute field"),
    ("*-5 * * * *", "invalid item '*-5' in minute field"),
    ("1-* * * * *", "invalid item '1-*' in minute field"),
    ("** * * * *", "invalid item '**' in minute field"),
    ("/5 * * * *", "invalid item '/5' in minute field"),
    ("1.5 * * * *", "invalid item '1.5' in minute field"),
    ("+1 * * * *", "invalid item '+1' in minute field"),
    ("\uff11 * * * *", "invalid item '\uff11' in minute field"),  # fullwidth digit one
    ("\u0663 * * * *", "invalid item '\u0663' in minute field"),  # Arabic-Indic three
    ("* * * * J\u00e4N", "invalid item 'J\u00e4N' in day-of-week field"),
    ("* * * * *\u00a0", "invalid item '*\u00a0' in day-of-week field"),
    ("a'b * * * *", "invalid item 'a'b' in minute field"),
    ("1-5/0,x * * * *", "invalid step 0 in '1-5/0'"),
    # -- schedules that can never fire ----------------------------------------------------
    ("0 0 30 2 *", "day-of-month '30' never occurs in month '2'"),
    ("0 0 30,31 FEB *", "day-of-month '30,31' never occurs in month 'FEB'"),
    ("0 0 31 2,4,6,9,11 *", "day-of-month '31' never occurs in month '2,4,6,9,11'"),
    ("0 0 31 apr-jun/2 *", "day-of-month '31' never occurs in month 'apr-jun/2'"),
    ("0 0 30-31/5 2 *", "day-of-month '30-31/5' never occurs in month '2'"),
    ("0 0 30 FEB/12 *", "day-of-month '30' never occurs in month 'FEB/12'"),
]


def builder_outcome(expr: str, reason: str | None) -> object:
    """What SELECT df.wait_for_schedule(expr) must give for a case."""
    if reason is not None:
        return Error(f"Invalid cron expression '{expr}': {reason}")
    query = json.dumps({"cron_expr": expr}, ensure_ascii=False, separators=(",", ":"))
    return json.dumps(
        {"node_type": "WAIT_SCHEDULE", "query": query}, ensure_ascii=False, separators=(",", ":")
    )


def report(failures: list[str], total: int) -> None:
    assert not failures, f"{len(failures)} of {total} cases differ:\n" + "\n".join(failures)


# -- SQL ----------------------------------------------------------------------------------------


def test_builder_json_byte_for_byte(conn: Conn) -> None:
    wait5 = '{"node_type":"WAIT_SCHEDULE","query":"{\\"cron_expr\\":\\"*/5 * * * *\\"}"}'
    refresh = '{"node_type":"SQL","query":"CALL refresh()"}'
    cases: list[tuple[str, object]] = [
        ("df.wait_for_schedule('*/5 * * * *')", wait5),  # pg_durable's exact JSON
        (
            "@> (df.wait_for_schedule('*/5 * * * *') ~> 'CALL refresh()')",
            f'{{"node_type":"LOOP","left_node":{{"node_type":"THEN","left_node":{wait5},'
            f'"right_node":{refresh}}}}}',
        ),
        (
            "df.wait_for_schedule('0 9 * * mon-fri') |=> 'w'",
            '{"node_type":"WAIT_SCHEDULE","query":"{\\"cron_expr\\":\\"0 9 * * mon-fri\\"}",'
            '"result_name":"w"}',
        ),
        # Stored as given: whitespace kept, escaped twice like every config string.
        (
            "df.wait_for_schedule(E' 0\\t9 * *  1 ')",
            '{"node_type":"WAIT_SCHEDULE","query":"{\\"cron_expr\\":\\" 0\\\\t9 * *  1 \\"}"}',
        ),
        (
            "df.wait_for_schedule('0' || chr(10) || '9' || chr(11) || '* * 1')",
            '{"node_type":"WAIT_SCHEDULE","query":"{\\"cron_expr\\":\\"0\\\\n9\\\\u000b* * 1\\"}"}',
        ),
        ("df.wait_for_schedule(NULL)", None),  # STRICT
        ("df._cron_error(NULL)", None),
    ]
    failures = []
    for sql, expected in cases:
        got = outcome(conn, sql)
        if got != expected:
            failures.append(f"SELECT {sql}\n    expected: {expected!r}\n    got:      {got!r}")
    report(failures, len(cases))


def test_sql_validator_table(conn: Conn) -> None:
    failures = []
    for expr, reason in CASES:
        got_reason = outcome(conn, "df._cron_error(%s)", [expr])
        if got_reason != reason:
            failures.append(
                f"df._cron_error({expr!r})\n    expected: {reason!r}\n    got: {got_reason!r}"
            )
        expected = builder_outcome(expr, reason)
        got = outcome(conn, "df.wait_for_schedule(%s)", [expr])
        if got != expected:
            failures.append(
                f"df.wait_for_schedule({expr!r})\n    expected: {expected!r}\n    got: {got!r}"
            )
    report(failures, 2 * len(CASES))


def test_sql_function_attributes(conn: Conn) -> None:
    rows = conn.execute(
        "SELECT p.oid::regprocedure::text, p.provolatile, p.proisstrict FROM pg_proc AS p"
        " WHERE p.oid IN ('df.wait_for_schedule(text)'::regprocedure,"
        "                 'df._cron_error(text)'::regprocedure) ORDER BY 1"
    ).fetchall()
    assert rows == [
        ("df._cron_error(text)", "i", True),
        ("df.wait_for_schedule(text)", "i", True),
    ]


def test_invalid_expression_raises_invalid_parameter_value(conn: Conn) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue) as info:
        conn.execute("SELECT df.wait_for_schedule('60 * * * *')")
    assert info.value.diag.message_primary == (
        "Invalid cron expression '60 * * * *': minute value 60 out of range 0-59"
    )


def test_schedule_in_a_workflow_as_an_app_role(app: App) -> None:
    """A non-superuser builds and starts a schedule; df.nodes keeps the config as given."""
    instance = app.start("@> (df.wait_for_schedule(%s) ~> 'SELECT 1')", ("0 9 * * 1-5",))
    row = app.conn.execute(
        "SELECT query FROM df.nodes WHERE instance_id = %s AND node_type = 'WAIT_SCHEDULE'",
        (instance,),
    ).fetchone()
    assert row == ('{"cron_expr":"0 9 * * 1-5"}',)


# -- Python -------------------------------------------------------------------------------------


def test_python_validator_table() -> None:
    failures = []
    for expr, reason in CASES:
        got = cron_error(expr)
        if got != reason:
            failures.append(f"cron_error({expr!r})\n    expected: {reason!r}\n    got: {got!r}")
        if reason is not None:
            try:
                next_tick(expr, 0.0)
            except CronError as e:
                if str(e) != f"Invalid cron expression '{expr}': {reason}":
                    failures.append(f"next_tick({expr!r}) raised {e}")
            else:
                failures.append(f"next_tick({expr!r}) did not raise")
    report(failures, len(CASES))


def test_cron_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"^Invalid cron expression '@hourly': macro"):
        next_tick("@hourly", 0.0)


# Generated text: mostly five fields of items that fit their field, so that a fair share is
# valid and the checks deep inside an item are reached, plus noise: values just out of range,
# names in the wrong field, other dialects' syntax, odd whitespace.
_FIELD_ATOMS = [
    ["*", "0", "5", "30", "59", "00", "07"],
    ["*", "0", "9", "12", "23", "007"],
    ["*", "1", "13", "28", "29", "30", "31"],
    ["*", "1", "2", "4", "12", "jan", "FEB", "Apr", "dec"],
    ["*", "0", "1", "5", "7", "sun", "MON", "Fri", "sat"],
]
_NOISE = [
    "8", "13", "24", "32", "60", "99999999999", "jan", "MON", "foo", "L", "W", "#", "?", "@",
    "-", "/", ",", "x", ".", "+", "\u00a0", "\uff11", "",
]  # fmt: skip
_SEPARATORS = ["  ", "\t", "\n", "\r\n", "\v", "\f", "\u00a0", ""]


def _atom(field: int, rng: random.Random) -> str:
    return rng.choice(_FIELD_ATOMS[field] if rng.random() < 0.9 else _NOISE)


def _generated_item(field: int, rng: random.Random) -> str:
    base = _atom(field, rng)
    if rng.random() < (0.3 if base != "*" else 0.02):
        base += "-" + rng.choice([*_FIELD_ATOMS[field][1:], "*"])
    if rng.random() < 0.3:
        base += "/" + rng.choice(["1", "2", "5", "100"] * 3 + ["0", "00", "", "x", "*"])
    return base


def _generated_expression(rng: random.Random) -> str:
    n_fields = rng.choice([5] * 20 + [4, 6, 0, 1])
    text = rng.choice([""] * 8 + [" ", "\t", "@"])
    for field in range(n_fields):
        items = rng.choice([1, 1, 1, 1, 2, 3])
        text += ",".join(_generated_item(min(field, 4), rng) for _ in range(items))
        text += rng.choice(_SEPARATORS) if rng.random() < 0.05 else " "
    return text


def test_sql_and_python_agree_on_generated_expressions(conn: Conn) -> None:
    rng = random.Random(20240229)
    exprs = sorted({_generated_expression(rng) for _ in range(4000)})
    rows = conn.execute(
        "SELECT e.expr, df._cron_error(e.expr) FROM unnest(%s::text[]) AS e(expr)", (exprs,)
    ).fetchall()
    got_sql: dict[str, str | None] = dict(rows)
    failures = [
        f"{expr!r}\n    sql:    {got_sql[expr]!r}\n    python: {cron_error(expr)!r}"
        for expr in exprs
        if got_sql[expr] != cron_error(expr)
    ]
    report(failures, len(exprs))
    # The generator reaches both outcomes and many different reasons.
    reasons = collections.Counter((r or "").split(" ")[0] for r in got_sql.values())
    assert reasons[""] > 200, reasons  # valid
    assert set(reasons) >= {
        "expected", "macro", "minute", "hour", "day-of-month", "month", "day-of-week",
        "invalid", "unknown", "empty", "reversed", "missing",
    }, reasons  # fmt: skip


# -- next_tick ----------------------------------------------------------------------------------


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %a %H:%M:%S")


# 2024-01-01 is a Monday; 2024 is a leap year, 2100 is not.
NEXT_TICKS: list[tuple[str, str, str]] = [
    # strictly after: a tick exactly at `after` is not returned
    ("*/5 * * * *", "2024-01-01 00:00:00", "2024-01-01 00:05:00"),
    ("*/5 * * * *", "2024-01-01 00:04:59.999999", "2024-01-01 00:05:00"),
    ("*/5 * * * *", "2024-01-01 00:05:00", "2024-01-01 00:10:00"),
    ("*/5 * * * *", "2024-01-01 00:05:00.000001", "2024-01-01 00:10:00"),
    ("* * * * *", "2024-01-01 00:00:59", "2024-01-01 00:01:00"),
    ("* * * * *", "2024-01-01 00:01:00", "2024-01-01 00:02:00"),
    # step lists
    ("5/20 * * * *", "2024-01-01 00:45:00", "2024-01-01 01:05:00"),
    ("0,30 9-17/4 * * *", "2024-01-01 09:30:00", "2024-01-01 13:00:00"),
    ("0,30 9-17/4 * * *", "2024-01-01 17:30:00", "2024-01-02 09:00:00"),
    ("1,2,50-52 * * * *", "2024-01-01 00:02:00", "2024-01-01 00:50:00"),
    ("*/1000 * * * *", "2024-01-01 00:00:00", "2024-01-01 01:00:00"),
    # month ends and year ends
    ("0 0 1 * *", "2024-01-31 12:00:00", "2024-02-01 00:00:00"),
    ("0 0 31 * *", "2024-02-01 00:00:00", "2024-03-31 00:00:00"),
    ("0 0 31 * *", "2024-03-31 00:00:00", "2024-05-31 00:00:00"),
    ("0 0 30 * *", "2024-01-30 00:00:00", "2024-03-30 00:00:00"),
    ("0 0 1 1 *", "2024-12-31 23:59:59", "2025-01-01 00:00:00"),
    ("59 23 31 12 *", "2024-12-31 23:59:00", "2025-12-31 23:59:00"),
    ("0 0 1 jan,Jul *", "2024-02-01 00:00:00", "2024-07-01 00:00:00"),
    ("0 0 31 2/1 *", "2024-01-01 00:00:00", "2024-03-31 00:00:00"),
    # leap years
    ("0 0 29 2 *", "2023-03-01 00:00:00", "2024-02-29 00:00:00"),
    ("0 0 29 2 *", "2024-02-29 00:00:00", "2028-02-29 00:00:00"),
    ("0 0 29 2 *", "2097-01-01 00:00:00", "2104-02-29 00:00:00"),
    ("0 0 28 2 *", "2024-02-28 00:00:00", "2025-02-28 00:00:00"),
    # day-of-week: 0 and 7 are both Sunday
    ("0 12 * * 0", "2024-01-01 00:00:00", "2024-01-07 12:00:00"),
    ("0 12 * * 7", "2024-01-01 00:00:00", "2024-01-07 12:00:00"),
    ("0 12 * * sun", "2024-01-01 00:00:00", "2024-01-07 12:00:00"),
    ("0 12 * * 6-7", "2024-01-01 00:00:00", "2024-01-06 12:00:00"),
    ("0 12 * * 6-7", "2024-01-06 12:00:00", "2024-01-07 12:00:00"),
    ("0 9 * * 1-5", "2024-01-05 09:00:00", "2024-01-08 09:00:00"),
    ("0 9 * * MON-FRI", "2024-01-06 00:00:00", "2024-01-08 09:00:00"),
    ("0 0 * * 5/2", "2024-01-05 00:00:00", "2024-01-07 00:00:00"),  # 5/2 = Fri, Sun
    ("0 0 * * MON/3", "2024-01-04 00:00:00", "2024-01-07 00:00:00"),  # Mon, Thu, Sun
    # day-of-month and day-of-week both restricted: either matches
    ("0 0 13 * 5", "2024-01-01 00:00:00", "2024-01-05 00:00:00"),
    ("0 0 13 * 5", "2024-01-12 00:00:00", "2024-01-13 00:00:00"),
    ("0 0 13 * 5", "2024-01-13 00:00:00", "2024-01-19 00:00:00"),
    ("0 0 */2 * 1", "2024-01-01 00:00:00", "2024-01-03 00:00:00"),  # odd days or Mondays
    ("0 0 */2 * 1", "2024-01-07 00:00:00", "2024-01-08 00:00:00"),
    ("0 0 31 2,4 1", "2024-02-01 00:00:00", "2024-02-05 00:00:00"),  # no 31st: Mondays
    ("0 0 30 2 */1", "2024-01-01 00:00:00", "2024-02-01 00:00:00"),  # any day in February
    # only one of them restricted: that one alone decides
    ("0 0 13 * *", "2024-01-01 00:00:00", "2024-01-13 00:00:00"),
    ("0 0 * * 5", "2024-01-01 00:00:00", "2024-01-05 00:00:00"),
    ("0 0 * * */2", "2024-01-01 00:00:00", "2024-01-02 00:00:00"),  # Sun, Tue, Thu, Sat
    # whitespace and case do not matter
    ("  0\t0 13\n* FRI ", "2024-01-01 00:00:00", "2024-01-05 00:00:00"),
    # far from 1970, both ways
    ("*/5 * * * *", "2099-12-31 23:59:00", "2100-01-01 00:00:00"),
    ("0 0 1 1 *", "1969-06-01 00:00:00", "1970-01-01 00:00:00"),
]


def test_next_tick_table() -> None:
    failures = []
    for expr, after, expected in NEXT_TICKS:
        got = next_tick(expr, ts(after))
        if got != ts(expected):
            failures.append(
                f"next_tick({expr!r}, {after})\n    expected: {iso(ts(expected))}\n"
                f"    got:      {iso(got)}"
            )
    report(failures, len(NEXT_TICKS))


def test_next_tick_returns_whole_seconds_as_float() -> None:
    got = next_tick("*/5 * * * *", 1_700_000_001.25)
    assert isinstance(got, float)
    assert got == 1_700_000_100.0
    # The float just below a tick is before it, though it rounds to the tick in microseconds.
    assert next_tick("*/5 * * * *", math.nextafter(got, 0.0)) == got
    assert next_tick("*/5 * * * *", got) == got + 300


def test_next_tick_long_run_keeps_exact_spacing() -> None:
    start = ts("2024-02-28 23:41:17")  # across a leap day and a month end
    ticks = [start]
    for _ in range(1000):
        ticks.append(next_tick("*/5 * * * *", ticks[-1]))
    assert ticks[1] == ts("2024-02-28 23:45:00")
    gaps = {b - a for a, b in itertools.pairwise(ticks[1:])}
    assert gaps == {300.0}
    assert ticks[-1] == ticks[1] + 999 * 300


# -- next_tick against a brute-force reference ----------------------------------------------------

_RANGES = {0: (0, 59), 1: (0, 23), 2: (1, 31), 3: (1, 12), 4: (0, 7)}
_MONTH_NAMES = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAY_NAMES = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")


def _spell(field: int, value: int, rng: random.Random) -> str:
    if field == 3 and rng.random() < 0.3:
        return rng.choice([str.lower, str.upper, str.title])(_MONTH_NAMES[value - 1])
    if field == 4 and value < 7 and rng.random() < 0.3:
        return rng.choice([str.lower, str.upper, str.title])(_DAY_NAMES[value])
    return str(value)


def _random_field(field: int, rng: random.Random) -> tuple[str, set[int]]:
    """A field's text and, independently of the parser under test, the values it means."""
    low, high = _RANGES[field]
    if rng.random() < 0.3:
        return "*", set(range(low, high + 1))
    items, values = [], set()
    for _ in range(rng.choice([1, 1, 2, 3])):
        kind = rng.choice(["n", "range", "star/step", "n/step", "range/step"])
        a, b = sorted(rng.sample(range(low, high + 1), 2))
        step = rng.choice([1, 2, 3, 5, 7, 15])
        if kind == "n":
            items.append(_spell(field, a, rng))
            values.add(a)
        elif kind == "range":
            items.append(f"{_spell(field, a, rng)}-{_spell(field, b, rng)}")
            values.update(range(a, b + 1))
        elif kind == "star/step":
            items.append(f"*/{step}")
            values.update(range(low, high + 1, step))
        elif kind == "n/step":
            items.append(f"{_spell(field, a, rng)}/{step}")
            values.update(range(a, high + 1, step))
        else:
            items.append(f"{_spell(field, a, rng)}-{_spell(field, b, rng)}/{step}")
            values.update(range(a, b + 1, step))
    return ",".join(items), values


def _reference_next(fields: list[str], sets: list[set[int]], after: float) -> float:
    """Scan day by day: the meaning of a schedule spelled out as plainly as possible."""
    minutes, hours, days, months, weekdays = sets
    weekdays = {w % 7 for w in weekdays}
    dom_any, dow_any = fields[2] == "*", fields[4] == "*"
    moment = datetime.fromtimestamp(after, UTC)
    day = moment.date()
    while day.year < moment.year + 60:
        dom, dow = day.day in days, day.isoweekday() % 7 in weekdays
        day_ok = (dom and dow) if dom_any or dow_any else (dom or dow)
        if day.month in months and day_ok:
            for hour in sorted(hours):
                for minute in sorted(minutes):
                    t = datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)
                    if t.timestamp() > after:
                        return t.timestamp()
        day += timedelta(days=1)
    raise AssertionError("no tick within 60 years")


def test_next_tick_matches_a_brute_force_reference() -> None:
    rng = random.Random(7)
    checked, failures = 0, []
    while checked < 400:
        parts = [_random_field(field, rng) for field in range(5)]
        fields = [text for text, _ in parts]
        expr = " ".join(fields)
        if cron_error(expr) is not None:  # only "never fires" may be refused here
            assert cron_error(expr) == (
                f"day-of-month '{fields[2]}' never occurs in month '{fields[3]}'"
            ), expr
            assert fields[4] == "*"
            assert not any(
                d <= calendar.monthrange(2024, m)[1] for d in parts[2][1] for m in parts[3][1]
            ), expr
            continue
        start = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=rng.randrange(3 * 525_600))
        after = start.timestamp() + rng.choice([0, 0.5, 59])
        expected = _reference_next(fields, [s for _, s in parts], after)
        got = next_tick(expr, after)
        if got != expected:
            failures.append(
                f"{expr!r} after {iso(after)}: expected {iso(expected)}, got {iso(got)}"
            )
        checked += 1
    report(failures, checked)


# -- what the library would do on its own ------------------------------------------------------


def test_library_dialect_never_reaches_users() -> None:
    """cronsim's own dialect is wider than ours and reads the day fields differently.

    next_tick only hands it plain lists of numbers; these checks record why that matters. If
    a cronsim release changes any of this, the reasons in cron.py need another look.
    """
    start = datetime(2024, 1, 1, tzinfo=UTC)  # a Monday
    # cronsim accepts a seconds field, L, LW and #; we refuse them.
    for expr in ["0 0 9 * * *", "0 0 L * *", "0 0 LW * *", "0 0 * * 1#2", "0 0 * * 5L"]:
        next(CronSim(expr, start))
        assert cron_error(expr) is not None, expr
    # cronsim refuses a day that never occurs by raising; we refuse it with a reason.
    with pytest.raises(CronSimError):
        CronSim("0 0 30 2 *", start)
    # Debian's rule in cronsim: a day field *starting* with '*' counts as unrestricted, so
    # '*/2' AND Monday. Ours (crontab(5), POSIX): only a lone '*' is unrestricted, so OR.
    assert next(CronSim("0 0 */2 * 1", start)) == datetime(2024, 1, 15, tzinfo=UTC)
    assert next_tick("0 0 */2 * 1", start.timestamp()) == ts("2024-01-03 00:00:00")
    # Day-of-week 7 is Sunday in cronsim too, and N/step runs to 7.
    assert next(CronSim("0 0 * * 7", start)) == datetime(2024, 1, 7, tzinfo=UTC)


def test_next_tick_ignores_the_local_time_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """UTC throughout: a DST change in the process's time zone changes nothing."""
    after = ts("2024-03-10 06:59:00")  # 01:59 in New York, a minute before clocks jump
    expected = [ts("2024-03-10 07:30:00"), ts("2024-03-11 07:30:00")]
    assert [next_tick("30 7 * * *", after), next_tick("30 7 * * *", expected[0])] == expected
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert time.localtime(after).tm_hour == 1  # the zone really is in effect
        assert [next_tick("30 7 * * *", after), next_tick("30 7 * * *", expected[0])] == expected
    finally:
        monkeypatch.undo()
        time.tzset()
