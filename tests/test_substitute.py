"""Variable substitution (docs/reference.md#references). Pure: no database."""

from __future__ import annotations

import json

import pytest

from pgdurable.core.substitute import (
    MAX_EXPANDED_ROWS,
    SubstitutionError,
    substitute_raw,
    substitute_sql,
)


def rowset(*rows: dict[str, object]) -> str:
    return json.dumps({"rows": list(rows), "row_count": len(rows)}, separators=(",", ":"))


RESULTS = {
    "r": rowset(
        {
            "id": 1,
            "name": "O'Brien",
            "price": "100.50",
            "ok": True,
            "meta": {"k": [1, 2]},
            "tags": ["a", "b"],
            "note": None,
            "uni": "é ✓ 日本 😀",
            "path": "C:\\tmp\\x",
            "neg": -2,
            "f": 1.5,
            "tiny": 1e-7,
            "big": 12345678901234567890,
            "no": False,
        }
    ),
    "batch": rowset({"id": 1, "name": "a"}, {"id": 2, "name": "b'c"}),
    "empty": '{"rows":[],"row_count":0}',
    "nul": rowset({"v": None, "w": 2}),
    "a": rowset({"x": 1}),
    "ab": rowset({"x": 2}),
    "zc": '{"rows":[{}],"row_count":1}',
    "resp": '{"status":200,"body":"it\'s","encoding":"text","headers":{"content-type":'
    '"text/plain"},"ok":true,"duration_ms":12}',
    "sig": '{"signal_name":"go","timed_out":false,"data":{"approved":true}}',
    "sigto": '{"signal_name":"go","timed_out":true,"data":null}',
    "j": '[{"rows":[{"a":1}],"row_count":1},{"slept":true,"seconds":1}]',
    "brk": '"done"',
    "brknull": "null",
    "txt": "plain 'text'",
    "sl": '{"slept": true, "seconds": 5}',
    "num": "42",
    "inject": rowset({"s": "$r {v} {sys_instance_id}"}),
}
VARIABLES = {"v": "O'Brien", "ref": "$r.name", "tbl": "orders", "p": "{v}", "bare": "$r"}
INSTANCE = "abcd1234"


def sql(template: str, label: str | None = "nightly") -> str:
    return substitute_sql(template, RESULTS, VARIABLES, INSTANCE, label)


def raw(template: str, label: str | None = "nightly") -> str:
    return substitute_raw(template, RESULTS, VARIABLES, INSTANCE, label)


# -- pass 1: braces ----------------------------------------------------------------------------

BRACES = [
    ("{sys_instance_id}", "abcd1234"),
    ("SELECT '{sys_label}'", "SELECT 'nightly'"),
    ("SELECT * FROM {tbl}", "SELECT * FROM orders"),
    ("{v}", "O'Brien"),  # raw text: no quoting
    ("'{v}'", "'O'Brien'"),
    ("{tbl}_{tbl}", "orders_orders"),
    ("{tbl}{tbl}", "ordersorders"),
    ("{missing}", "{missing}"),
    ("{ tbl }", "{ tbl }"),
    ("{1tbl}", "{1tbl}"),
    ("{tbl-1}", "{tbl-1}"),
    ("{}", "{}"),
    ("{", "{"),
    ("}", "}"),
    ("{tbl", "{tbl"),
    ("}{tbl}", "}orders"),
    ("{{tbl}}", "{orders}"),
    ('{"a":1}', '{"a":1}'),
    ('SELECT \'{"a": {"b": [1, 2]}}\'::jsonb', 'SELECT \'{"a": {"b": [1, 2]}}\'::jsonb'),
    ('{"t":{tbl}}', '{"t":orders}'),
    ("{p}", "{v}"),  # inserted text is not rescanned for braces
    ("{TBL}", "{TBL}"),  # names are case-sensitive
    ("{sys_instance_id}{sys_label}", "abcd1234nightly"),
    ("é{tbl}é", "éordersé"),
]


@pytest.mark.parametrize(("template", "expected"), BRACES)
def test_braces(template: str, expected: str) -> None:
    assert sql(template) == expected
    assert raw(template) == expected


def test_sys_label_without_label_is_empty() -> None:
    assert sql("x{sys_label}x", label=None) == "xx"
    assert sql("x{sys_label}x", label="") == "xx"


def test_system_names_win_over_variables() -> None:
    variables = {"sys_label": "var", "sys_instance_id": "var"}
    assert substitute_sql("{sys_label} {sys_instance_id}", {}, variables, "i", "L") == "L i"


