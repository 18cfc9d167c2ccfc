"""df.explain (migration 0013): the tree drawing of a graph (dry run) and of a live
instance, with pgdurable's RETRY and TIMEOUT wrappers (docs/monitoring.md).

Regression style: every expected output is written out in full. A `·` stands for a padding
space (every line is right-padded to the longest line plus 4 characters); `lines()` turns
the literal into the exact text. Live instances are run by a real worker, so the markers
come from the stamps the interpreter writes and df.instance_nodes' inference; pg_durable's
example is reproduced once on hand-written statuses, as it shows a moment no workflow stops
at (an IF whose condition has finished but whose arm has not started).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

from conftest import App, RoleFactory, ThreadWorker
from sqlcheck import Conn, check

CANNOT = (
    "Cannot explain input: not a valid Durofut JSON, instance ID, SQL statement, or DSL"
    " expression.\nHint: DSL expressions use df.*() functions and operators like ~>, |=>, &, |."
)
TYPES = (
    "SQL, THEN, IF, JOIN, LOOP, BREAK, RACE, SLEEP, WAIT_SCHEDULE, HTTP, HTTP_MULTIPART, SIGNAL,"
    " RETRY, TIMEOUT, CALL, MAP"
)
TOO_DEEP = (
    "Graph exceeds maximum nesting depth of 256. Simplify the workflow or break it into"
    " multiple instances."
)
TOO_BIG = (
    "Workflow exceeds maximum node count of 10000. Simplify the workflow or break it into"
    " multiple instances."
)


# -- helpers ------------------------------------------------------------------------------------


def lines(text: str) -> str:
    """An expected output as written in this file: without the literal's first and last line
    break, `·` for padding. Every line of a padded tree has the same length; the literal is
    checked for that, so a miscounted expectation fails here rather than as a diff."""
    out = text.strip("\n").replace("·", " ")
    rows = out.split("\n")
    assert len({len(row) for row in rows}) == 1, f"lines of unequal width: {text!r}"
    assert min(len(row) - len(row.rstrip(" ")) for row in rows) == 4, f"not +4: {text!r}"
    return out


def dotted(text: str) -> str:
    """text written the way this file writes expectations (padding as `·`)."""
    return "\n".join(
        row.rstrip(" ") + "·" * (len(row) - len(row.rstrip(" "))) for row in text.split("\n")
    )


def assert_tree(got: str, expected: str) -> None:
    """got equals the expectation `expected` (written for lines()); on a difference, shows got
    in the same notation."""
    try:
        want = lines(expected)
    except AssertionError as e:
        raise AssertionError(f"{e}\ngot:\n{dotted(got)}") from None
    assert got == want, f"got:\n{dotted(got)}\nexpected:\n{expected.strip()}"


def explain(conn: Conn, expr: str, *params: object) -> str:
    row = conn.execute(f"SELECT df.explain({expr})", params).fetchone()
    assert row is not None
    return str(row[0])


def quote(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def sql_node(query: str) -> dict[str, Any]:
    return {"node_type": "SQL", "query": query}


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def node_status(conn: Conn, instance: str, query: str) -> str:
    row = conn.execute(
        "SELECT status FROM df.nodes WHERE instance_id = %s AND query = %s", (instance, query)
    ).fetchone()
    assert row is not None
    return str(row[0])


# -- pg_durable's example ----------------------------------------------------------------------

# Named SQL, then a join3 of SQL/SLEEP/SIGNAL, then an IF.
EXAMPLE_GRAPH = (
    "'SELECT 1' |=> 'a'"
    " ~> df.join3('SELECT 2', df.sleep(5), df.wait_for_signal('go', 60))"
    " ~> df.if('SELECT $a > 0', 'SELECT ''yes''', 'SELECT ''no''')"
)

EXAMPLE_DRY = lines("""
SQL: SELECT 1 |=> 'a'·········
→ JOIN (3)····················
    ║ branch 1:···············
      ├─SQL: SELECT 2·········
    ║ branch 2:···············
      ├─SLEEP 5s··············
    ║ branch 3:···············
      └─SIGNAL 'go' (60s)·····
→ IF··························
    ? condition:··············
      └─SQL: SELECT $a > 0····
    ✓ then:···················
      └─SQL: SELECT 'yes'·····
    ✗ else:···················
      └─SQL: SELECT 'no'······
""")

# As pg_durable draws it, markers and padding included (the header comes before it).
EXAMPLE_LIVE_TREE = """
SQL: SELECT 1 |=> 'a' ✓·········
→ JOIN (3) ✓····················
    ║ branch 1:·················
      ├─SQL: SELECT 2 ✓·········
    ║ branch 2:·················
      ├─SLEEP 5s ✓··············
    ║ branch 3:·················
      └─SIGNAL 'go' (60s) ✓·····
→ IF ⏳··························
    ? condition:················
      └─SQL: SELECT $a > 0 ✓····
    ✓ then:·····················
      └─SQL: SELECT 'yes' ○·····
    ✗ else:·····················
      └─SQL: SELECT 'no' ○······
