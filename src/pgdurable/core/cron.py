"""Cron schedules for WAIT_SCHEDULE steps: validation and the next fire time.

Pure: no I/O, no clock. :func:`cron_error` accepts exactly what the SQL builder
``df.wait_for_schedule`` accepts (``df._cron_error`` in schema/schedule.sql, same checks in the
same order, same messages); :func:`next_tick` computes the next fire time in UTC.

The dialect is standard five-field crontab, ``minute hour day-of-month month day-of-week``:

* each field is a comma list of ``*``, ``N`` or ``N-M``, each optionally followed by
  ``/step`` (step >= 1); ``N/step`` means ``N-max/step``;
* minute 0-59, hour 0-23, day-of-month 1-31, month 1-12 or JAN-DEC, day-of-week 0-7 with
  both 0 and 7 Sunday, or SUN-SAT (names are case-insensitive);
* when both day-of-month and day-of-week are restricted (not a lone ``*``), a day matches
  if *either* matches; otherwise both must;
* an expression whose day-of-month never occurs in its months (``0 0 30 2 *``) is refused.

Day-of-week differs from pg_durable, whose cron crate numbers days 1-7 with 1 = Sunday
(docs/schedules.md): here ``0 9 * * 1-5`` means weekdays, as in every crontab.

The calendar arithmetic is cronsim's. It never sees the user's text: the expression is
parsed here and handed to cronsim as plain lists of numbers, so its own dialect (seconds
fields, ``L``, ``W``, ``#``, ``?``, Debian's rule that a day field starting with ``*`` counts
as unrestricted) cannot change what an expression means.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from cronsim import CronSim

__all__ = ["CronError", "Schedule", "cron_error", "next_tick", "parse"]

FIELD_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week")
_LOW = (0, 0, 1, 1, 0)
_HIGH = (59, 23, 31, 12, 7)
_DOM, _MONTH, _DOW = 2, 3, 4
_NAMES: dict[int, tuple[str, ...]] = {
    _MONTH: ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"),
    _DOW: ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"),
}
_NAME_BASE = {_MONTH: 1, _DOW: 0}
# The longest each month can be (February: 29, in leap years).
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

# ASCII whitespace only, spelled out: str.split() would also split on Unicode spaces, and
# the SQL validator must draw the same line.
_WS = " \t\n\r\v\f"
_WS_RUN = re.compile(f"[{re.escape(_WS)}]+")
_DIGITS = re.compile(r"[0-9]+")
_LETTERS = re.compile(r"[A-Za-z]+")


class CronError(ValueError):
    """An invalid cron expression; the message is the one df.wait_for_schedule raises."""


@dataclass(frozen=True)
class Schedule:
    """A parsed expression: the allowed values of each field (day-of-week 0-6, 0 = Sunday)."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    days_restricted: bool  # day-of-month is not a lone '*'
    weekdays_restricted: bool  # day-of-week is not a lone '*'


def _value(token: str, field: int) -> int | str | None:
    """A value of the field, an error reason, or None if the token is no value at all."""
    name = FIELD_NAMES[field]
    if _DIGITS.fullmatch(token):
        number = int(token)
        if not _LOW[field] <= number <= _HIGH[field]:
            return f"{name} value {token} out of range {_LOW[field]}-{_HIGH[field]}"
        return number
    if _LETTERS.fullmatch(token):
        names = _NAMES.get(field, ())
        upper = token.upper()  # ASCII letters only, so no locale or Unicode surprises
        if upper in names:
            return names.index(upper) + _NAME_BASE[field]
        return f"unknown name '{token}' in {name} field"
    return None