def test_variable_names_must_be_identifiers() -> None:
    assert substitute_sql("{a b} {a-b} {é}", {}, {"a b": "x", "a-b": "y", "é": "z"}, "i", None) == (
        "{a b} {a-b} {é}"
    )


def test_variable_may_inject_a_dollar_reference() -> None:
    assert sql("SELECT {ref}") == "SELECT 'O''Brien'"
    assert sql("SELECT {bare}") == "SELECT 1"
    assert raw("{ref}") == "O'Brien"
    assert substitute_sql("{x}", {}, {"x": "$nobody"}, "i", None) == "$nobody"


# -- pass 2: dollar references, SQL mode -------------------------------------------------------

SQL_MODE = [
    # $name: first column of the first row
    ("SELECT $r", "SELECT 1"),
    ("SELECT $r;", "SELECT 1;"),
    ("$r-1", "1-1"),
    ("($r)", "(1)"),
    ("$r$r", "1 1"),  # set apart: PostgreSQL would read 11 as one number
    ("$r é", "1 é"),
    ("$rééé", "1 ééé"),  # identifiers are ASCII: é ends the name
    ("$r?", "1"),
    ("$r??", "1?"),
    ("$r.id", "1"),
    ("$r.id?", "1"),
    # value rendering
    ("$r.name", "'O''Brien'"),
    ("$r.name?", "'O''Brien'"),
    ("$r.price", "'100.50'"),  # numeric columns arrive as strings
    ("$r.ok", "true"),
    ("$r.no", "false"),
    ("$r.neg", "(-2)"),  # so 0-$r.neg is 0-(-2), never the comment 0--2
    ("$r.f", "1.5"),
    ("$r.tiny", "1e-07"),
    ("$r.big", "12345678901234567890"),
    ("$r.meta", "'{\"k\":[1,2]}'"),
    ("$r.tags", '\'["a","b"]\''),
    ("$r.uni", "'é ✓ 日本 😀'"),
    ("$r.path", "'C:\\tmp\\x'"),  # backslashes untouched
    ("$r.note?", "NULL"),
    # missing fields stay for PostgreSQL to report
    ("SELECT $r.missing", "SELECT $r.missing"),
    ("SELECT $r.missing?", "SELECT $r.missing?"),
    ("$r.missing, $r.id", "$r.missing, 1"),
    ("$resp.nope", "$resp.nope"),
    # `$x.` + a non-identifier is a bare `$x`
    ("$r.", "1 ."),  # set apart: PostgreSQL would read 1. as one number
    ("$r.1", "1 .1"),
    ("$r. x", "1 . x"),
    ("$r.id.name", "1 .name"),
    ("$r.(", "1 .("),
    # no rows / NULL, null-safe
    ("$empty?", "NULL"),
    ("$empty.x?", "NULL"),
    ("$nul?", "NULL"),
    ("$nul.v?", "NULL"),
    ("$nul.w", "2"),
    ("$sigto.data?", "NULL"),
    # names: longest first, next-char rule
    ("$a $ab", "1 2"),
    ("$a.x $ab.x", "1 2"),
    ("$abc", "$abc"),
    ("$a_", "$a_"),
    ("$a1", "$a1"),
    ("$rx", "$rx"),
    ("$R", "$R"),
    # what is not a reference
    ("$$", "$$"),
    ("$$ SELECT 1 $$", "$$ SELECT 1 $$"),
    ("DO $body$ BEGIN PERFORM $r; END $body$", "DO $body$ BEGIN PERFORM 1; END $body$"),
    ("$$r", "$$r"),  # an (unterminated) dollar quote, as PostgreSQL reads it
    ("$1", "$1"),
    ("$unknown", "$unknown"),
    ("$", "$"),
    ("cost: 5$", "cost: 5$"),
    ("$ r", "$ r"),
    ("", ""),
    # JSON braces in SQL are left alone
    ("SELECT '{\"a\": $r}'::jsonb", "SELECT '{\"a\": 1}'::jsonb"),
    # results that are not row sets: the whole JSON text, or top-level fields
    ("$resp.status", "200"),
    ("$resp.body", "'it''s'"),
    ("$resp.ok", "true"),
    ("$resp.headers", '\'{"content-type":"text/plain"}\''),
    (
        "$resp",
        '\'{"status":200,"body":"it\'\'s","encoding":"text","headers":'
        '{"content-type":"text/plain"},"ok":true,"duration_ms":12}\'',
    ),
    ("$sig.data", "'{\"approved\":true}'"),
    ("$sig.timed_out", "false"),
    ("$sig.signal_name", "'go'"),
    ("$j", '\'[{"rows":[{"a":1}],"row_count":1},{"slept":true,"seconds":1}]\''),
    ("$j?", '\'[{"rows":[{"a":1}],"row_count":1},{"slept":true,"seconds":1}]\''),
    ("$brk", "'\"done\"'"),
    ("$brk?", "'\"done\"'"),
    ("$brknull", "'null'"),
    ("$txt", "'\"plain ''text''\"'"),  # non-JSON text is a JSON string
    ("$sl", '\'{"slept":true,"seconds":5}\''),  # compact
    ("$sl.seconds", "5"),
    ("$num", "'42'"),
    ("$zc", '\'{"rows":[{}],"row_count":1}\''),  # a row without columns
    # inserted values are not rescanned
    ("$inject", "'$r {v} {sys_instance_id}'"),
]


