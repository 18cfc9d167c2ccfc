"""The graph DSL in SQL: builders, auto-wrapping, operators and their precedence
(docs/reference.md#building-a-graph).

Regression style: each table row is an SQL expression and the exact text it must produce, or
the exact error it must raise. Every mismatch of a table is reported at once.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
from sqlcheck import Conn, Error, check, outcome

from pgdurable import schema
from pgdurable.embedded import EmbeddedPostgres

# -- helpers ------------------------------------------------------------------------------------


def check_same(conn: Conn, cases: Sequence[tuple[str, str]]) -> None:
    """Each pair of expressions must produce the same text (and not fail)."""
    failures = []
    for left, right in cases:
        got_left, got_right = outcome(conn, left), outcome(conn, right)
        if got_left != got_right or isinstance(got_left, Error):
            failures.append(f"{left}\n    -> {got_left!r}\n{right}\n    -> {got_right!r}")
    assert not failures, f"{len(failures)} of {len(cases)} pairs differ:\n" + "\n".join(failures)


def envelope(node: dict[str, Any]) -> str:
    """How pg_durable (serde_json) prints a node: compact, keys in the canonical order."""
    return json.dumps(node, ensure_ascii=False, separators=(",", ":"))


def sql_node(query: str, name: str | None = None) -> dict[str, Any]:
    node: dict[str, Any] = {"node_type": "SQL", "query": query}
    if name is not None:
        node["result_name"] = name
    return node


def lit(text: str) -> str:
    """An SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


S1 = '{"node_type":"SQL","query":"SELECT 1"}'
S2 = '{"node_type":"SQL","query":"SELECT 2"}'
A = '{"node_type":"SQL","query":"a"}'
B = '{"node_type":"SQL","query":"b"}'
C = '{"node_type":"SQL","query":"c"}'
T = '{"node_type":"SQL","query":"t"}'
E = '{"node_type":"SQL","query":"e"}'


# -- builders -----------------------------------------------------------------------------------


def test_spec_examples_byte_for_byte(conn: Conn) -> None:
    """Every builder's exact JSON, byte for byte as pg_durable writes it, with children A, B, C
    the SQL nodes of 'a', 'b', 'c'."""
    check(
        conn,
        [
            (
                "'SELECT 1' ~> 'SELECT 2'",
                f'{{"node_type":"THEN","left_node":{S1},"right_node":{S2}}}',
            ),
            ("df.sql('SELECT 1')", S1),
            ("df.seq('a', 'b')", f'{{"node_type":"THEN","left_node":{A},"right_node":{B}}}'),
            ("df.as('a', 'n')", '{"node_type":"SQL","query":"a","result_name":"n"}'),
            ("'a' |=> 'n'", '{"node_type":"SQL","query":"a","result_name":"n"}'),
            ("df.join('a', 'b')", f'{{"node_type":"JOIN","left_node":{A},"right_node":{B}}}'),
            ("'a' & 'b'", f'{{"node_type":"JOIN","left_node":{A},"right_node":{B}}}'),
            (
                "df.join3('a', 'b', 'c')",
                f'{{"node_type":"JOIN","left_node":{A},"right_node":{B},"extra_nodes":[{C}]}}',
            ),
            ("df.race('a', 'b')", f'{{"node_type":"RACE","left_node":{A},"right_node":{B}}}'),
            ("'a' | 'b'", f'{{"node_type":"RACE","left_node":{A},"right_node":{B}}}'),
            (
                "df.if('c', 't', 'e')",
                f'{{"node_type":"IF","left_node":{T},"right_node":{E},"condition_node":{C}}}',
            ),
            (
                "df.if_rows('r', 't', 'e')",
                f'{{"node_type":"IF","left_node":{T},"right_node":{E},"query":'
                '"{\\"condition_type\\":\\"result_has_rows\\",\\"result_name\\":\\"r\\"}"}',
            ),
            ("df.loop('b')", f'{{"node_type":"LOOP","left_node":{B}}}'),
            ("@> 'b'", f'{{"node_type":"LOOP","left_node":{B}}}'),
            ("df.loop('b', 'c')", f'{{"node_type":"LOOP","left_node":{B},"condition_node":{C}}}'),
            ("df.break()", '{"node_type":"BREAK","query":"{\\"break_value\\":null}"}'),
            ("df.break('v')", '{"node_type":"BREAK","query":"{\\"break_value\\":\\"v\\"}"}'),
            ("df.sleep(60)", '{"node_type":"SLEEP","query":"60"}'),
            ("df.sleep(0)", '{"node_type":"SLEEP","query":"0"}'),
            (
                "'SELECT true' ?> 'SELECT 1'",
                '{"condition": "SELECT true", "_partial_if": true, "then_branch": "SELECT 1"}',
            ),
            (
                "'c' ?> 't' !> 'e'",
                f'{{"node_type":"IF","left_node":{T},"right_node":{E},"condition_node":{C}}}',
            ),
        ],
    )