def _item(item: str, field: int) -> range | str:
    """The values one list item stands for, or an error reason."""
    name = FIELD_NAMES[field]
    invalid = f"invalid item '{item}' in {name} field"
    if item == "":
        return f"empty list item in {name} field"
    parts = item.split("/")
    if len(parts) > 2:
        return invalid
    base = parts[0]
    if base == "*":
        low, high = _LOW[field], _HIGH[field]
    elif "-" in base:
        bounds = base.split("-")
        if len(bounds) != 2:
            return invalid
        low_value = _value(bounds[0], field)
        if low_value is None:
            return invalid
        if isinstance(low_value, str):
            return low_value
        high_value = _value(bounds[1], field)
        if high_value is None:
            return invalid
        if isinstance(high_value, str):
            return high_value
        if high_value < low_value:
            return f"reversed range '{base}' in {name} field"
        low, high = low_value, high_value
    else:
        single = _value(base, field)
        if single is None:
            return invalid
        if isinstance(single, str):
            return single
        low = single
        high = _HIGH[field] if len(parts) == 2 else single
    step = 1
    if len(parts) == 2:
        text = parts[1]
        if text == "":
            return f"missing step in '{item}'"
        if not _DIGITS.fullmatch(text):
            return f"invalid step '{text}' in '{item}'"
        step = int(text)
        if step == 0:
            return f"invalid step {text} in '{item}'"
    return range(low, high + 1, step)


def parse(expr: str) -> Schedule | str:
    """The schedule an expression describes, or the reason it is invalid."""
    trimmed = expr.strip(_WS)
    fields = _WS_RUN.split(trimmed) if trimmed else []
    if fields and fields[0].startswith("@"):
        return f"macro '{fields[0]}' is not supported; write the five fields instead"
    if len(fields) != 5:
        return f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}"
    sets: list[frozenset[int]] = []
    for field, text in enumerate(fields):
        values: set[int] = set()
        for item in text.split(","):
            got = _item(item, field)
            if isinstance(got, str):
                return got
            values.update(got)
        sets.append(frozenset(values))
    days_restricted = fields[_DOM] != "*"
    weekdays_restricted = fields[_DOW] != "*"
    # Day-of-week a lone '*': only the day-of-month decides, and it must name a day that some
    # month has.
    if (
        days_restricted
        and not weekdays_restricted
        and not any(day <= _MONTH_DAYS[m - 1] for day in sets[_DOM] for m in sets[_MONTH])
    ):
        return f"day-of-month '{fields[_DOM]}' never occurs in month '{fields[_MONTH]}'"
    return Schedule(
        minutes=sets[0],
        hours=sets[1],
        days=sets[_DOM],
        months=sets[_MONTH],
        weekdays=frozenset(day % 7 for day in sets[_DOW]),
        days_restricted=days_restricted,
        weekdays_restricted=weekdays_restricted,
    )


def cron_error(expr: str) -> str | None:
    """Why expr is not a valid schedule (the reason only), or None if it is valid."""
    got = parse(expr)
    return got if isinstance(got, str) else None


def _listed(values: frozenset[int]) -> str:
    return ",".join(str(v) for v in sorted(values))


def next_tick(expr: str, after: float) -> float:
    """The first fire time of expr strictly after ``after`` (epoch seconds; UTC throughout).

    Fire times are whole minutes. Raises CronError (a ValueError) for an invalid expression,
    with the message df.wait_for_schedule would give.
    """
    schedule = parse(expr)
    if isinstance(schedule, str):
        raise CronError(f"Invalid cron expression '{expr}': {schedule}")
    # cronsim looks from the second after its start; starting at floor(after) makes that
    # "strictly after `after`" for fractional times too, without float rounding.
    start = datetime.fromtimestamp(math.floor(after), UTC)
    # Both day fields restricted: neither text starts with '*', so cronsim ORs them; one a
    # lone '*': it matches every day and cronsim ANDs them, i.e. only the other one counts.
    canonical = " ".join(
        (
            _listed(schedule.minutes),
            _listed(schedule.hours),
            _listed(schedule.days) if schedule.days_restricted else "*",
            _listed(schedule.months),
            _listed(schedule.weekdays) if schedule.weekdays_restricted else "*",
        )
    )
    return next(CronSim(canonical, start)).timestamp()