"""


def test_spec_example_dry_run(conn: Conn) -> None:
    # The graph built in SQL: df.explain receives its envelope.
    assert explain(conn, EXAMPLE_GRAPH) == EXAMPLE_DRY
    row = conn.execute(f"SELECT {EXAMPLE_GRAPH}").fetchone()
    assert row is not None
    assert explain(conn, "%s", f"\n  {row[0]}  \n") == EXAMPLE_DRY
    # The DSL expression as text, evaluated by df.explain.
    assert explain(conn, "%s", EXAMPLE_GRAPH) == EXAMPLE_DRY


def test_spec_example_live(su: Conn) -> None:
    """pg_durable's live markers, on statuses and stamps written as the engine writes them:
    everything up to the IF's condition done, the IF running, neither arm started."""
    row = su.execute(f"SELECT df.start({EXAMPLE_GRAPH})").fetchone()
    assert row is not None
    instance = str(row[0])
    scope = f"{instance}::1"
    rows = su.execute(
        "SELECT id, node_type, query FROM df.nodes WHERE instance_id = %s", (instance,)
    ).fetchall()
    sql = {query: node for node, kind, query in rows if kind == "SQL"}
    only = {kind: node for node, kind, _ in rows if kind != "SQL"}

    def stamp(node: str, status: str, execution: str) -> None:
        su.execute(
            "UPDATE df.nodes SET status = %s, status_details = jsonb_build_object("
            "'execution_id', %s::text) WHERE instance_id = %s AND id = %s",
            (status, execution, instance, node),
        )

    for node in (sql["SELECT 1"], sql["SELECT $a > 0"], only["JOIN"]):
        stamp(node, "completed", scope)
    # Each JOIN branch runs in a scope of its own (<parent scope>::<generation>::<branch root>).
    for node in (sql["SELECT 2"], only["SLEEP"], only["SIGNAL"]):
        stamp(node, "completed", f"{scope}::{node}::1")
    stamp(only["IF"], "running", scope)
    # The outer sequence is running, the inner one (SQL ~> JOIN) has finished.
    root = su.execute("SELECT root_node FROM df.instances WHERE id = %s", (instance,)).fetchone()
    assert root is not None
    stamp(root[0], "running", scope)
    inner = su.execute(
        "SELECT left_node FROM df.nodes WHERE instance_id = %s AND id = %s", (instance, root[0])
    ).fetchone()
    assert inner is not None
    stamp(inner[0], "completed", scope)
    su.execute("UPDATE df.instances SET status = 'running' WHERE id = %s", (instance,))

    header = f"""
Instance: {instance}··············
Status:   ⏳ Running·············
································"""
    assert explain(su, "%s", instance) == lines(header + EXAMPLE_LIVE_TREE)


# -- line formats -------------------------------------------------------------------------------


def test_each_leaf_line(conn: Conn) -> None:
    hand_break = {"node_type": "BREAK", "query": '{"break_value":{"k":1}}'}
    hand_signal = {"node_type": "SIGNAL", "query": "go"}
    check(
        conn,
        [
            ("df.explain('SELECT 1')", lines("SQL: SELECT 1····")),
            ("df.explain(df.sql('VACUUM'))", lines("SQL: VACUUM····")),
            ("df.explain(df.sleep(0))", lines("SLEEP 0s····")),
            ("df.explain(df.sleep(3600))", lines("SLEEP 3600s····")),
            ("df.explain(df.wait_for_schedule('*/5 * * * *'))", lines("WAIT '*/5 * * * *'····")),
            ("df.explain(df.wait_for_signal('approve'))", lines("SIGNAL 'approve'····")),
            (
                "df.explain(df.wait_for_signal('approve', 3600))",
                lines("SIGNAL 'approve' (3600s)····"),
            ),
            (
                "df.explain(df.http('https://api.example.com/v1', 'get'))",
                lines("HTTP GET https://api.example.com/v1····"),
            ),
            (
                "df.explain(df.http('https://api.example.com/v1'))",
                lines("HTTP POST https://api.example.com/v1····"),
            ),
            (
                "df.explain(df.http_multipart('https://x.example.com/up', 'PUT',"
                """ '[{"name": "f", "data_b64": ""}]'))""",
                lines("HTTP PUT https://x.example.com/up····"),
            ),
            ("df.explain(df.break())", lines("BREAK····")),
            ("df.explain(df.break('done'))", lines("BREAK 'done'····")),
            # A hand-written break value that is not a string is shown as JSON.
            (
                f"df.explain({quote(json.dumps(hand_break))})",
                lines("""BREAK '{"k":1}'····"""),
            ),
            # A config that is not JSON: the node type and the raw text.
            (
                f"df.explain({quote(json.dumps(hand_signal))})",
                lines("SIGNAL go····"),
            ),
        ],
    )


def test_each_compound_node_and_block_header(conn: Conn) -> None:
    check(
        conn,
        [
            (
                "df.explain(@> 'SELECT 1')",
                lines("""
LOOP (infinite)··········
    ↻ body:··············
      └─SQL: SELECT 1····
"""),
            ),
            (
                "df.explain(df.loop('SELECT 1', 'SELECT false'))",
                lines("""
LOOP (while)·················
    ↻ body:··················
      └─SQL: SELECT 1········
    ? while:·················
      └─SQL: SELECT false····
"""),
            ),
            (
                "df.explain(df.if('SELECT true', 'SELECT 1', 'SELECT 2'))",
                lines("""
IF··························
    ? condition:············
      └─SQL: SELECT true····
    ✓ then:·················
      └─SQL: SELECT 1·······
    ✗ else:·················
      └─SQL: SELECT 2·······
"""),
            ),
            # df.if_rows has no condition node, so no condition block.
            (
                "df.explain(df.if_rows('r', 'SELECT 1', 'SELECT 2'))",
                lines("""
IF·······················
    ✓ then:··············
      └─SQL: SELECT 1····
    ✗ else:··············
      └─SQL: SELECT 2····
"""),
            ),
            (
                "df.explain('SELECT 1' & 'SELECT 2')",
                lines("""
JOIN (2)·················
    ║ branch 1:··········
      ├─SQL: SELECT 1····
    ║ branch 2:··········
      └─SQL: SELECT 2····
"""),
            ),
            (
                "df.explain('SELECT 1' | df.sleep(30))",
                lines("""
RACE·····················
    ║ branch 1:··········
      ├─SQL: SELECT 1····
    ║ branch 2:··········
      └─SLEEP 30s········
"""),
            ),
            # pgdurable's wrappers: RETRY (its retry_on list when it has one) and TIMEOUT.
            (
                "df.explain(df.retry('SELECT 1', 3))",
                lines("""
RETRY (max 3 attempts)····
    ↻ attempt:············
      └─SQL: SELECT 1·····
"""),
            ),
            (
                "df.explain(df.retry('SELECT 1', 1, 0, 0, ARRAY['40001', 'http']))",
                lines("""
RETRY (max 1 attempt, on 40001, http)····
    ↻ attempt:···························
      └─SQL: SELECT 1····················
"""),
            ),
            (
                "df.explain(df.timeout(df.http('https://example.com', 'GET'), 30))",
                lines("""
TIMEOUT 30s·····························
    ⏱ within:···························
      └─HTTP GET https://example.com····
"""),
            ),
            (
                "df.explain(df.timeout('SELECT 1', 0.5))",
                lines("""
TIMEOUT 0.5s·············
    ⏱ within:············
      └─SQL: SELECT 1····
"""),
            ),
            (
                "df.explain(df.retry(df.timeout('SELECT 1', 10), 5))",
                lines("""
RETRY (max 5 attempts)·········
    ↻ attempt:·················
      └─TIMEOUT 10s············
          ⏱ within:············
            └─SQL: SELECT 1····
"""),
            ),
        ],
    )