def test_builders_compose_children_verbatim(conn: Conn) -> None:
    named = '{"node_type":"SQL","query":"SELECT 1","result_name":"a"}'
    sleep = '{"node_type":"SLEEP","query":"5"}'
    check(
        conn,
        [
            (
                "df.seq(df.sql('SELECT 1') |=> 'a', df.join3('a', df.sleep(5), df.break()))",
                f'{{"node_type":"THEN","left_node":{named},"right_node":'
                f'{{"node_type":"JOIN","left_node":{A},"right_node":{sleep},"extra_nodes":'
                '[{"node_type":"BREAK","query":"{\\"break_value\\":null}"}]}}',
            ),
            # df.as replaces an existing name and keeps result_name last.
            ("df.as(df.as('a', 'x'), 'y')", '{"node_type":"SQL","query":"a","result_name":"y"}'),
            ("df.as(df.sleep(5), 'n')", '{"node_type":"SLEEP","query":"5","result_name":"n"}'),
            (
                "df.as('a' ~> 'b', 'n')",
                f'{{"node_type":"THEN","left_node":{A},"right_node":{B},"result_name":"n"}}',
            ),
            ("df.as('a', '_x9')", '{"node_type":"SQL","query":"a","result_name":"_x9"}'),
            ("df.as('a', 'Ab_C')", '{"node_type":"SQL","query":"a","result_name":"Ab_C"}'),
            # df.loop's condition is optional; NULL means an infinite loop.
            ("df.loop('b', NULL)", f'{{"node_type":"LOOP","left_node":{B}}}'),
            ("df.break(NULL)", '{"node_type":"BREAK","query":"{\\"break_value\\":null}"}'),
            (
                "df.sleep(9223372036854775807)",
                '{"node_type":"SLEEP","query":"9223372036854775807"}',
            ),
        ],
    )


def test_literal_arguments_are_never_wrapped(conn: Conn) -> None:
    check(
        conn,
        [
            # df.sql takes its query literally, even when it looks like an envelope.
            (
                "df.sql(" + lit(S1) + ")",
                envelope(sql_node(S1)),
            ),
            (
                "df.break('SELECT 1')",
                '{"node_type":"BREAK","query":"{\\"break_value\\":\\"SELECT 1\\"}"}',
            ),
            (
                "df.break('{\"a\":1}')",
                envelope({"node_type": "BREAK", "query": envelope({"break_value": '{"a":1}'})}),
            ),
            (
                "df.if_rows('not an identifier!', 't', 'e')",
                envelope(
                    {
                        "node_type": "IF",
                        "left_node": sql_node("t"),
                        "right_node": sql_node("e"),
                        "query": envelope(
                            {
                                "condition_type": "result_has_rows",
                                "result_name": "not an identifier!",
                            }
                        ),
                    }
                ),
            ),
        ],
    )


def test_strict_builders_return_null_on_null(conn: Conn) -> None:
    check(
        conn,
        [
            ("df.sql(NULL)", None),
            ("df.seq(NULL, 'b')", None),
            ("df.seq('a', NULL)", None),
            ("df.as(NULL, 'n')", None),
            ("df.as('a', NULL)", None),
            ("df.join('a', NULL)", None),
            ("df.join3('a', 'b', NULL)", None),
            ("df.race(NULL, 'b')", None),
            ("df.if('c', NULL, 'e')", None),
            ("df.if_rows(NULL, 't', 'e')", None),
            ("df.sleep(NULL)", None),
            ("NULL ~> 'b'", None),
            ("'a' |=> NULL", None),
            ("@> NULL", None),
            ("NULL ?> 't'", None),
            ("'c' ?> 't' !> NULL", None),
            ("df.loop(NULL)", Error("df.loop: body cannot be NULL")),
        ],
    )