@pytest.mark.parametrize(("template", "expected"), SQL_MODE)
def test_sql_mode(template: str, expected: str) -> None:
    assert sql(template) == expected


ROWSETS = [
    ("$batch.*", "(VALUES (1,'a'::text), (2,'b''c'::text)) AS \"batch\"(\"id\", \"name\")"),
    (
        "SELECT * FROM $batch.* WHERE id > 1",
        "SELECT * FROM (VALUES (1,'a'::text), "
        '(2,\'b\'\'c\'::text)) AS "batch"("id", "name") WHERE id > 1',
    ),
    ("$empty.*", '(SELECT NULL WHERE false) AS "empty"'),
    ("$a.*", '(VALUES (1)) AS "a"("x")'),
]


@pytest.mark.parametrize(("template", "expected"), ROWSETS)
def test_row_set_expansion(template: str, expected: str) -> None:
    assert sql(template) == expected


def test_row_set_expansion_renders_every_type_and_uses_the_first_rows_columns() -> None:
    result = rowset(
        {"i": 1, "s": "x'y", "b": True, "n": None, "o": {"k": "é"}, "a": [1], "f": 1.5},
        {"i": 2, "extra": "ignored"},
        {"b": False, "i": -3},
    )
    assert substitute_sql("$m.*", {"m": result}, {}, "i", None) == (
        "(VALUES (1,'x''y'::text,true,NULL,'{\"k\":\"é\"}'::text,'[1]'::text,1.5), "
        "(2,NULL,NULL,NULL,NULL,NULL,NULL), (-3,NULL,false,NULL,NULL,NULL,NULL)) "
        'AS "m"("i", "s", "b", "n", "o", "a", "f")'
    )


def test_row_set_expansion_quotes_column_names() -> None:
    result = rowset({'a"b': 1, "?column?": 2, "É": 3})
    assert substitute_sql("$m.*", {"m": result}, {}, "i", None) == (
        '(VALUES (1,2,3)) AS "m"("a""b", "?column?", "É")'
    )


def test_row_set_expansion_limit() -> None:
    at_limit = rowset(*({"n": i} for i in range(MAX_EXPANDED_ROWS)))
    expanded = substitute_sql("$m.*", {"m": at_limit}, {}, "i", None)
    assert expanded.count("(") == MAX_EXPANDED_ROWS + 2
    over = rowset(*({"n": i} for i in range(MAX_EXPANDED_ROWS + 1)))
    with pytest.raises(SubstitutionError) as info:
        substitute_sql("$m.*", {"m": over}, {}, "i", None)
    assert str(info.value) == (
        "$m.* — result has 10001 rows, exceeding the maximum of 10000 for row-set expansion. "
        "Use pagination or intermediate tables for large result sets."
    )


SQL_ERRORS = [
    ("$empty", "$empty has no rows — query returned zero results"),
    ("$empty.x", "$empty has no rows — query returned zero results"),
    ("$nul", "$nul is NULL — first column of first row is NULL"),
    ("$nul.v", "$nul.v is NULL"),
    ("$r.note", "$r.note is NULL"),
    ("$sigto.data", "$sigto.data is NULL"),
    ("$j.x", "$j.x: result is neither a row set nor a JSON object"),
    ("$j.x?", "$j.x: result is neither a row set nor a JSON object"),
    ("$brk.x", "$brk.x: result is neither a row set nor a JSON object"),
    ("$txt.x", "$txt.x: result is neither a row set nor a JSON object"),
    ("$num.x", "$num.x: result is neither a row set nor a JSON object"),
    ("$brknull.x", "$brknull.x: result is neither a row set nor a JSON object"),
    ("$resp.*", "$resp.* — invalid result format"),
    ("$brk.*", "$brk.* — invalid result format"),
    ("$j.*", "$j.* — invalid result format"),
    ("$txt.*", "$txt.* — invalid result format"),
    ("SELECT 1 FROM $r.*, $empty", "$empty has no rows — query returned zero results"),
]