def test_result_names(conn: Conn) -> None:
    check(
        conn,
        [
            ("df.explain('SELECT 1' |=> 'x')", lines("SQL: SELECT 1 |=> 'x'····")),
            ("df.explain(df.sleep(1) |=> 's')", lines("SLEEP 1s |=> 's'····")),
            (
                "df.explain(df.wait_for_schedule('0 * * * *') |=> 'w')",
                lines("WAIT '0 * * * *' |=> 'w'····"),
            ),
            (
                "df.explain(df.wait_for_signal('go', 5) |=> 'sig')",
                lines("SIGNAL 'go' (5s) |=> 'sig'····"),
            ),
            (
                "df.explain(df.http('https://example.com', 'GET') |=> 'resp')",
                lines("HTTP GET https://example.com |=> 'resp'····"),
            ),
            ("df.explain(df.break('v') |=> 'b')", lines("BREAK 'v' |=> 'b'····")),
            (
                "df.explain((@> 'SELECT 1') |=> 'l')",
                lines("""
LOOP (infinite) |=> 'l'····
    ↻ body:················
      └─SQL: SELECT 1······
"""),
            ),
            (
                "df.explain(df.if_rows('r', 'SELECT 1', 'SELECT 2') |=> 'i')",
                lines("""
IF |=> 'i'···············
    ✓ then:··············
      └─SQL: SELECT 1····
    ✗ else:··············
      └─SQL: SELECT 2····
"""),
            ),
            (
                "df.explain(df.join3('SELECT 1', 'SELECT 2', 'SELECT 3') |=> 'j')",
                lines("""
JOIN (3) |=> 'j'·········
    ║ branch 1:··········
      ├─SQL: SELECT 1····
    ║ branch 2:··········
      ├─SQL: SELECT 2····
    ║ branch 3:··········
      └─SQL: SELECT 3····
"""),
            ),
            (
                "df.explain(('SELECT 1' | 'SELECT 2') |=> 'r')",
                lines("""
RACE |=> 'r'·············
    ║ branch 1:··········
      ├─SQL: SELECT 1····
    ║ branch 2:··········
      └─SQL: SELECT 2····
"""),
            ),
            (
                "df.explain(df.timeout(df.retry('SELECT 1', 2) |=> 'a', 9) |=> 'b')",
                lines("""
TIMEOUT 9s |=> 'b'························
    ⏱ within:·····························
      └─RETRY (max 2 attempts) |=> 'a'····
          ↻ attempt:······················
            └─SQL: SELECT 1···············
"""),
            ),
            # A name on a THEN is not shown: the chain has no line of its own.
            (
                "df.explain(('SELECT 1' ~> 'SELECT 2') |=> 't')",
                lines("""
SQL: SELECT 1······
→ SQL: SELECT 2····
"""),
            ),
        ],
    )


def test_truncation(conn: Conn) -> None:
    check(
        conn,
        [
            # SQL: over 50 bytes, cut to 47 bytes and '...'; never inside a character.
            (
                "df.explain('SELECT ''' || repeat('x', 41) || '''')",
                lines("SQL: SELECT 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'····"),
            ),
            (
                "df.explain('SELECT ''' || repeat('x', 42) || '''')",
                lines("SQL: SELECT 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...····"),
            ),
            # 49 bytes in 29 characters: whole.
            (
                "df.explain('SELECT ''' || repeat('é', 20) || '''')",
                lines("SQL: SELECT 'éééééééééééééééééééé'····"),
            ),
            # 51 bytes: 19 two-byte characters after the 8 bytes of SELECT ' fill 46 bytes.
            (
                "df.explain('SELECT ''' || repeat('é', 21) || '''')",
                lines("SQL: SELECT 'ééééééééééééééééééé...····"),
            ),
            # Four-byte characters: 8 + 9 * 4 = 44 bytes.
            (
                "df.explain('SELECT ''' || repeat('😀', 11) || '''')",
                lines("SQL: SELECT '😀😀😀😀😀😀😀😀😀...····"),
            ),
            # A multi-line statement is drawn on one line.
            (
                "df.explain(E'SELECT 1,\\n       2\\n  FROM t')",
                lines("SQL: SELECT 1, 2 FROM t····"),
            ),
            # URL: over 40 characters (not bytes), cut to 37 and '...'.
            (
                "df.explain(df.http('https://example.com/' || repeat('a', 20)))",
                lines("HTTP POST https://example.com/aaaaaaaaaaaaaaaaaaaa····"),
            ),
            (
                "df.explain(df.http('https://example.com/' || repeat('a', 21)))",
                lines("HTTP POST https://example.com/aaaaaaaaaaaaaaaaa...····"),
            ),
            (
                "df.explain(df.http('https://example.com/' || repeat('é', 20)))",
                lines("HTTP POST https://example.com/éééééééééééééééééééé····"),
            ),
            (
                "df.explain(df.http('https://example.com/' || repeat('é', 21)))",
                lines("HTTP POST https://example.com/ééééééééééééééééé...····"),
            ),
            # BREAK value: over 20 bytes, cut to 17 bytes and '...'.
            (
                "df.explain(df.break('abcdefghijklmnopqrst'))",
                lines("BREAK 'abcdefghijklmnopqrst'····"),
            ),
            (
                "df.explain(df.break('abcdefghijklmnopqrstu'))",
                lines("BREAK 'abcdefghijklmnopq...'····"),
            ),
            ("df.explain(df.break(repeat('é', 10)))", lines("BREAK 'éééééééééé'····")),
            ("df.explain(df.break(repeat('é', 11)))", lines("BREAK 'éééééééé...'····")),
        ],
    )