def test_builder_errors(conn: Conn) -> None:
    bad = "df.as: result name '{}' is not a valid identifier — must match [a-zA-Z_][a-zA-Z0-9_]*"
    check(
        conn,
        [
            ("df.as('a', '')", Error("df.as: result name cannot be empty")),
            ("'a' |=> ''", Error("df.as: result name cannot be empty")),
            ("df.as('a', '1abc')", Error(bad.format("1abc"))),
            ("df.as('a', 'a-b')", Error(bad.format("a-b"))),
            ("df.as('a', 'a b')", Error(bad.format("a b"))),
            ("df.as('a', 'café')", Error(bad.format("café"))),
            ("df.as('a', 'x''y')", Error(bad.format("x'y"))),
            ("'a' |=> '$x'", Error(bad.format("$x"))),
            ("df.sleep(-1)", Error("Sleep duration must be non-negative")),
            (
                "'x' !> 'e'",
                Error("Invalid if-then-else: left side of !> must be a ?> expression"),
            ),
            (
                "df.sql('x') !> 'e'",
                Error("Invalid if-then-else: left side of !> must be a ?> expression"),
            ),
        ],
    )


# -- auto-wrapping (docs/reference.md#plain-text-is-a-sql-step) ----------------------------------


def test_ensure_rules(conn: Conn) -> None:
    def then_left(left: str) -> str:
        return f'{{"node_type":"THEN","left_node":{left},"right_node":{B}}}'

    check(
        conn,
        [
            # Rule 2: an envelope is used as is; its top level is re-serialised canonically,
            # unknown keys dropped, JSON null members omitted ...
            (
                'df.seq(\'  {"query" : "a",  "node_type" : "SQL", "x": [1, 2]}\', \'b\')',
                then_left(A),
            ),
            (
                'df.seq(\'{"node_type":"SQL","query":"a","left_node":null,'
                "\"result_name\":null}', 'b')",
                then_left(A),
            ),
            # ... while embedded children keep their exact text.
            (
                'df.seq(\'{"node_type":"LOOP", "left_node": {"query" : "x", '
                '"node_type": "SQL"}}\', \'b\')',
                then_left('{"node_type":"LOOP","left_node":{"query" : "x", "node_type": "SQL"}}'),
            ),
            # Rule 4: JSON without node_type, with a non-string one, with an unknown one, and
            # text that merely starts with '{' are SQL text.
            ("df.seq('{\"a\": 1}', 'b')", then_left(envelope(sql_node('{"a": 1}')))),
            (
                "df.seq('{\"node_type\": 5}', 'b')",
                then_left(envelope(sql_node('{"node_type": 5}'))),
            ),
            (
                'df.seq(\'{"node_type":"FOO","query":"x"}\', \'b\')',
                then_left(envelope(sql_node('{"node_type":"FOO","query":"x"}'))),
            ),
            (
                'df.seq(\'{"node_type":"sql","query":"x"}\', \'b\')',
                then_left(envelope(sql_node('{"node_type":"sql","query":"x"}'))),
            ),
            ("df.seq('{not json', 'b')", then_left(envelope(sql_node("{not json")))),
            ("df.seq('[1, 2]', 'b')", then_left(envelope(sql_node("[1, 2]")))),
            ("df.seq('', 'b')", then_left(envelope(sql_node("")))),
            # Rule 3: an envelope that cannot be read is an error.
            (
                'df.seq(\'{"node_type":"THEN","left_node":5,"right_node":{}}\', \'b\')',
                Error(
                    "Invalid Durofut JSON: failed to deserialize workflow step: "
                    "Durofut children must be JSON objects"
                ),
            ),
            (
                'df.seq(\'{"node_type":"IF","condition_node":"x"}\', \'b\')',
                Error(
                    "Invalid Durofut JSON: failed to deserialize workflow step: "
                    "condition_node must be a Durofut JSON object"
                ),
            ),
            (
                'df.seq(\'{"node_type":"JOIN","extra_nodes":{}}\', \'b\')',
                Error(
                    "Invalid Durofut JSON: failed to deserialize workflow step: "
                    "extra_nodes must be an array of Durofut JSON objects"
                ),
            ),
            (
                'df.seq(\'{"node_type":"JOIN","extra_nodes":[{}, 1]}\', \'b\')',
                Error(
                    "Invalid Durofut JSON: failed to deserialize workflow step: "
                    "extra_nodes entries must be Durofut JSON objects"
                ),
            ),
            (
                'df.seq(\'{"node_type":"SQL","query":5}\', \'b\')',
                Error(
                    "Invalid Durofut JSON: failed to deserialize workflow step: "
                    "invalid type: query must be a string"
                ),
            ),
            (
                'df.seq(\'{"node_type":"FOO","result_name":[]}\', \'b\')',
                Error(
                    "Invalid Durofut JSON: failed to deserialize workflow step: "
                    "invalid type: result_name must be a string"
                ),
            ),
        ],
    )


