"""Conditions: result strings as values, and truthiness (docs/reference.md#conditions). Pure."""

from __future__ import annotations

import pytest

from pgdurable.core.truth import condition_value, is_true, parse_result, truthy

HTTP = '{"status":404,"body":"","encoding":"text","headers":{},"ok":false,"duration_ms":3}'


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ('{"a":1}', {"a": 1}),
        ('{"b":1,"a":2}', {"b": 1, "a": 2}),
        ('{"a":1,"b":2,"a":3}', {"a": 3, "b": 2}),
        ("[1,2.5,null,true]", [1, 2.5, None, True]),
        ('"done"', "done"),
        ("42", 42),
        ("  42 ", 42),
        ("null", None),
        ("12345678901234567890123", 12345678901234567890123),
        ("done", "done"),  # not JSON: a JSON string
        ("", ""),
        ("NaN", "NaN"),  # Python's json would accept these; JSON does not
        ("Infinity", "Infinity"),
        ("-Infinity", "-Infinity"),
        ("[NaN]", "[NaN]"),
        ("1e400", "1e400"),  # beyond the float range, as serde_json refuses it
        ("{'a': 1}", "{'a': 1}"),
        ('{"a":1} x', '{"a":1} x'),
        ("[" * 100_000 + "]" * 100_000, "[" * 100_000 + "]" * 100_000),
    ],
)
def test_parse_result(result: str, expected: object) -> None:
    got = parse_result(result)
    assert got == expected
    assert type(got) is type(expected)
    if isinstance(expected, dict):
        assert list(got) == list(expected)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ('{"rows":[],"row_count":0}', False),
        ('{"rows":[{"a":1}],"row_count":1}', 1),
        ('{"rows":[{"a":1,"b":0}],"row_count":1}', 1),
        ('{"rows":[{"b":0,"a":1}],"row_count":1}', 0),
        ('{"rows":[{"a":null,"b":1}],"row_count":1}', None),
        ('{"rows":[{"a":"0.00"}],"row_count":1}', "0.00"),
        ('{"rows":[{"a":{"k":1}}],"row_count":1}', {"k": 1}),
        ('{"rows":[{"a":1}],"row_count":1}', 1),
        ('{"rows":[{"a":1},{"a":0}],"row_count":2}', 1),
        # a row without columns falls through to the whole object
        ('{"rows":[{}],"row_count":1}', {"rows": [{}], "row_count": 1}),
        ('{"rows":[5]}', {"rows": [5]}),
        ('{"rows":"x"}', {"rows": "x"}),
        ('{"rows":[]}', False),
        ('{"slept": true, "seconds": 5}', {"slept": True, "seconds": 5}),
        ('[{"rows":[],"row_count":0}]', [{"rows": [], "row_count": 0}]),
        ('"done"', "done"),
        ("done", "done"),
        ("null", None),
        ("0", 0),
    ],
)
def test_condition_value(result: str, expected: object) -> None:
    got = condition_value(result)
    assert got == expected
    assert type(got) is type(expected)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        (None, False),
        (0, False),
        (1, True),
        (-1, True),
        (0.0, False),
        (-0.0, False),
        (0.5, True),
        (float("nan"), True),
        ([], False),
        ([0], True),
        ({}, False),
        ({"a": None}, True),
        ("", False),
        ("   ", False),
        ("\t\n\r", False),
        ("\u00a0\u3000", False),  # Unicode White_Space is trimmed
        ("true", True),
        ("TRUE", True),
        (" True ", True),
        ("t", True),
        ("T", True),
        ("yes", True),
        ("YES", True),
        ("false", False),
        ("FALSE", False),
        (" false\n", False),
        ("f", False),
        ("F", False),
        ("no", False),
        ("No", False),
        ("0", False),
        ("0.00", False),
        ("-0", False),
        ("+0", False),
        ("-0.0e10", False),
        (".0", False),
        ("0.", False),
        ("1e-400", False),  # parses, to 0.0
        ("\u00a00\u00a0", False),
        ("1", True),
        ("-1.5", True),
        ("1e3", True),
        ("NaN", True),
        ("nan", True),
        ("inf", True),
        ("-Infinity", True),
        ("1e400", True),
        ("abc", True),
        ("off", True),  # only true/t/yes and false/f/no are words
        ("n", True),
        ("y", True),
        ("nope", True),
        (".", True),
        ("1e", True),
        ("e5", True),
        ("0x0", True),  # no hex floats
        ("0_0", True),  # Python's float() would read 0; Rust's f64 parser does not
        ("\u0660", True),  # ARABIC-INDIC DIGIT ZERO: not an ASCII digit
        ("\x1c0", True),  # U+001C is not White_Space: not trimmed, so not a number
        ("\u0131nf", True),  # dotless i: not "inf"
        ("0 0", True),
    ],
)
def test_truthy(value: object, expected: bool) -> None:
    assert truthy(value) is expected


def test_truthy_rejects_non_json_values() -> None:
    with pytest.raises(TypeError):
        truthy(object())


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ('{"rows":[{"x":true}],"row_count":1}', True),
        ('{"rows":[{"x":false}],"row_count":1}', False),
        ('{"rows":[{"x":1}],"row_count":1}', True),
        ('{"rows":[{"x":0}],"row_count":1}', False),
        ('{"rows":[{"x":"100.50"}],"row_count":1}', True),  # numeric columns are strings
        ('{"rows":[{"x":"0.00"}],"row_count":1}', False),
        ('{"rows":[{"x":"NaN"}],"row_count":1}', True),
        ('{"rows":[{"x":null}],"row_count":1}', False),
        ('{"rows":[{"x":"yes"}],"row_count":1}', True),
        ('{"rows":[{"x":"no"}],"row_count":1}', False),
        ('{"rows":[{"x":""}],"row_count":1}', False),
        ('{"rows":[{"x":[]}],"row_count":1}', False),
        ('{"rows":[{"x":{}}],"row_count":1}', False),
        ('{"rows":[{"x":{"k":0}}],"row_count":1}', True),
        ('{"rows":[],"row_count":0}', False),
        ('{"rows":[{}],"row_count":1}', True),
        ('{"rows":[{"x":false},{"x":true}],"row_count":2}', False),
        (HTTP, True),  # a non-empty object, even for a 404
        ('{"signal_name":"go","timed_out":true,"data":null}', True),
        ('{"slept": true, "seconds": 0}', True),
        ('[{"rows":[],"row_count":0}]', True),
        ("[]", False),
        ("{}", False),
        ("null", False),
        ("true", True),
        ("false", False),
        ("0", False),
        ("2", True),
        ('"false"', False),
        ('"0"', False),
        ('"done"', True),
        ("no", False),  # not JSON: the string "no"
        ("yes", True),
        ("NaN", True),
        ("1e400", True),
        ("", False),
        ("   ", False),
    ],
)
def test_is_true(result: str, expected: bool) -> None:
    assert is_true(result) is expected