def test_chains_and_nested_compounds(conn: Conn) -> None:
    check(
        conn,
        [
            # Chains are flat whichever way they nest.
            (
                "df.explain(df.seq('SELECT 1', df.seq('SELECT 2', 'SELECT 3')))",
                lines("""
SQL: SELECT 1······
→ SQL: SELECT 2····
→ SQL: SELECT 3····
"""),
            ),
            # A compound item of a chain: its blocks 4 deeper than the chain.
            (
                "df.explain('SELECT 1' ~> (@> ('SELECT 2' ~> df.break())) ~> 'SELECT 3')",
                lines("""
SQL: SELECT 1············
→ LOOP (infinite)········
    ↻ body:··············
      └─SQL: SELECT 2····
      → BREAK············
→ SQL: SELECT 3··········
"""),
            ),
            # A compound node alone in a branch that is not the last: '│' continues the branch.
            (
                "df.explain(df.join(df.join('SELECT 1', 'SELECT 2'), 'SELECT 3'))",
                lines("""
JOIN (2)·······················
    ║ branch 1:················
      ├─JOIN (2)···············
      │   ║ branch 1:··········
      │     ├─SQL: SELECT 1····
      │   ║ branch 2:··········
      │     └─SQL: SELECT 2····
    ║ branch 2:················
      └─SQL: SELECT 3··········
"""),
            ),
            # ... but a compound item of a chain in such a branch is only indented.
            (
                "df.explain(df.join('SELECT 1' ~> df.join('SELECT 2', 'SELECT 3'), 'SELECT 4'))",
                lines("""
JOIN (2)·······················
    ║ branch 1:················
      ├─SQL: SELECT 1··········
      → JOIN (2)···············
          ║ branch 1:··········
            ├─SQL: SELECT 2····
          ║ branch 2:··········
            └─SQL: SELECT 3····
    ║ branch 2:················
      └─SQL: SELECT 4··········
"""),
            ),
            (
                "df.explain(df.join(df.if('SELECT true',"
                " 'SELECT 1' ~> df.race('SELECT 2', df.sleep(1)), df.break()), 'SELECT 3')"
                " ~> 'SELECT 4')",
                lines("""
JOIN (2)·····························
    ║ branch 1:······················
      ├─IF···························
      │   ? condition:···············
      │     └─SQL: SELECT true·······
      │   ✓ then:····················
      │     └─SQL: SELECT 1··········
      │     → RACE···················
      │         ║ branch 1:··········
      │           ├─SQL: SELECT 2····
      │         ║ branch 2:··········
      │           └─SLEEP 1s·········
      │   ✗ else:····················
      │     └─BREAK··················
    ║ branch 2:······················
      └─SQL: SELECT 3················
→ SQL: SELECT 4······················
"""),
            ),
            # A root loop whose body is a schedule wait and a step (pg_durable's sample).
            (
                "df.explain(@> (df.wait_for_schedule('0 * * * *') ~> 'SELECT app.tick()'))",
                lines("""
LOOP (infinite)···················
    ↻ body:·······················
      └─WAIT '0 * * * *'··········
      → SQL: SELECT app.tick()····
"""),
            ),
        ],
    )


def test_padding(conn: Conn) -> None:
    """Every line is padded to the longest line plus 4, counted in characters (a two-byte
    'é' and a three-byte '✓' or '─' count one each); no trailing newline."""
    out = explain(conn, "'SELECT ''é''' ~> df.join('SELECT 1', 'SELECT 2')")
    assert out == lines("""
SQL: SELECT 'é'··········
→ JOIN (2)···············
    ║ branch 1:··········
      ├─SQL: SELECT 1····
    ║ branch 2:··········
      └─SQL: SELECT 2····
""")
    rows = out.split("\n")
    assert {len(r) for r in rows} == {max(len(r.rstrip(" ")) for r in rows) + 4}
    assert not out.endswith("\n")


# -- what the input is --------------------------------------------------------------------------