def test_every_node_typed_argument_is_wrapped(conn: Conn) -> None:
    """All node-typed parameters auto-wrap plain text; results equal the explicit df.sql()."""
    check_same(
        conn,
        [
            ("df.seq('a', 'b')", "df.seq(df.sql('a'), df.sql('b'))"),
            ("df.as('a', 'n')", "df.as(df.sql('a'), 'n')"),
            ("df.join('a', 'b')", "df.join(df.sql('a'), df.sql('b'))"),
            ("df.join3('a', 'b', 'c')", "df.join3(df.sql('a'), df.sql('b'), df.sql('c'))"),
            ("df.race('a', 'b')", "df.race(df.sql('a'), df.sql('b'))"),
            ("df.if('c', 't', 'e')", "df.if(df.sql('c'), df.sql('t'), df.sql('e'))"),
            ("df.if_rows('r', 't', 'e')", "df.if_rows('r', df.sql('t'), df.sql('e'))"),
            ("df.loop('b', 'c')", "df.loop(df.sql('b'), df.sql('c'))"),
            ("'c' ?> 't' !> 'e'", "df.if(df.sql('c'), df.sql('t'), df.sql('e'))"),
        ],
    )


# -- operators (docs/reference.md#operators-and-precedence) --------------------------------------


def test_operators_live_in_pg_catalog_and_resolve_with_any_search_path(conn: Conn) -> None:
    rows = conn.execute(
        """
        SELECT o.oprname, o.oprkind, o.oprleft::regtype::text, o.oprright::regtype::text,
               o.oprcode::regproc::text
          FROM pg_operator o
         WHERE o.oprnamespace = 'pg_catalog'::regnamespace
           AND o.oprcode::regproc::text LIKE 'df.%'
         ORDER BY o.oprname
        """
    ).fetchall()
    assert rows == [
        ("!>", "b", "text", "text", "df.if_else_op"),
        ("&", "b", "text", "text", 'df."join"'),
        ("?>", "b", "text", "text", "df.if_then_op"),
        ("@>", "l", "-", "text", "df.loop_prefix_op"),
        ("|", "b", "text", "text", "df.race"),
        ("|=>", "b", "text", "text", "df.as_op"),
        ("~>", "b", "text", "text", "df.seq"),
    ]
    conn.execute("SET search_path = public")
    check(conn, [("'a' ~> 'b' & 'c' | 'd' |=> 'n' IS NOT NULL", True)])


def test_operator_helpers_volatility_and_strictness(conn: Conn) -> None:
    rows = conn.execute(
        """
        SELECT p.proname, p.provolatile, p.proisstrict, l.lanname
          FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
         WHERE p.pronamespace = 'df'::regnamespace
           AND p.proname IN ('as_op', 'loop_prefix_op', 'if_then_op', 'if_else_op',
                             'sql', 'seq', 'as', 'join', 'join3', 'race', 'if', 'if_rows',
                             'loop', 'break', 'sleep')
         ORDER BY p.proname
        """
    ).fetchall()
    assert rows == [
        ("as", "v", True, "plpgsql"),
        ("as_op", "i", True, "sql"),
        ("break", "v", False, "sql"),
        ("if", "v", True, "sql"),
        ("if_else_op", "i", True, "plpgsql"),
        ("if_rows", "v", True, "sql"),
        ("if_then_op", "i", True, "plpgsql"),
        ("join", "v", True, "sql"),
        ("join3", "v", True, "sql"),
        ("loop", "v", False, "plpgsql"),
        ("loop_prefix_op", "i", True, "sql"),
        ("race", "v", True, "sql"),
        ("seq", "v", True, "sql"),
        ("sleep", "v", True, "plpgsql"),
        ("sql", "v", True, "sql"),
    ]


