"""SQL-mode substitution reads the template as PostgreSQL's lexer does, so that a value
(perhaps outside data: an HTTP response, a signal payload, rows another role wrote) never
changes how the statement around its reference is read. Pure: no database."""

from __future__ import annotations

import json

import pytest

from pgdurable.core.substitute import SubstitutionError, substitute_sql

ATTACKS = {
    "q": "x' || current_user || '",
    "bs": "x\\' OR true --",
    "dq": 'a" OR true --',
    "dollar": "x$$ || current_user || $$",
    "nl": "x\nDROP TABLE t",
}
NUMBERS = {"r": 1, "neg": -2, "nul": None}


def rowset(value: object) -> str:
    return json.dumps({"rows": [{"v": value}], "row_count": 1})


NAMES = {name: rowset(v) for name, v in {**ATTACKS, **NUMBERS}.items()}
NAMES["batch"] = json.dumps({"rows": [{"id": 1}], "row_count": 1})

Q = "x'' || current_user || ''"  # ATTACKS["q"] with its quotes doubled

CONTEXTS = [
    # code: a literal; negative numbers in parentheses (0-$neg is never 0--2)
    ("SELECT $q", f"SELECT '{Q}'"),
    ("SELECT 0-$neg", "SELECT 0-(-2)"),
    # inside a string: the value's text with quotes doubled, still one string
    ("SELECT 'Dear $q'", f"SELECT 'Dear {Q}'"),
    ("SELECT 'n=$r'", "SELECT 'n=1'"),
    ("SELECT '$neg seconds'::interval", "SELECT '-2 seconds'::interval"),
    ("SELECT '$nul?'", "SELECT 'NULL'"),
    ("SELECT 'it''s $r'", "SELECT 'it''s 1'"),
    ("SELECT '{\"a\": $r}'::jsonb", "SELECT '{\"a\": 1}'::jsonb"),
    # standard strings read no backslashes; E'' and U&'' strings do: doubled as well
    ("SELECT '$bs'", "SELECT 'x\\'' OR true --'"),
    ("SELECT E'$bs'", "SELECT E'x\\\\'' OR true --'"),
    ("SELECT e'\\'$bs'", "SELECT e'\\'x\\\\'' OR true --'"),
    ("SELECT U&'$bs'", "SELECT U&'x\\\\'' OR true --'"),
    ("SELECT name'$r'", "SELECT name'1'"),  # a word ending in e is no E prefix
    # quoted identifiers: " doubled
    ('SELECT 1 AS "$dq"', 'SELECT 1 AS "a"" OR true --"'),
    # comments: references left alone
    ("SELECT 1 -- $nl", "SELECT 1 -- $nl"),
    ("SELECT 1 /* $q /* $q */ $q */, $r", "SELECT 1 /* $q /* $q */ $q */, 1"),
    ("SELECT '--', $r", "SELECT '--', 1"),
    ("SELECT 1 -- $q\n, $r", "SELECT 1 -- $q\n, 1"),
    # dollar-quoted text is code again (a DO or function body)
    ("DO $$ BEGIN PERFORM $q; END $$", f"DO $$ BEGIN PERFORM '{Q}'; END $$"),
    ("DO $b$ BEGIN RAISE '%', '$q'; END $b$", f"DO $b$ BEGIN RAISE '%', '{Q}'; END $b$"),
    ("SELECT $t$ $r $t$, $r", "SELECT $t$ 1 $t$, 1"),
    ("SELECT $r$r", "SELECT 1 1"),  # references, not a $r$ quote: PostgreSQL never sees one
    # a literal is set apart from what it would fuse with (a1$ would be one identifier)
    ("SELECT a$r$, $r", "SELECT a 1 $, 1"),
    # unterminated quotes run to the end, as in PostgreSQL (which then reports them)
    ("SELECT 'abc $q", f"SELECT 'abc {Q}"),
]


@pytest.mark.parametrize(("template", "expected"), CONTEXTS)
def test_references_are_written_for_their_lexical_context(template: str, expected: str) -> None:
    assert substitute_sql(template, NAMES, {}, "abcd1234", None) == expected


@pytest.mark.parametrize(
    "template",
    ["SELECT $$Dear $dollar$$", "DO $$ BEGIN RAISE NOTICE '$dollar'; END $$"],
)
def test_a_value_that_would_end_its_dollar_quote_is_refused(template: str) -> None:
    with pytest.raises(SubstitutionError, match=r"contains \$\$, which would end"):
        substitute_sql(template, NAMES, {}, "abcd1234", None)


def test_a_row_set_cannot_stand_inside_quotes() -> None:
    with pytest.raises(SubstitutionError, match=r"\$batch\.\* cannot stand inside"):
        substitute_sql("SELECT '$batch.*'", NAMES, {}, "abcd1234", None)