def test_input_classes(conn: Conn) -> None:
    envelope = json.dumps(
        {"node_type": "THEN", "left_node": sql_node("a"), "right_node": sql_node("b")}
    )
    check(
        conn,
        [
            ("df.explain(NULL)", None),
            # 8 hex digits: an instance id, in any case, white space trimmed.
            ("df.explain('deadbeef')", "Instance 'deadbeef' not found"),
            ("df.explain(' DEADBEEF' || E'\\n')", "Instance 'DEADBEEF' not found"),
            ("df.explain('deadbee')", CANNOT),
            ("df.explain('deadbeef0')", CANNOT),
            # An envelope.
            (f"df.explain({quote(envelope)})", lines("SQL: a······\n→ SQL: b····")),
            (f"df.explain({quote('  ' + envelope)})", lines("SQL: a······\n→ SQL: b····")),
            # JSON that is not an envelope, and text that is nothing explain knows.
            ("""df.explain('{"query": "SELECT 1"}')""", CANNOT),
            ("df.explain('[1, 2]')", CANNOT),
            ("df.explain('hello')", CANNOT),
            ("df.explain('')", CANNOT),
            ("df.explain('   ')", CANNOT),
            ("df.explain('VACUUM')", CANNOT),
            ("df.explain('SELECTION')", CANNOT),
            ("df.explain(E'DROP\\nTABLE t')", CANNOT),
            # A SQL statement: one SQL step. Keywords in any case, followed by a space (the
            # first five also by a line break).
            ("df.explain(' select 1 ')", lines("SQL: select 1····")),
            ("df.explain(E'SELECT\\n1')", lines("SQL: SELECT 1····")),
            (
                "df.explain(E'WITH\\nx AS (SELECT 1) SELECT 1')",
                lines("SQL: WITH x AS (SELECT 1) SELECT 1····"),
            ),
            ("df.explain('INSERT INTO t VALUES (1)')", lines("SQL: INSERT INTO t VALUES (1)····")),
            ("df.explain('Update t SET a = 1')", lines("SQL: Update t SET a = 1····")),
            ("df.explain('DELETE FROM t')", lines("SQL: DELETE FROM t····")),
            ("df.explain('CREATE TABLE t (a int)')", lines("SQL: CREATE TABLE t (a int)····")),
            ("df.explain('ALTER TABLE t ADD b int')", lines("SQL: ALTER TABLE t ADD b int····")),
            ("df.explain('DROP TABLE t')", lines("SQL: DROP TABLE t····")),
            ("df.explain('CALL p()')", lines("SQL: CALL p()····")),
            ("df.explain('DO $$BEGIN END$$')", lines("SQL: DO $$BEGIN END$$····")),
            ("df.explain('TRUNCATE t')", lines("SQL: TRUNCATE t····")),
            ("df.explain('GRANT SELECT ON t TO r')", lines("SQL: GRANT SELECT ON t TO r····")),
            (
                "df.explain('REVOKE SELECT ON t FROM r')",
                lines("SQL: REVOKE SELECT ON t FROM r····"),
            ),
            ("df.explain('EXPLAIN SELECT 1')", lines("SQL: EXPLAIN SELECT 1····")),
            # ... also when it mentions the df schema (pgdurable checks statements before
            # expressions; see the migration).
            (
                "df.explain('SELECT count(*) FROM df.instances')",
                lines("SQL: SELECT count(*) FROM df.instances····"),
            ),
            # A DSL expression, recognised by ~>, |=>, ?>, !>, @> or df.
            (
                "df.explain($$'SELECT 1' ~> 'SELECT 2'$$)",
                lines("SQL: SELECT 1······\n→ SQL: SELECT 2····"),
            ),
            ("df.explain($$'SELECT 1' |=> 'x'$$)", lines("SQL: SELECT 1 |=> 'x'····")),
            (
                "df.explain($$'SELECT true' ?> 'SELECT 1' !> 'SELECT 2'$$)",
                lines("""
IF··························
    ? condition:············
      └─SQL: SELECT true····
    ✓ then:·················
      └─SQL: SELECT 1·······
    ✗ else:·················
      └─SQL: SELECT 2·······
"""),
            ),
            (
                "df.explain($$@> 'SELECT 1'$$)",
                lines("""
LOOP (infinite)··········
    ↻ body:··············
      └─SQL: SELECT 1····
"""),
            ),
            ("df.explain('df.sleep(5)')", lines("SLEEP 5s····")),
            ("df.explain(' df.sql(''SELECT 1'') ')", lines("SQL: SELECT 1····")),
        ],
    )


def test_expressions_are_evaluated_as_the_caller_and_change_nothing(app: App) -> None:
    conn = app.conn
    conn.execute("SELECT df.setvar('step', 'SELECT 42')")
    conn.execute("CREATE FUNCTION app.step() RETURNS text LANGUAGE sql AS $$ SELECT 'SELECT 7' $$")
    check(
        conn,
        [
            # A value that is not an envelope is one SQL step, as df.start would take it.
            ("df.explain($$df.getvar('step')$$)", lines("SQL: SELECT 42····")),
            # The caller's own functions, through the caller's search_path.
            (
                "df.explain($$step() ~> df.sleep(1)$$)",
                lines("SQL: SELECT 7····\n→ SLEEP 1s·······"),
            ),
            ("df.explain($$df.getvar('nothing')$$)", "Expression returned NULL"),
            ("df.explain($$'SELECT 1' ~> NULL$$)", "Expression returned NULL"),
            # Errors are returned as text.
            (
                "df.explain('df.sleep(-1)')",
                "Failed to evaluate expression: Sleep duration must be non-negative",
            ),
            (
                "df.explain($$'SELECT 1' ~>$$)",
                "Failed to evaluate expression: syntax error at end of input",
            ),
            (
                "df.explain($$df.nothing('x')$$)",
                "Failed to evaluate expression: function df.nothing(unknown) does not exist",
            ),
            # Explaining writes nothing: an expression that would start an instance fails.
            (
                "df.explain($$df.start('SELECT 1')$$)",
                "Failed to evaluate expression: cannot execute INSERT in a read-only transaction",
            ),
            ("(SELECT count(*) FROM df.instances)", 0),
        ],
    )
    # Inside the caller's transaction, which goes on read-write and keeps its own work.
    with conn.transaction():
        conn.execute("CREATE TABLE app.t (a int)")
        assert explain(conn, "$$df.start('SELECT 1') ~> 'x'$$").startswith("Failed to evaluate")
        assert explain(conn, "$$'SELECT 1' ~> 'x'$$") == lines(
            "SQL: SELECT 1····\n→ SQL: x·········"
        )
        conn.execute("INSERT INTO app.t VALUES (1)")
        row = conn.execute("SELECT current_setting('transaction_read_only')").fetchone()
        assert row == ("off",)
    assert conn.execute("SELECT count(*) FROM app.t").fetchone() == (1,)