def test_precedence_as_postgresql_parses_it(conn: Conn) -> None:
    """One precedence level for all these operators, left associative: how PostgreSQL parses
    them, for pgdurable as for pg_durable."""
    check_same(
        conn,
        [
            ("'a' |=> 'n' ~> 'b' |=> 'm'", "df.as(df.seq(df.as('a', 'n'), 'b'), 'm')"),
            ("'a' ~> 'b' & 'c'", "df.join(df.seq('a', 'b'), 'c')"),
            ("'a' & 'b' ~> 'c'", "df.seq(df.join('a', 'b'), 'c')"),
            ("'a' ~> 'b' | 'c'", "df.race(df.seq('a', 'b'), 'c')"),
            ("'a' & 'b' |=> 'n'", "df.as(df.join('a', 'b'), 'n')"),
            ("'c' ?> 't' !> 'e'", "df.if('c', 't', 'e')"),
            ("'x' ~> 'c' ?> 't' !> 'e'", "df.if(df.seq('x', 'c'), 't', 'e')"),
            ("@> 'a' ~> 'b'", "df.seq(df.loop('a'), 'b')"),
            ("@> 'a' | 'b'", "df.race(df.loop('a'), 'b')"),
            ("'s' ~> 'x' || 'y'", "df.seq('s', 'x') || 'y'"),
            # Parenthesised forms build what the documentation suggests.
            ("'a' ~> ('b' & 'c')", "df.seq('a', df.join('b', 'c'))"),
            ("@> ('a' ~> 'b')", "df.loop(df.seq('a', 'b'))"),
            ("'c' ?> ('a' ~> 'b') !> 'e'", "df.if('c', df.seq('a', 'b'), 'e')"),
        ],
    )
    check(
        conn,
        [
            # (a ~> b) = t: comparison binds looser than the DSL operators.
            ("'a' ~> 'b' = df.seq('a', 'b')", True),
            ("'a' ~> 'b' = 'x'", False),
            # The partial IF is swallowed by ~>, so !> has no ?> on its left.
            (
                "'c' ?> 't' ~> 'u' !> 'e'",
                Error("Invalid if-then-else: left side of !> must be a ?> expression"),
            ),
            # Arithmetic binds tighter: the sleep gets 2 * 30 seconds.
            (
                "df.sleep(2 * 30) ~> 'b'",
                f'{{"node_type":"THEN","left_node":{{"node_type":"SLEEP","query":"60"}},"right_node":{B}}}',
            ),
        ],
    )
    # The named THEN of the first row: the name lands on the THEN, not on b.
    assert outcome(conn, "'a' |=> 'n' ~> 'b' |=> 'm'") == envelope(
        {
            "node_type": "THEN",
            "left_node": sql_node("a", "n"),
            "right_node": sql_node("b"),
            "result_name": "m",
        }
    )


def test_and_or_on_other_types_are_untouched(conn: Conn) -> None:
    check(
        conn,
        [
            ("6 & 3", 2),
            ("6 | 3", 7),
            ("B'101' & B'100' = B'100'", True),
            ("ARRAY[1, 2] @> ARRAY[1]", True),
            ("'{\"a\": 1}'::jsonb @> '{}'::jsonb", True),
        ],
    )


# -- text escaping --------------------------------------------------------------------------------

NASTY = [
    "it's",
    'say "hi"',
    "back\\slash",
    "two\nlines\r\n",
    "tab\there",
    "bell\x07 and \x1f and \x7f",
    "emoji 😀 and ñ and 中文",
    "line\u2028separator",
    "/* comment */ -- dash",
    '{"node_type":"SQL"',
    "$1 $$ {var} $x.col",
]


