"""How a step's result string reads as a value and as a condition (docs/reference.md#conditions).

Pure: no I/O. An IF condition or a while-loop condition is a node whose result string is
turned into one JSON value (:func:`condition_value`) and then into a boolean
(:func:`truthy`). :func:`parse_result` is the shared rule "a result string is JSON, and text
that is not JSON counts as a JSON string", also used by variable substitution.
"""

from __future__ import annotations

import json
import math
import re
from typing import NoReturn

__all__ = ["condition_value", "is_true", "parse_result", "truthy"]

# Rust's `str::trim` strips Unicode White_Space; Python's `str.strip()` also strips
# U+001C..U+001F, so the set is spelled out to match pg_durable exactly.
_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)

# The grammar of Rust's `f64::from_str` (what pg_durable uses): Python's float() would also
# accept underscores, non-ASCII digits and surrounding whitespace.
_FLOAT = re.compile(
    r"[+-]?(?:inf|infinity|nan|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?)",
    re.IGNORECASE | re.ASCII,
)

_TRUE_WORDS = frozenset({"true", "t", "yes"})
_FALSE_WORDS = frozenset({"false", "f", "no"})


def _reject_constant(name: str) -> NoReturn:
    # Python's json accepts NaN/Infinity/-Infinity, which are not JSON: such text is a
    # plain (non-JSON) result, as it is for pg_durable's serde_json.
    raise ValueError(f"not JSON: {name}")


def _finite_float(text: str) -> float:
    # A number beyond the float range (1e400) makes the text non-JSON, as in serde_json,
    # rather than an infinity that has no JSON spelling.
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number out of range: {text}")
    return value


def parse_result(result: str) -> object:
    """Parse a step result string as JSON; text that is not JSON is a JSON string.

    Objects keep their key order; with duplicate keys the last value wins at the first
    key's position. Numbers beyond the float range make the text non-JSON.
    """
    try:
        return json.loads(result, parse_float=_finite_float, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return result


def condition_value(result: str) -> object:
    """The value a condition result stands for.

    A SQL row set (`{"rows": [...], ...}`) gives ``False`` when it has no rows, else the first
    column of its first row. A first row without columns (or that is not an object) falls
    through to the whole JSON value, as does every other result.
    """
    value = parse_result(result)
    if isinstance(value, dict):
        rows = value.get("rows")
        if isinstance(rows, list):
            if not rows:
                return False
            first = rows[0]
            if isinstance(first, dict) and first:
                return next(iter(first.values()))
    return value


def truthy(value: object) -> bool:
    """Whether a JSON value counts as true.

    Booleans are themselves, numbers are true when non-zero, null is false, arrays and
    objects when non-empty. Strings are trimmed: empty is false; `true`/`t`/`yes` and
    `false`/`f`/`no` (any case) are what they say; text that parses as a float is true
    when non-zero (so `"NaN"` is true); any other text is true.
    """
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, list | dict):
        return len(value) > 0
    if isinstance(value, str):
        text = value.strip(_WHITESPACE)
        if not text:
            return False
        word = text.lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        if _FLOAT.fullmatch(text):
            return float(text) != 0
        return True
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def is_true(result: str) -> bool:
    """Whether a condition node's result string counts as true."""
    return truthy(condition_value(result))