def test_graph_errors_are_returned_as_text(conn: Conn) -> None:
    def env(graph: dict[str, Any]) -> str:
        return f"df.explain({quote(json.dumps(graph))})"

    bad = "Invalid durable function graph: "
    check(
        conn,
        [
            (
                env({"node_type": "NOPE"}),
                bad + f"root: Unknown node_type 'NOPE'. Valid types: {TYPES}",
            ),
            (
                env(
                    {
                        "node_type": "THEN",
                        "left_node": sql_node("a"),
                        "right_node": {"node_type": "X"},
                    }
                ),
                bad + f"root.right: Unknown node_type 'X'. Valid types: {TYPES}",
            ),
            (
                env({"node_type": "THEN", "left_node": sql_node("a")}),
                bad + "root: THEN nodes require left_node and right_node",
            ),
            (
                env(
                    {
                        "node_type": "LOOP",
                        "left_node": {
                            "node_type": "JOIN",
                            "left_node": sql_node("a"),
                            "right_node": sql_node("b"),
                            "condition_node": sql_node("c"),
                        },
                    }
                ),
                bad + "root.left: condition_node is not valid for JOIN nodes",
            ),
            (
                env({"node_type": "SQL", "query": "a", "result_name": "1x"}),
                bad + "root: result_name '1x' is not a valid identifier — must match"
                " [a-zA-Z_][a-zA-Z0-9_]*",
            ),
            (
                env(
                    {
                        "node_type": "RETRY",
                        "left_node": sql_node("a"),
                        "query": '{"max_attempts":0}',
                    }
                ),
                bad + "root: query in RETRY: max_attempts must be an integer of at least 1",
            ),
            (
                env({"node_type": "IF", "left_node": sql_node("a"), "right_node": sql_node("b")}),
                bad + "root: IF nodes require a condition_node (df.if) or a condition query"
                " (df.if_rows)",
            ),
        ],
    )


# -- live instances -----------------------------------------------------------------------------


def test_live_completed_instance_with_an_untaken_arm(app: App, worker: ThreadWorker) -> None:
    instance = app.start(
        "'SELECT 1 AS one' |=> 'a'"
        " ~> df.if('SELECT $a > 0', 'SELECT ''yes'' AS answer', 'SELECT ''no'' AS answer')",
        label="nightly",
    )
    assert app.wait(instance) == "completed"
    assert_tree(
        explain(app.conn, "%s", instance),
        f"""
Instance: {instance} (nightly)···························
Status:   ✓ Completed··································
Output:   {{"rows":[{{"answer":"yes"}}],"row_count":1}}····
·······················································
SQL: SELECT 1 AS one |=> 'a' ✓·························
→ IF ✓·················································
    ? condition:·······································
      └─SQL: SELECT $a > 0 ✓···························
    ✓ then:············································
      └─SQL: SELECT 'yes' AS answer ✓··················
    ✗ else:············································
      └─SQL: SELECT 'no' AS answer ⊘···················
""",
    )


def test_live_failed_instance(app: App, worker: ThreadWorker) -> None:
    instance = app.start("'SELECT 1' ~> 'SELECT 1/0' ~> 'SELECT 3'")
    assert app.wait(instance) == "failed"
    # The output (the error) is cut to 57 bytes; the step after the failure is skipped.
    assert_tree(
        explain(app.conn, "%s", instance),
        f"""
Instance: {instance}························································
Status:   ✗ Failed························································
Output:   SQL execution failed: error returned from database: divis...····
··········································································
SQL: SELECT 1 ✓···························································
→ SQL: SELECT 1/0 ✗·······················································
→ SQL: SELECT 3 ⊘·························································
""",
    )


def test_live_running_and_pending(app: App, worker: ThreadWorker) -> None:
    instance = app.start("'SELECT 1' ~> df.wait_for_signal('go') ~> 'SELECT 2'")
    wait_until(
        lambda: (
            node_status(app.conn, instance, '{"signal_name":"go","timeout_seconds":null}')
            == "running"
        ),
        "the signal wait",
    )
    assert_tree(
        explain(app.conn, "%s", instance),
        f"""
Instance: {instance}·····
Status:   ⏳ Running····
·······················
SQL: SELECT 1 ✓········
→ SIGNAL 'go' ⏳········
→ SQL: SELECT 2 ○······
""",
    )
    app.conn.execute("SELECT df.signal(%s, 'go')", (instance,))
    assert app.wait(instance) == "completed"
    assert_tree(
        explain(app.conn, "%s", instance),
        f"""
Instance: {instance}···································
Status:   ✓ Completed································
Output:   {{"rows":[{{"?column?":2}}],"row_count":1}}····
·····················································
SQL: SELECT 1 ✓······································
→ SIGNAL 'go' ✓······································
→ SQL: SELECT 2 ✓····································
""",
    )