def test_unicode_and_quotes_are_escaped_like_serde_json(conn: Conn) -> None:
    cases: list[tuple[str, object]] = []
    for text in NASTY:
        cases.append((f"df.sql({lit(text)})", envelope(sql_node(text))))
        cases.append((f"{lit(text)} |=> 'n'", envelope(sql_node(text, "n"))))
        cases.append(
            (
                f"{lit(text)} ~> {lit(text)}",
                envelope(
                    {"node_type": "THEN", "left_node": sql_node(text), "right_node": sql_node(text)}
                ),
            )
        )
        cases.append(
            (
                f"df.break({lit(text)})",
                envelope({"node_type": "BREAK", "query": envelope({"break_value": text})}),
            )
        )
        cases.append(
            (
                f"df.if_rows({lit(text)}, 't', 'e')::jsonb ->> 'query'",
                envelope({"condition_type": "result_has_rows", "result_name": text}),
            )
        )
    check(conn, cases)
    # Round trip: nesting an escaped envelope keeps the query text intact.
    for text in NASTY:
        got = outcome(
            conn,
            f"((df.sql({lit(text)}) ~> 'b') ~> 'c')::jsonb #>> '{{left_node,left_node,query}}'",
        )
        assert got == text


# -- non-future helpers: their results are refused as steps -------------------------------------


def helper_error(helper: str) -> Error:
    return Error(f"{helper} cannot be used as a workflow step. Call {helper} before df.start().")


def completed_instance(conn: Conn) -> str:
    """An instance marked completed by hand (no worker runs in these tests)."""
    conn.execute("SET pg_durable.enable_superuser_instances = on")
    row = conn.execute("SELECT df.start('SELECT 1')").fetchone()
    assert row is not None
    conn.execute("UPDATE df.instances SET status = 'completed' WHERE id = %s", (row[0],))
    return str(row[0])


def test_non_future_helpers_are_refused_as_steps(conn: Conn) -> None:
    done = completed_instance(conn)
    await_ = f"df.await_instance('{done}')"
    cases: list[tuple[str, object]] = []
    for call, helper in [
        ("df.setvar('k', 'v')", "df.setvar()"),
        ("df.unsetvar('k')", "df.unsetvar()"),
        ("df.clearvars()", "df.clearvars()"),
        (await_, "df.await_instance()"),
    ]:
        cases += [
            (f"df.seq({call}, 'SELECT 1')", helper_error(helper)),
            (f"'SELECT 1' ~> {call}", helper_error(helper)),
            (f"{call} & 'SELECT 1'", helper_error(helper)),
            (f"df.join3('a', 'b', {call})", helper_error(helper)),
            (f"{call} | 'SELECT 1'", helper_error(helper)),
            (f"df.if({call}, 't', 'e')", helper_error(helper)),
            (f"df.if_rows('r', 't', {call})", helper_error(helper)),
            (f"df.loop('b', {call})", helper_error(helper)),
            # The IMMUTABLE operator helpers: not constant-folded past the check.
            (f"{call} |=> 'n'", helper_error(helper)),
            (f"@> {call}", helper_error(helper)),
            (f"{call} ?> 't' !> 'e'", helper_error(helper)),
            (f"'c' ?> {call} !> 'e'", helper_error(helper)),
            (f"'c' ?> 't' !> {call}", helper_error(helper)),
            (
                f"df.start({call})",
                Error("Invalid durable function: " + helper_error(helper).message),
            ),
        ]
    check(conn, cases)


def test_non_future_helper_check_survives_cached_plans(conn: Conn) -> None:
    """Prepared statements and PL/pgSQL switch to cached generic plans after five runs."""
    conn.execute("PREPARE named_setvar(text) AS SELECT df.setvar($1, 'v') |=> 'n'")
    conn.execute(
        """
        CREATE FUNCTION pg_temp.loop_setvar() RETURNS text LANGUAGE plpgsql AS $$
        BEGIN
            RETURN @> df.setvar('k', 'v');
        END $$
        """
    )
    for _ in range(8):
        with pytest.raises(
            psycopg.Error, match=r"df\.setvar\(\) cannot be used as a workflow step"
        ):
            conn.execute("EXECUTE named_setvar('k')")
        with pytest.raises(
            psycopg.Error, match=r"df\.setvar\(\) cannot be used as a workflow step"
        ):
            conn.execute("SELECT pg_temp.loop_setvar()")