@pytest.mark.parametrize(("template", "message"), SQL_ERRORS)
def test_sql_mode_errors(template: str, message: str) -> None:
    with pytest.raises(SubstitutionError) as info:
        sql(template)
    assert str(info.value) == message


def test_rows_that_are_not_objects_are_not_a_row_set_for_expansion() -> None:
    with pytest.raises(SubstitutionError, match=r"^\$m\.\* — invalid result format$"):
        substitute_sql("$m.*", {"m": '{"rows":[1,2]}'}, {}, "i", None)


# -- raw mode ----------------------------------------------------------------------------------

RAW_MODE = [
    ("$r", "1"),
    ("$r.name", "O'Brien"),
    ("$r.price", "100.50"),
    ("$r.ok", "true"),
    ("$r.f", "1.5"),
    ("$r.meta", '{"k":[1,2]}'),
    ("$r.tags", '["a","b"]'),
    ("$r.uni", "é ✓ 日本 😀"),
    ("$r.path", "C:\\tmp\\x"),
    ("$r.note?", "NULL"),
    ("$r.missing?", "NULL"),
    ("$empty?", "NULL"),
    ("$empty.x?", "NULL"),
    ("$batch.*", '[{"id":1,"name":"a"},{"id":2,"name":"b\'c"}]'),
    ("$empty.*", "[]"),
    ("$resp.body", "it's"),
    ("$resp.status", "200"),
    (
        "$resp",
        '{"status":200,"body":"it\'s","encoding":"text","headers":{"content-type":'
        '"text/plain"},"ok":true,"duration_ms":12}',
    ),
    ("$sig.data", '{"approved":true}'),
    ("$brk", '"done"'),
    ("$brknull", "null"),
    ("$txt", "\"plain 'text'\""),
    ("$sl", '{"slept":true,"seconds":5}'),
    ("https://x.example/{tbl}/$r.id/?q=$r.name", "https://x.example/orders/1/?q=O'Brien"),
    ("https://x.example/$r.id?q=1", "https://x.example/1q=1"),  # `?` right after is null-safe
    ("$$ $1 $unknown {missing}", "$$ $1 $unknown {missing}"),
    ("$inject", "$r {v} {sys_instance_id}"),
]


@pytest.mark.parametrize(("template", "expected"), RAW_MODE)
def test_raw_mode(template: str, expected: str) -> None:
    assert raw(template) == expected


RAW_ERRORS = [
    (
        "$r.missing",
        "$r.missing: result has no field 'missing' (available: big, f, id, meta, name, neg, "
        "no, note, ok, path, price, tags, tiny, uni)",
    ),
    (
        "$resp.nope",
        "$resp.nope: result has no field 'nope' (available: body, duration_ms, encoding, "
        "headers, ok, status)",
    ),
    ("$zc.x", "$zc.x: result has no field 'x' (available: )"),
    ("$empty", "$empty has no rows — query returned zero results"),
    ("$nul", "$nul is NULL — first column of first row is NULL"),
    ("$nul.v", "$nul.v is NULL"),
    ("$j.x", "$j.x: result is neither a row set nor a JSON object"),
    ("$resp.*", "$resp.* — invalid result format"),
]


@pytest.mark.parametrize(("template", "message"), RAW_ERRORS)
def test_raw_mode_errors(template: str, message: str) -> None:
    with pytest.raises(SubstitutionError) as info:
        raw(template)
    assert str(info.value) == message


def test_raw_mode_has_no_row_limit() -> None:
    big = rowset(*({"n": i} for i in range(MAX_EXPANDED_ROWS + 1)))
    assert len(json.loads(substitute_raw("$m.*", {"m": big}, {}, "i", None))) == 10_001


# -- odd inputs --------------------------------------------------------------------------------


def test_no_names_leaves_dollars_alone() -> None:
    assert substitute_sql("SELECT $1, $a, $$x$$", {}, {}, "i", None) == "SELECT $1, $a, $$x$$"


def test_an_empty_name_is_ignored() -> None:
    assert substitute_sql("$ $$ $.", {"": '"x"'}, {}, "i", None) == "$ $$ $."


def test_same_result_referenced_many_times() -> None:
    assert sql("$r.id,$r.neg,$r,$batch.*") == (
        "1,(-2),1,(VALUES (1,'a'::text), (2,'b''c'::text)) AS \"batch\"(\"id\", \"name\")"
    )


def test_substitution_error_is_an_exception_with_the_message() -> None:
    error = SubstitutionError("$x has no rows — query returned zero results")
    assert isinstance(error, Exception)
    assert str(error) == "$x has no rows — query returned zero results"