def test_live_race_loser_and_wrappers(app: App, worker: ThreadWorker) -> None:
    instance = app.start(
        "df.race('SELECT 1', df.sleep(60) ~> 'SELECT 2')"
        " ~> df.retry('SELECT 3', 2) ~> df.timeout('SELECT 4', 10)"
    )
    assert app.wait(instance) == "completed"
    # The RACE loser's nodes were abandoned (the sleep still "running"): skipped.
    assert_tree(
        explain(app.conn, "%s", instance),
        f"""
Instance: {instance}···································
Status:   ✓ Completed································
Output:   {{"rows":[{{"?column?":4}}],"row_count":1}}····
·····················································
RACE ✓···············································
    ║ branch 1:······································
      ├─SQL: SELECT 1 ✓······························
    ║ branch 2:······································
      └─SLEEP 60s ⊘··································
      → SQL: SELECT 2 ⊘······························
→ RETRY (max 2 attempts) ✓···························
    ↻ attempt:·······································
      └─SQL: SELECT 3 ✓······························
→ TIMEOUT 10s ✓······································
    ⏱ within:········································
      └─SQL: SELECT 4 ✓······························
""",
    )


def test_live_output_is_cut_to_60_bytes(app: App, worker: ThreadWorker) -> None:
    # {"rows":[{"s":"<text>"}],"row_count":1} is 33 bytes plus the text.
    shown = {}
    for text in ("x" * 27, "x" * 28, "é" * 30):
        instance, status = app.run(quote(f"SELECT {quote(text)} AS s"))
        assert status == "completed"
        out = explain(app.conn, "%s", instance).split("\n")
        shown[text] = out[2].rstrip(" ")
    assert shown == {
        # 60 bytes: whole.
        "x" * 27: 'Output:   {"rows":[{"s":"' + "x" * 27 + '"}],"row_count":1}',
        # 61 bytes: 57 and '...'.
        "x" * 28: 'Output:   {"rows":[{"s":"' + "x" * 28 + '"}],"row_count...',
        # 15 bytes, then two-byte characters: 21 of them fill 57 bytes exactly.
        "é" * 30: 'Output:   {"rows":[{"s":"' + "é" * 21 + "...",
    }
    instance, status = app.run("'SELECT repeat(''é'', 30) AS ab'")
    # 16 bytes, then 20 characters (56 bytes): the 21st would split at byte 57.
    out = explain(app.conn, "%s", instance).split("\n")
    assert out[2].rstrip(" ") == 'Output:   {"rows":[{"ab":"' + "é" * 20 + "..."


def test_another_roles_instance_is_not_found(app: App, su: Conn, make_role: RoleFactory) -> None:
    instance = app.start("'SELECT 1' ~> 'SELECT 2'", label="mine")
    other = make_role()
    assert explain(other.conn, "%s", instance) == f"Instance '{instance}' not found"
    # Its owner and a superuser see it (pending: no worker runs here).
    expected = f"""
Instance: {instance} (mine)····
Status:   ○ Pending··········
·····························
SQL: SELECT 1 ○··············
→ SQL: SELECT 2 ○············
"""
    assert_tree(explain(app.conn, "%s", instance), expected)
    assert_tree(explain(su, "%s", instance), expected)


def test_cancelled_instance(app: App) -> None:
    # Nodes keep the status they had; the header says cancelled.
    instance = app.start("'SELECT 1' ~> df.sleep(60)")
    app.conn.execute("SELECT df.cancel(%s)", (instance,))
    assert_tree(
        explain(app.conn, "%s", instance),
        f"""
Instance: {instance}·······
Status:   ✗ Cancelled····
·························
SQL: SELECT 1 ○··········
→ SLEEP 60s ○············
""",
    )


def test_instance_without_nodes(su: Conn) -> None:
    row = su.execute("SELECT df.start('SELECT 1')").fetchone()
    assert row is not None
    instance = str(row[0])
    # Only possible by going around the foreign keys.
    su.execute("SET session_replication_role = replica")
    su.execute("DELETE FROM df.nodes WHERE instance_id = %s", (instance,))
    su.execute("RESET session_replication_role")
    assert explain(su, "%s", instance) == f"No nodes found for instance '{instance}'"


def test_hand_written_graphs_that_loop_back(app: App) -> None:
    """Users may write df.nodes rows themselves; a graph that contains itself stops at the
    limits of df.start instead of drawing forever."""
    conn = app.conn
    bad = "Invalid durable function graph: root: "

    def write(instance: str, rows: list[tuple[str, str, str | None, str | None]]) -> None:
        with conn.transaction():
            conn.execute(
                "INSERT INTO df.instances (id, root_node, submitted_by)"
                " VALUES (%s, %s, quote_ident(current_user)::regrole)",
                (instance, rows[0][0]),
            )
            for node, kind, left, right in rows:
                conn.execute(
                    "INSERT INTO df.nodes (id, instance_id, node_type, query, left_node,"
                    " right_node, submitted_by) VALUES (%s, %s, %s, %s, %s, %s,"
                    " quote_ident(current_user)::regrole)",
                    (node, instance, kind, "SELECT 1" if kind == "SQL" else None, left, right),
                )

    # A loop whose body is itself: one node per level.
    write("0000000a", [("000000a1", "LOOP", "000000a1", None)])
    # A sequence whose right side leads back to it.
    write(
        "0000000b",
        [
            ("000000b1", "THEN", "000000b2", "000000b3"),
            ("000000b2", "SQL", None, None),
            ("000000b3", "THEN", "000000b2", "000000b1"),
        ],
    )
    # A JOIN whose branches are itself: twice as many nodes per level.
    write("0000000c", [("000000c1", "JOIN", "000000c1", "000000c1")])
    started = time.monotonic()
    check(
        conn,
        [
            ("df.explain('0000000a')", bad + TOO_DEEP),
            ("df.explain('0000000b')", bad + TOO_DEEP),
            ("df.explain('0000000c')", bad + TOO_BIG),
        ],
    )
    assert time.monotonic() - started < 10