def test_non_future_helpers_do_not_poison_other_steps(conn: Conn) -> None:
    """Only the helper's own result is refused, so ordinary steps in the same statement,
    in the same query string, or in the same PL/pgSQL block still work."""
    s12 = f'{{"node_type":"THEN","left_node":{S1},"right_node":{S2}}}'
    check(conn, [("df.setvar('k', 'v') || df.seq('SELECT 1', 'SELECT 2')", "OK" + s12)])
    # One simple-query string: both statements share statement_timestamp().
    cur = conn.execute("SELECT df.setvar('k', 'v'); SELECT 'SELECT 1' ~> 'SELECT 2'")
    assert cur.fetchone() == ("OK",)
    assert cur.nextset()
    assert cur.fetchone() == (s12,)
    conn.execute(
        """
        DO $$
        BEGIN
            PERFORM df.setvar('k', 'v');
            IF df.seq('SELECT 1', 'SELECT 2') IS NULL THEN
                RAISE EXCEPTION 'unreachable';
            END IF;
        END $$
        """
    )
    # A later statement may use the word 'OK' as (odd) SQL text.
    check(conn, [("'OK' |=> 'n'", envelope(sql_node("OK", "n")))])


def test_operators_fall_back_to_schema_df_without_superuser(cluster: EmbeddedPostgres) -> None:
    """On managed PostgreSQL the installer is no superuser: the operators go into df."""
    suffix = uuid.uuid4().hex[:8]
    role, db = f"pgd_installer_{suffix}", f"pgd_managed_{suffix}"
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"CREATE DATABASE {db} OWNER {role}")
    try:
        notices: list[str] = []
        with psycopg.connect(cluster.dsn(db, user=role)) as c:
            c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
            schema.install(c)
            assert any("created in schema df" in n for n in notices), notices
            operators = c.execute(
                "SELECT oprnamespace::regnamespace::text, count(*) FROM pg_operator"
                " WHERE oprcode::regproc::text LIKE 'df.%' GROUP BY 1"
            ).fetchall()
            assert operators == [("df", 7)]
            c.execute("SET search_path = public, df")
            check(
                c,
                [
                    (
                        "'SELECT 1' ~> 'SELECT 2'",
                        f'{{"node_type":"THEN","left_node":{S1},"right_node":{S2}}}',
                    ),
                    ("'a' & 'b'", f'{{"node_type":"JOIN","left_node":{A},"right_node":{B}}}'),
                    ("'a' | 'b'", f'{{"node_type":"RACE","left_node":{A},"right_node":{B}}}'),
                    ("@> 'b' |=> 'n'", f'{{"node_type":"LOOP","left_node":{B},"result_name":"n"}}'),
                    ("'c' ?> 't' !> 'e'", outcome(c, "df.if('c', 't', 'e')")),
                    ("6 & 3", 2),
                ],
            )
            c.execute("SET search_path = public")
            check(c, [("'a' OPERATOR(df.~>) 'b'", outcome(c, "df.seq('a', 'b')"))])
    finally:
        with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            admin.execute(f"DROP ROLE IF EXISTS {role}")


def test_building_a_long_chain_step_by_step(conn: Conn) -> None:
    """Each ~> re-reads its growing left operand once, not once per member: 300 steps stay
    fast, and every level is embedded verbatim."""
    began = time.monotonic()
    got = outcome(
        conn,
        """t FROM (
            WITH RECURSIVE chain (n, t) AS (
                SELECT 1, df.sql('SELECT 1')
                UNION ALL
                SELECT n + 1, t ~> ('SELECT ' || (n + 1)) FROM chain WHERE n < 300
            )
            SELECT t FROM chain WHERE n = 300
        ) c""",
    )
    elapsed = time.monotonic() - began
    expected = sql_node("SELECT 1")
    for n in range(2, 301):
        expected = {
            "node_type": "THEN",
            "left_node": expected,
            "right_node": sql_node(f"SELECT {n}"),
        }
    assert got == envelope(expected)
    assert elapsed < 5.0, f"building a 300-step chain took {elapsed:.2f}s"