# -- deep and wide graphs -----------------------------------------------------------------------


def padded(rows: list[str]) -> str:
    width = max(len(r) for r in rows) + 4
    return "\n".join(r.ljust(width) for r in rows)


def nested_loops(depth: int) -> dict[str, Any]:
    graph = sql_node("SELECT 1")
    for _ in range(depth):
        graph = {"node_type": "LOOP", "left_node": graph}
    return graph


def balanced(node_type: str, lo: int, hi: int) -> dict[str, Any]:
    """A binary tree of node_type over the steps SELECT lo .. SELECT hi-1."""
    if hi - lo == 1:
        return sql_node(f"SELECT {lo}")
    mid = (lo + hi) // 2
    return {
        "node_type": node_type,
        "left_node": balanced(node_type, lo, mid),
        "right_node": balanced(node_type, mid, hi),
    }


def timed(conn: Conn, expr: str, *params: object) -> tuple[str, float]:
    started = time.perf_counter()
    out = explain(conn, expr, *params)
    return out, time.perf_counter() - started


def test_deep_graphs(app: App) -> None:
    conn = app.conn
    # 256 nested loops, the deepest graph df.start accepts: each level 6 characters deeper.
    rows = ["LOOP (infinite)"]
    for level in range(1, 257):
        rows.append(" " * (6 * level - 2) + "↻ body:")
        rows.append(" " * (6 * level) + ("└─LOOP (infinite)" if level < 256 else "└─SQL: SELECT 1"))
    deep = json.dumps(nested_loops(256))
    out, seconds = timed(conn, "%s", deep)
    assert out == padded(rows)
    print(f"\n256 nested loops (257 nodes): dry run {seconds:.3f} s", file=sys.stderr)
    assert seconds < 10

    # Live, not started (no worker): every node pending.
    instance = app.start("%s", (deep,))
    out, seconds = timed(conn, "%s", instance)
    live = [r.rstrip(" ") for r in out.split("\n")]
    assert live[:3] == [f"Instance: {instance}", "Status:   ○ Pending", ""]
    assert live[3:] == [r + " ○" if "LOOP" in r or "SQL" in r else r for r in rows]
    print(f"256 nested loops (257 nodes): live {seconds:.3f} s", file=sys.stderr)
    assert seconds < 10

    # A chain of 257 steps written with operators (256 levels of THEN): one flat list.
    chain = " ~> ".join(f"'SELECT {i}'" for i in range(257))
    out, seconds = timed(conn, "%s", chain)
    assert out == padded(["SQL: SELECT 0"] + [f"→ SQL: SELECT {i}" for i in range(1, 257)])

    # One level more is refused, as df.start refuses it.
    path = "root" + ".left" * 257
    assert explain(conn, "%s", json.dumps(nested_loops(257))) == (
        f"Invalid durable function graph: {path}: {TOO_DEEP}"
    )


def test_wide_graphs(app: App) -> None:
    conn = app.conn
    # 5,000 steps under 4,999 JOINs: 9,999 nodes, 19,997 lines.
    wide = json.dumps(balanced("JOIN", 0, 5000))
    out, seconds = timed(conn, "%s", wide)
    print(f"\nJOIN tree of 9,999 nodes: dry run {seconds:.3f} s", file=sys.stderr)
    assert seconds < 20
    rows = out.split("\n")
    assert len(rows) == 19997
    assert len({len(r) for r in rows}) == 1
    assert [r.rstrip(" ") for r in rows[:6]] == [
        "JOIN (2)",
        "    ║ branch 1:",
        "      ├─JOIN (2)",
        "      │   ║ branch 1:",
        "      │     ├─JOIN (2)",
        "      │     │   ║ branch 1:",
    ]
    steps = [r.rstrip(" ").split("SQL: ")[1] for r in rows if "SQL: " in r]
    assert steps == [f"SELECT {i}" for i in range(5000)]

    instance = app.start("%s", (wide,))
    out, seconds = timed(conn, "%s", instance)
    print(f"JOIN tree of 9,999 nodes: live {seconds:.3f} s", file=sys.stderr)
    assert seconds < 20
    live = out.split("\n")
    assert len(live) == 3 + 19997
    assert [r.rstrip(" ") for r in live[3:]] == [
        r.rstrip(" ") + ("" if "branch" in r else " ○") for r in rows
    ]

    # 5,000 steps in a balanced tree of sequences: one flat list of 5,000 lines.
    out, seconds = timed(conn, "%s", json.dumps(balanced("THEN", 0, 5000)))
    print(f"THEN tree of 9,999 nodes: dry run {seconds:.3f} s", file=sys.stderr)
    assert seconds < 20
    assert out == padded(["SQL: SELECT 0"] + [f"→ SQL: SELECT {i}" for i in range(1, 5000)])

    # One node too many is refused, as df.start refuses it.
    too_big = {
        "node_type": "JOIN",
        "left_node": balanced("JOIN", 0, 5000),
        "right_node": sql_node("x"),
    }
    assert explain(conn, "%s", json.dumps(too_big)) == (
        f"Invalid durable function graph: root: {TOO_BIG}"
    )


def test_a_long_label_is_cut_in_the_header(app: App, worker: ThreadWorker) -> None:
    """Every line is padded to the longest: an uncut label would widen them all."""
    label = "é" * 40 + "x" * 5000
    instance = app.start("'SELECT 1'", label=label)
    assert app.wait(instance) == "completed"
    row = app.conn.execute("SELECT df.explain(%s)", (instance,)).fetchone()
    assert row is not None
    lines = str(row[0]).split("\n")
    assert lines[0].rstrip() == f"Instance: {instance} ({'é' * 28}...)"
    assert max(len(line) for line in lines) < 100
