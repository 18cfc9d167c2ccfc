"""Monitoring from SQL (migration 0012; docs/monitoring.md):
df.instance_nodes and its inferred statuses, df.list_instances' pagination, df.instance_info,
df.instance_executions, df.workers and df.worker_tasks, and their row-level scoping.

Inferred statuses are checked on instances a real worker ran, so the stamps are the ones the
interpreter writes, and once on hand-written stamps for the rules no workflow reaches on
purpose (malformed graphs, unreadable stamps).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from conftest import App, RoleFactory, ThreadWorker
from psycopg.types.json import Jsonb
from sqlcheck import Conn, Error, check, outcome

# -- helpers ------------------------------------------------------------------------------------

NodeView = tuple[str, str, str | None]  # (physical status, inferred status, from ancestor)


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def start(conn: Conn, expr: str, *params: object) -> str:
    row = conn.execute(f"SELECT df.start({expr})", params).fetchone()
    assert row is not None
    return str(row[0])


def root_of(conn: Conn, instance: str) -> str:
    row = conn.execute("SELECT root_node FROM df.instances WHERE id = %s", (instance,)).fetchone()
    assert row is not None
    return str(row[0])


def views(conn: Conn, instance: str) -> dict[str, NodeView]:
    """node id -> (status, inferred_status, inferred_status_from_ancestor_id)."""
    rows = conn.execute(
        "SELECT node_id, status, inferred_status, inferred_status_from_ancestor_id"
        " FROM df.instance_nodes(%s)",
        (instance,),
    ).fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def node_id(conn: Conn, instance: str, *, query: str | None = None, kind: str | None = None) -> str:
    """The one node of the instance with this query text (or of this type)."""
    rows = conn.execute(
        "SELECT id FROM df.nodes WHERE instance_id = %s"
        " AND (%s::text IS NULL OR query = %s) AND (%s::text IS NULL OR node_type = %s)",
        (instance, query, query, kind, kind),
    ).fetchall()
    assert len(rows) == 1, (query, kind, rows)
    return str(rows[0][0])


def child(conn: Conn, instance: str, parent: str, side: str = "left") -> str:
    row = conn.execute(
        f"SELECT {side}_node FROM df.nodes WHERE instance_id = %s AND id = %s", (instance, parent)
    ).fetchone()
    assert row is not None and row[0] is not None
    return str(row[0])


def stamp_of(conn: Conn, instance: str, node: str) -> str | None:
    row = conn.execute(
        "SELECT status_details ->> 'execution_id' FROM df.nodes WHERE instance_id = %s AND id = %s",
        (instance, node),
    ).fetchone()
    assert row is not None
    return None if row[0] is None else str(row[0])


def status_of(conn: Conn, instance: str) -> str:
    row = conn.execute("SELECT df.status(%s)", (instance,)).fetchone()
    assert row is not None
    return str(row[0])


def signal(app: App, instance: str, name: str) -> None:
    app.conn.execute("SELECT df.signal(%s, %s)", (instance, name))


# -- df.instance_nodes: columns and the compat overload ----------------------------------------


def test_instance_nodes_columns_and_compat_overload(su: Conn) -> None:
    instance = start(su, "'SELECT 1' |=> 'one' ~> 'SELECT 2'")
    cur = su.execute("SELECT * FROM df.instance_nodes(%s)", (instance,))
    assert [c.name for c in cur.description or []] == [
        "node_id",
        "node_type",
        "query",
        "result_name",
        "left_node",
        "right_node",
        "status",
        "result",
        "status_details",
        "inferred_status",
        "inferred_status_from_ancestor_id",
        "updated_at",
    ]
    rows = {r[0]: r for r in cur.fetchall()}
    root = node_id(su, instance, kind="THEN")
    first = node_id(su, instance, query="SELECT 1")
    assert rows[first][1:9] == ("SQL", "SELECT 1", "one", None, None, "pending", None, None)
    assert rows[root][4:6] == (first, node_id(su, instance, query="SELECT 2"))
    # Nothing ran: everything pending, nothing inferred.
    assert {(r[9], r[10]) for r in rows.values()} == {("pending", None)}

    cur = su.execute("SELECT * FROM df.instance_nodes(%s, 99)", (instance,))
    assert [c.name for c in cur.description or []] == [
        "execution_id",
        "node_id",
        "node_type",
        "query",
        "result_name",
        "left_node",
        "right_node",
        "status",
        "result",
        "updated_at",
    ]
    su.execute(
        "UPDATE df.nodes SET status = 'completed', result = '{\"a\": 1}' WHERE instance_id = %s"
        " AND id = %s",
        (instance, first),
    )
    compat = {r[1]: r for r in su.execute("SELECT * FROM df.instance_nodes(%s, 1)", (instance,))}
    assert set(compat) == set(rows)
    assert compat[first][0] == 1
    assert compat[first][7:9] == ("completed", '{"a": 1}')
    check(
        su,
        [
            ("(SELECT count(*) FROM df.instance_nodes('00000000'))", 0),
            ("(SELECT count(*) FROM df.instance_nodes(NULL))", 0),
            ("(SELECT count(*) FROM df.instance_nodes('00000000', 5))", 0),
        ],
    )


# -- inferred status on instances a worker ran -------------------------------------------------


def test_untaken_if_arm_is_skipped(app: App, worker: ThreadWorker) -> None:
    instance, status = app.run(
        "df.if('SELECT false', 'SELECT ''then''' ~> 'SELECT ''then 2''', 'SELECT ''else''')"
    )
    assert status == "completed"
    c = app.conn
    branch = node_id(c, instance, kind="IF")
    nodes = views(c, instance)
    assert nodes[branch] == ("completed", "completed", None)
    assert nodes[node_id(c, instance, query="SELECT false")] == ("completed", "completed", None)
    assert nodes[node_id(c, instance, query="SELECT 'else'")] == ("completed", "completed", None)
    # The untaken arm, and everything inside it, was decided by the IF.
    for untaken in (
        node_id(c, instance, kind="THEN"),
        node_id(c, instance, query="SELECT 'then'"),
        node_id(c, instance, query="SELECT 'then 2'"),
    ):
        assert nodes[untaken] == ("pending", "skipped", branch)


def test_right_side_of_a_failed_then_is_skipped(app: App, worker: ThreadWorker) -> None:
    instance, status = app.run("'SELECT 1' ~> 'SELECT 1/0' ~> ('SELECT 3' ~> 'SELECT 4')")
    assert status == "failed"
    c = app.conn
    root = root_of(c, instance)
    right = child(c, instance, root, "right")
    nodes = views(c, instance)
    assert nodes[root] == ("failed", "failed", None)
    assert nodes[child(c, instance, root)] == ("failed", "failed", None)
    assert nodes[node_id(c, instance, query="SELECT 1/0")] == ("failed", "failed", None)
    assert nodes[node_id(c, instance, query="SELECT 1")] == ("completed", "completed", None)
    # The nearest terminal ancestor of all three is the failed root.
    for never in (
        right,
        node_id(c, instance, query="SELECT 3"),
        node_id(c, instance, query="SELECT 4"),
    ):
        assert nodes[never] == ("pending", "skipped", root)


def test_race_loser_is_skipped(app: App, worker: ThreadWorker) -> None:
    instance, status = app.run(
        "df.race('SELECT 1 AS started' ~> df.sleep(30) ~> 'SELECT 2', df.sleep(1)) ~> 'SELECT 3'"
    )
    assert status == "completed"
    c = app.conn
    race = node_id(c, instance, kind="RACE")
    loser = child(c, instance, race)
    nodes = views(c, instance)
    assert nodes[race] == ("completed", "completed", None)
    assert nodes[node_id(c, instance, query="1")] == ("completed", "completed", None)
    assert nodes[node_id(c, instance, query="SELECT 3")] == ("completed", "completed", None)
    # What the loser finished keeps its status; what it was doing, or never began, is skipped.
    assert nodes[node_id(c, instance, query="SELECT 1 AS started")] == (
        "completed",
        "completed",
        None,
    )
    assert nodes[loser] == ("running", "skipped", race)
    assert nodes[node_id(c, instance, query="30")] == ("running", "skipped", race)
    assert nodes[node_id(c, instance, query="SELECT 2")] == ("pending", "skipped", race)


def test_superseded_loop_generation_reads_pending(app: App, worker: ThreadWorker) -> None:
    c = app.conn
    instance = app.start(
        "@> ('SELECT 1 AS first' ~> df.wait_for_signal('go') ~> 'SELECT 2 AS last')"
    )
    loop = node_id(c, instance, kind="LOOP")
    body = child(c, instance, loop)
    wait = node_id(c, instance, kind="SIGNAL")
    last = node_id(c, instance, query="SELECT 2 AS last")
    first = node_id(c, instance, query="SELECT 1 AS first")
    wait_until(lambda: views(c, instance)[wait][0] == "running", "the first wait")
    nodes = views(c, instance)
    assert nodes[wait] == ("running", "running", None)
    assert nodes[last] == ("pending", "pending", None)  # not reached yet: no inference needed
    assert nodes[first] == ("completed", "completed", None)

    signal(app, instance, "go")
    wait_until(
        lambda: (
            stamp_of(c, instance, wait) == f"{instance}::2"
            and views(c, instance)[wait][0] == "running"
        ),
        "the second iteration's wait",
    )
    nodes = views(c, instance)
    assert stamp_of(c, instance, last) == f"{instance}::1"
    assert stamp_of(c, instance, body) == f"{instance}::2"
    # Completed in iteration 1, not reached in iteration 2: pending, from the nearest ancestor
    # of the current generation (the body; the loop is of generation 2 as well).
    assert nodes[last] == ("completed", "pending", body)
    assert nodes[first] == ("completed", "completed", None)
    assert nodes[wait] == ("running", "running", None)
    assert nodes[loop] == ("running", "running", None)

    # Cancelled: nothing is stamped any more, so the nodes read as they were.
    c.execute("SELECT df.cancel(%s)", (instance,))
    assert views(c, instance) == nodes


def test_superseded_join_branch_of_an_earlier_iteration(app: App, worker: ThreadWorker) -> None:
    """A branch scope spawned in an earlier root generation is superseded as a whole, even
    though its own generation (1) is the highest stamped in it."""
    c = app.conn
    instance = app.start(
        "@> df.join(df.wait_for_signal('go') ~> 'SELECT 2 AS after', 'SELECT 3 AS other')"
    )
    join = node_id(c, instance, kind="JOIN")
    wait = node_id(c, instance, kind="SIGNAL")
    after = node_id(c, instance, query="SELECT 2 AS after")
    other = node_id(c, instance, query="SELECT 3 AS other")
    wait_until(lambda: views(c, instance)[wait][0] == "running", "the first wait")
    signal(app, instance, "go")
    wait_until(
        lambda: (
            (stamp_of(c, instance, wait) or "").startswith(f"{instance}::2::")
            and views(c, instance)[wait][0] == "running"
            and views(c, instance)[other][0] == "completed"
        ),
        "the second iteration's wait",
    )
    branch = child(c, instance, join)
    assert stamp_of(c, instance, after) == f"{instance}::1::{branch}::1"
    nodes = views(c, instance)
    assert nodes[after] == ("completed", "pending", join)
    assert nodes[other] == ("completed", "completed", None)
    assert nodes[wait] == ("running", "running", None)
    c.execute("SELECT df.cancel(%s)", (instance,))


def _waiting(c: Conn, instance: str, node: str, prefix: str) -> bool:
    return (stamp_of(c, instance, node) or "").startswith(prefix) and views(c, instance)[node][
        0
    ] == "running"


def test_nested_loops_superseded_generations(app: App, worker: ThreadWorker) -> None:
    c = app.conn
    c.execute("CREATE TABLE app.c (n int)")
    c.execute("INSERT INTO app.c VALUES (0)")
    instance = app.start(
        "@> (df.loop(df.wait_for_signal('i') ~> 'UPDATE app.c SET n = n + 1 RETURNING n',"
        " 'SELECT n %% 2 <> 0 AS again FROM app.c') ~> df.wait_for_signal('o'))"
    )
    waits = {
        str(r[0]): str(r[1])
        for r in c.execute(
            "SELECT id, query::jsonb ->> 'signal_name' FROM df.nodes"
            " WHERE instance_id = %s AND node_type = 'SIGNAL'",
            (instance,),
        ).fetchall()
    }
    inner_wait = next(k for k, v in waits.items() if v == "i")
    outer_wait = next(k for k, v in waits.items() if v == "o")
    update = node_id(c, instance, query="UPDATE app.c SET n = n + 1 RETURNING n")
    cond = node_id(c, instance, query="SELECT n % 2 <> 0 AS again FROM app.c")
    loops = [
        str(r[0])
        for r in c.execute(
            "SELECT id FROM df.nodes WHERE instance_id = %s AND node_type = 'LOOP'", (instance,)
        ).fetchall()
    ]
    wait_until(lambda: views(c, instance)[inner_wait][0] == "running", "first inner wait")
    signal(app, instance, "i")
    wait_until(
        lambda: (
            _waiting(c, instance, inner_wait, f"{instance}::1::")
            and stamp_of(c, instance, inner_wait).endswith("::2")
        ),
        "second inner wait",
    )
    # inner iteration 2: the update/condition of inner iteration 1 are superseded, not reached
    nodes = views(c, instance)
    assert nodes[inner_wait][1] == "running"
    assert nodes[update][1] == "pending", nodes[update]
    assert nodes[cond][1] == "pending", nodes[cond]
    assert nodes[outer_wait] == ("pending", "pending", None)
    signal(app, instance, "i")
    wait_until(lambda: views(c, instance)[outer_wait][0] == "running", "outer wait")
    nodes = views(c, instance)
    assert nodes[update][1] == "completed" and nodes[cond][1] == "completed"
    signal(app, instance, "o")
    wait_until(lambda: _waiting(c, instance, inner_wait, f"{instance}::2::"), "root generation 2")
    nodes = views(c, instance)
    assert nodes[outer_wait][:2] == ("completed", "pending"), nodes[outer_wait]
    assert nodes[update][:2] == ("completed", "pending"), nodes[update]
    assert nodes[cond][:2] == ("completed", "pending"), nodes[cond]
    assert nodes[inner_wait][1] == "running"
    for loop in loops:
        assert nodes[loop][1] == "running", (loop, nodes[loop])
    text = c.execute("SELECT df.explain(%s)", (instance,)).fetchone()[0]
    assert "SIGNAL 'o' ○" in text, text
    c.execute("SELECT df.cancel(%s)", (instance,))


def test_race_in_a_loop_second_iteration_other_winner(app: App, worker: ThreadWorker) -> None:
    c = app.conn
    instance = app.start(
        "@> (df.race(df.wait_for_signal('a') ~> 'SELECT 1 AS a1',"
        " df.wait_for_signal('b') ~> 'SELECT 2 AS b1') ~> df.wait_for_signal('o'))"
    )
    waits = {
        str(r[1]): str(r[0])
        for r in c.execute(
            "SELECT id, query::jsonb ->> 'signal_name' FROM df.nodes"
            " WHERE instance_id = %s AND node_type = 'SIGNAL'",
            (instance,),
        ).fetchall()
    }
    race = node_id(c, instance, kind="RACE")
    a1 = node_id(c, instance, query="SELECT 1 AS a1")
    b1 = node_id(c, instance, query="SELECT 2 AS b1")
    wait_until(lambda: views(c, instance)[waits["b"]][0] == "running", "race 1")
    signal(app, instance, "a")
    wait_until(lambda: views(c, instance)[waits["o"]][0] == "running", "outer wait 1")
    nodes = views(c, instance)
    assert nodes[a1][1] == "completed"
    assert nodes[waits["b"]][1:] == ("skipped", race)
    assert nodes[b1][1:] == ("skipped", race)
    signal(app, instance, "o")
    wait_until(
        lambda: (
            _waiting(c, instance, waits["a"], f"{instance}::2::")
            and _waiting(c, instance, waits["b"], f"{instance}::2::")
        ),
        "race 2",
    )
    nodes = views(c, instance)
    assert nodes[a1][1] == "pending", nodes[a1]
    assert nodes[waits["o"]][1] == "pending"
    signal(app, instance, "b")
    wait_until(lambda: _waiting(c, instance, waits["o"], f"{instance}::2"), "outer wait 2")
    nodes = views(c, instance)
    assert nodes[b1][1] == "completed"
    assert nodes[a1][1:] == ("skipped", race), nodes[a1]
    assert nodes[waits["a"]][1:] == ("skipped", race), nodes[waits["a"]]
    c.execute("SELECT df.cancel(%s)", (instance,))


def test_cancelled_instance_keeps_running_and_pending(app: App, worker: ThreadWorker) -> None:
    c = app.conn
    instance = app.start("'SELECT 1' ~> df.sleep(60) ~> 'SELECT 2'")
    sleep = node_id(c, instance, kind="SLEEP")
    wait_until(lambda: views(c, instance)[sleep][0] == "running", "the sleep")
    c.execute("SELECT df.cancel(%s)", (instance,))
    assert status_of(c, instance) == "cancelled"
    time.sleep(0.3)  # the worker has nothing left to write
    root = root_of(c, instance)
    nodes = views(c, instance)
    assert nodes[root] == ("running", "running", None)
    assert nodes[child(c, instance, root)] == ("running", "running", None)
    assert nodes[sleep] == ("running", "running", None)
    assert nodes[node_id(c, instance, query="SELECT 1")] == ("completed", "completed", None)
    assert nodes[node_id(c, instance, query="SELECT 2")] == ("pending", "pending", None)


def test_children_of_retry_and_timeout_wrappers(app: App, worker: ThreadWorker) -> None:
    c = app.conn
    # Never reached: the wrappers and their children are skipped.
    failed, status = app.run(
        "'SELECT 1/0'"
        " ~> (df.retry('SELECT 2 AS retried', 3) ~> df.timeout('SELECT 3 AS limited', 5))"
    )
    assert status == "failed"
    root = root_of(c, failed)
    nodes = views(c, failed)
    for never in (
        node_id(c, failed, kind="RETRY"),
        node_id(c, failed, query="SELECT 2 AS retried"),
        node_id(c, failed, kind="TIMEOUT"),
        node_id(c, failed, query="SELECT 3 AS limited"),
    ):
        assert nodes[never] == ("pending", "skipped", root)

    # A df.timeout that expired: the step it abandoned failed, the rest of its sequence is
    # skipped (from the sequence, which the timeout stamped failed).
    timed_out, status = app.run("df.timeout('SELECT pg_sleep(10)' ~> 'SELECT 2 AS never', 1)")
    assert status == "failed"
    timeout = node_id(c, timed_out, kind="TIMEOUT")
    sequence = child(c, timed_out, timeout)
    nodes = views(c, timed_out)
    assert nodes[timeout] == ("failed", "failed", None)
    assert nodes[sequence] == ("failed", "failed", None)
    assert nodes[node_id(c, timed_out, query="SELECT pg_sleep(10)")] == ("failed", "failed", None)
    assert nodes[node_id(c, timed_out, query="SELECT 2 AS never")] == (
        "pending",
        "skipped",
        sequence,
    )

    # A df.retry that gave up: the same below the retry.
    exhausted, status = app.run("df.retry('SELECT 1/0' ~> 'SELECT 2 AS never', 2, 0)")
    assert status == "failed"
    sequence = child(c, exhausted, node_id(c, exhausted, kind="RETRY"))
    assert views(c, exhausted)[node_id(c, exhausted, query="SELECT 2 AS never")] == (
        "pending",
        "skipped",
        sequence,
    )


# -- inferred status on hand-written stamps ------------------------------------------------------


def stamp(conn: Conn, instance: str, node: str, status: str, execution_id: object) -> None:
    conn.execute(
        "UPDATE df.nodes SET status = %s, status_details = %s::jsonb"
        " WHERE instance_id = %s AND id = %s",
        (status, None if execution_id is None else Jsonb(execution_id), instance, node),
    )


def test_inference_rules_on_written_stamps(su: Conn) -> None:
    """The inference rules of df.instance_nodes one by one (docs/monitoring.md), on stamps
    written by hand (no worker)."""
    instance = start(
        su,
        "df.loop('SELECT 1 AS a' ~> df.if('SELECT true', 'SELECT 2 AS t', 'SELECT 3 AS e')"
        " ~> df.join3('SELECT 4 AS j1', 'SELECT 5 AS j2', 'SELECT 6 AS j3'), 'SELECT 7 AS cond')",
    )
    q = {
        name: node_id(su, instance, query=f"SELECT {n} AS {name}")
        for n, name in enumerate(("a", "t", "e", "j1", "j2", "j3", "cond"), start=1)
    }
    loop = node_id(su, instance, kind="LOOP")
    body = child(su, instance, loop)
    then_if = child(su, instance, body)
    branch = node_id(su, instance, kind="IF")
    condition = node_id(su, instance, query="SELECT true")
    join = node_id(su, instance, kind="JOIN")
    g = f"{instance}::"
    # Generation 3 of the root loop: the IF ran its then arm; the JOIN is running, its first
    # branch done, its third (an extra_nodes child) still at generation 2's scope.
    for node, status, execution in (
        (loop, "running", f"{g}3"),
        (body, "running", f"{g}3"),
        (then_if, "completed", f"{g}3"),
        (q["a"], "completed", f"{g}3"),
        (branch, "completed", f"{g}3"),
        (condition, "completed", f"{g}3"),
        (q["t"], "completed", f"{g}3"),
        (q["e"], "completed", f"{g}2"),  # taken in generation 2
        (join, "running", f"{g}3"),
        (q["j1"], "completed", f"{g}3::{q['j1']}::1"),
        (q["j2"], "running", f"{g}3::{q['j2']}::1"),
        (q["j3"], "completed", f"{g}2::{q['j3']}::1"),  # a branch of generation 2
        (q["cond"], "completed", f"{g}2"),
    ):
        stamp(su, instance, node, status, {"execution_id": execution})
    nodes = views(su, instance)
    assert nodes[q["e"]] == ("completed", "skipped", branch)  # the IF decided, this time
    assert nodes[q["j3"]] == ("completed", "pending", join)
    assert nodes[q["cond"]] == ("completed", "pending", loop)
    assert nodes[q["j2"]] == ("running", "running", None)
    assert nodes[q["j1"]] == ("completed", "completed", None)
    assert nodes[q["t"]] == ("completed", "completed", None)

    # A superseded node that is still marked running (an abandoned RACE loser of an earlier
    # iteration) is not running now.
    stamp(su, instance, q["j3"], "running", {"execution_id": f"{g}2::{q['j3']}::1"})
    assert views(su, instance)[q["j3"]] == ("running", "pending", join)
    # Unreadable or missing stamps are not superseded: the physical status stands.
    for unreadable in ({"execution_id": "nonsense"}, {"other": 1}, "just text", [1], None):
        stamp(su, instance, q["e"], "completed", unreadable)
        assert views(su, instance)[q["e"]] == ("completed", "completed", None), unreadable
    # A generation of a scope compares within the scope only: generation 2 of a branch of
    # generation 3 is current.
    stamp(su, instance, q["j1"], "completed", {"execution_id": f"{g}3::{q['j1']}::2"})
    stamp(su, instance, q["j2"], "completed", {"execution_id": f"{g}3::{q['j2']}::1"})
    nodes = views(su, instance)
    assert nodes[q["j1"]] == nodes[q["j2"]] == ("completed", "completed", None)


def test_inference_on_malformed_graphs_terminates(su: Conn) -> None:
    """Users may insert df.nodes rows by hand: cycles and shared children must not make the
    walk loop or explode, and nodes off the tree keep their physical status."""
    instance = start(su, "'SELECT 1 AS a' ~> ('SELECT 2 AS b' ~> 'SELECT 3 AS c')")
    root = root_of(su, instance)
    inner = child(su, instance, root, "right")
    a = node_id(su, instance, query="SELECT 1 AS a")
    c = node_id(su, instance, query="SELECT 3 AS c")
    with su.transaction():
        # The inner sequence points back at the root, and shares the first step.
        su.execute(
            "UPDATE df.nodes SET left_node = %s, right_node = %s"
            " WHERE instance_id = %s AND id = %s",
            (a, root, instance, inner),
        )
        su.execute(
            "INSERT INTO df.nodes (id, instance_id, node_type, query, submitted_by)"
            " SELECT 'ffffffff', %s, 'SQL', 'SELECT 9', submitted_by FROM df.instances"
            " WHERE id = %s",
            (instance, instance),
        )
    stamp(su, instance, root, "failed", {"execution_id": f"{instance}::1"})
    stamp(su, instance, a, "failed", {"execution_id": f"{instance}::1"})
    stamp(su, instance, c, "running", {"execution_id": f"{instance}::1"})
    nodes = views(su, instance)
    assert len(nodes) == 6
    assert nodes[inner] == ("pending", "skipped", root)
    assert nodes[a] == ("failed", "failed", None)
    # No longer reachable, or never part of the graph: physical status.
    assert nodes[c] == ("running", "running", None)
    assert nodes["ffffffff"] == ("pending", "pending", None)


def test_instance_nodes_shows_only_the_callers_instances(su: Conn, make_role: RoleFactory) -> None:
    owner, other = make_role(), make_role()
    instance = start(owner.conn, "'SELECT 1' ~> 'SELECT 2'")
    check(
        owner.conn,
        [
            (f"(SELECT count(*) FROM df.instance_nodes('{instance}'))", 3),
            (f"(SELECT count(*) FROM df.instance_nodes('{instance}', 1))", 3),
        ],
    )
    # Another role's instance is an unknown one; a superuser sees every instance.
    check(
        other.conn,
        [
            (f"(SELECT count(*) FROM df.instance_nodes('{instance}'))", 0),
            (f"(SELECT count(*) FROM df.instance_nodes('{instance}', 1))", 0),
        ],
    )
    check(su, [(f"(SELECT count(*) FROM df.instance_nodes('{instance}'))", 3)])


# -- df.list_instances, paginated ----------------------------------------------------------------

FUNCTION_NAME = "pg_durable::orchestration::execute-function-graph"
TOO_MANY = (
    "df.list_instances: limit_count ({}) exceeds pg_durable.list_instances_max_limit ({}); "
    "request fewer rows, or use the paginated df.list_instances overload "
    "(after_cursor/next_cursor) for large result sets"
)
INVALID_CURSOR = Error("df.list_instances: invalid after_cursor")


def created(conn: Conn, instance: str, when: str) -> None:
    conn.execute("UPDATE df.instances SET created_at = %s WHERE id = %s", (when, instance))


def page(
    conn: Conn,
    limit: int,
    cursor: str | None = None,
    status: str | None = None,
    label: str | None = None,
) -> tuple[list[str], str | None]:
    """(ids of one page, its next_cursor), checking the cursor is the same on every row."""
    rows = conn.execute(
        "SELECT instance_id, next_cursor FROM df.list_instances(%s, %s, %s, %s)",
        (status, limit, label, cursor),
    ).fetchall()
    assert len({r[1] for r in rows}) <= 1, rows
    return [r[0] for r in rows], rows[0][1] if rows else None


def all_pages(conn: Conn, limit: int, **filters: str) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        ids, cursor = page(conn, limit, cursor, **filters)
        pages.append(ids)
        if cursor is None:
            return pages


def flat(pages: list[list[str]]) -> list[str]:
    return [i for p in pages for i in p]


def hex_of(text: str) -> str:
    return text.encode().hex()


def test_list_instances_pages_in_order(su: Conn) -> None:
    ids = [start(su, "'SELECT 1', %s", f"l{i % 2}") for i in range(7)]
    # Three instances share one created_at, two another; the page size (2) cuts both groups.
    times = ["12:00:05", "12:00:03", "12:00:03", "12:00:03", "12:00:01", "12:00:01", "11:59:00"]
    for instance, t in zip(ids, times, strict=True):
        created(su, instance, f"2026-03-01 {t}.123456+00")
    expected = [
        ids[0],
        *sorted(ids[1:4]),
        *sorted(ids[4:6]),
        ids[6],
    ]
    assert flat(all_pages(su, 2)) == expected
    assert [len(p) for p in all_pages(su, 2)] == [2, 2, 2, 1]
    assert all_pages(su, 7) == [expected]  # one full page: no cursor
    assert all_pages(su, 1000) == [expected]
    for size in (1, 3, 6):
        assert flat(all_pages(su, size)) == expected

    # The cursor names the page's last row, exactly as pg_durable encodes it.
    first, cursor = page(su, 2)
    assert cursor == hex_of(f"v1|2026-03-01T12:00:03.123456+00|{first[1]}")
    # The offset is the session's: a cursor is an instant, whatever the time zone.
    su.execute("SET TimeZone = 'Asia/Kolkata'")
    _, kolkata = page(su, 2)
    assert kolkata == hex_of(f"v1|2026-03-01T17:30:03.123456+05:30|{first[1]}")
    su.execute("SET TimeZone = 'America/New_York'")
    assert page(su, 5, kolkata)[0] == expected[2:7]
    su.execute("RESET TimeZone")
    # Upper-case hex is still hex.
    assert page(su, 5, cursor.upper())[0] == expected[2:7]

    # Keyset: instances started between two pages do not shift the next page.
    start(su, "'SELECT 1'")
    assert page(su, 2, cursor)[0] == expected[2:4]

    # Filters: exact status and label, combined with the cursor.
    su.execute("UPDATE df.instances SET status = 'failed' WHERE id = ANY(%s)", (ids[1:4],))
    assert flat(all_pages(su, 1, status="failed")) == sorted(ids[1:4])
    assert all_pages(su, 2, status="FAILED") == [[]]
    assert flat(all_pages(su, 2, label="l0")) == [i for i in expected if ids.index(i) % 2 == 0]
    assert flat(all_pages(su, 1, status="failed", label="l1")) == sorted(
        i for i in ids[1:4] if ids.index(i) % 2 == 1
    )
    # Rows without created_at are never listed, as in pg_durable.
    su.execute("UPDATE df.instances SET created_at = NULL WHERE id = %s", (ids[0],))
    assert ids[0] not in flat(all_pages(su, 3))


def test_pagination_ties_last_row_and_combined_filters(app: App) -> None:
    with app.conn.transaction():  # one now(): every created_at ties
        tied = [app.start("'SELECT 1'", label=("a" if i % 2 else "b")) for i in range(7)]
    for _i in range(3):
        app.start("'SELECT 1'", label="a")
    for instance in tied[:3]:
        app.conn.execute("SELECT df.cancel(%s)", (instance,))
    everything = [
        str(r[0])
        for r in app.conn.execute(
            "SELECT id FROM df.instances ORDER BY created_at DESC, id"
        ).fetchall()
    ]
    for status in (None, "pending", "cancelled"):
        for label in (None, "a", "b"):
            expected = [
                i
                for i, s, lab in app.conn.execute(
                    "SELECT id, status, label FROM df.instances ORDER BY created_at DESC, id"
                ).fetchall()
                if (status is None or s == status) and (label is None or lab == label)
            ]
            for limit in (1, 2, 3, len(expected) or 1, len(expected) + 1):
                pages = all_pages(app.conn, limit, status=status, label=label)
                flat = [i for p in pages for i in p]
                assert flat == expected, (status, label, limit, pages)
                # the last page never carries a cursor, even when it is exactly full
                assert all(len(p) == limit for p in pages[:-1])
                if expected:
                    assert pages[-1], (status, label, limit, pages)
    assert len(everything) == 10


def test_list_instances_paginated_columns(su: Conn) -> None:
    done = start(su, "'SELECT 1', 'done'")
    waiting = start(su, "'SELECT 1'")
    created(su, done, "2026-03-01 12:00:00+00")
    created(su, waiting, "2026-03-01 11:00:00+00")
    su.execute(
        "UPDATE df.instances SET status = 'completed', completed_at = '2026-03-01 12:00:09+00'"
        " WHERE id = %s",
        (done,),
    )
    su.execute("UPDATE df._runs SET generation = 4, output = 'out' WHERE instance_id = %s", (done,))
    cur = su.execute("SELECT * FROM df.list_instances(NULL, 10, NULL)")
    assert [c.name for c in cur.description or []] == [
        "instance_id",
        "label",
        "function_name",
        "status",
        "execution_count",
        "output",
        "created_at",
        "completed_at",
        "next_cursor",
    ]
    rows = cur.fetchall()
    assert [r[:6] for r in rows] == [
        (done, "done", FUNCTION_NAME, "completed", 4, "out"),
        (waiting, None, FUNCTION_NAME, "pending", 1, None),
    ]
    assert [(r[6].isoformat(), r[7] and r[7].isoformat(), r[8]) for r in rows] == [
        ("2026-03-01T12:00:00+00:00", "2026-03-01T12:00:09+00:00", None),
        ("2026-03-01T11:00:00+00:00", None, None),
    ]
    # The basic overload lists the same rows in the same order, without the extra columns.
    assert [r[:6] for r in su.execute("SELECT * FROM df.list_instances()")] == [r[:6] for r in rows]


def test_list_instances_paginated_limits(su: Conn) -> None:
    for _ in range(3):
        start(su, "'SELECT 1'")
    check(
        su,
        [
            ("(SELECT count(*) FROM df.list_instances(NULL, NULL, NULL))", 3),
            ("(SELECT count(*) FROM df.list_instances(NULL, 1000, NULL))", 3),
            (
                "(SELECT count(*) FROM df.list_instances(NULL, 0, NULL))",
                Error("limit_count must be at least 1"),
            ),
            (
                "(SELECT count(*) FROM df.list_instances(NULL, -3, NULL, NULL))",
                Error("limit_count must be at least 1"),
            ),
            (
                "(SELECT count(*) FROM df.list_instances(NULL, 1001, NULL))",
                Error(TOO_MANY.format(1001, 1000)),
            ),
        ],
    )
    # An administrator's limit (df.set_setting; tests/test_settings.py has the other ways).
    su.execute("SELECT df.set_setting('pg_durable.list_instances_max_limit', '2')")
    check(
        su,
        [
            ("(SELECT count(*) FROM df.list_instances(NULL, 2, NULL))", 2),
            (
                "(SELECT count(*) FROM df.list_instances(NULL, 3, NULL))",
                Error(TOO_MANY.format(3, 2)),
            ),
            # The default page size (100) is checked against the cap too.
            (
                "(SELECT count(*) FROM df.list_instances(NULL, NULL, NULL))",
                Error(TOO_MANY.format(100, 2)),
            ),
        ],
    )
    # The limit is checked before the cursor.
    check(
        su,
        [
            (
                "(SELECT count(*) FROM df.list_instances(NULL, 0, NULL, 'zz'))",
                Error("limit_count must be at least 1"),
            )
        ],
    )
    su.execute("SELECT df.set_setting('pg_durable.list_instances_max_limit', '1000000')")
    check(su, [("(SELECT count(*) FROM df.list_instances(NULL, 1000000, NULL))", 3)])


def test_list_instances_refuses_every_malformed_cursor(su: Conn) -> None:
    instance = start(su, "'SELECT 1'")
    ts = "2026-03-01T12:00:00.000000+00"
    valid = hex_of(f"v1|{ts}|{instance}")
    # The longest cursor is 512 hex digits (256 bytes).
    longest = hex_of(f"v1|{ts}|" + "x" * (256 - len(f"v1|{ts}|")))
    assert len(longest) == 512
    cases: list[tuple[str, object]] = [
        (valid, 0),
        (valid.upper(), 0),
        (longest, 0),
        (longest + "78", INVALID_CURSOR),  # 514 digits
        ("", INVALID_CURSOR),
        ("abc", INVALID_CURSOR),  # odd length
        ("zz", INVALID_CURSOR),  # not hex
        (valid[:-2] + "g0", INVALID_CURSOR),
        (" " + valid[1:], INVALID_CURSOR),
        ("ff" + valid[2:], INVALID_CURSOR),  # not UTF-8
        (valid + "00", INVALID_CURSOR),  # a NUL byte
        (hex_of(f"v2|{ts}|{instance}"), INVALID_CURSOR),
        (hex_of(f"V1|{ts}|{instance}"), INVALID_CURSOR),
        (hex_of(f"|{ts}|{instance}"), INVALID_CURSOR),
        (hex_of(f"v1|{ts}"), INVALID_CURSOR),
        (hex_of(f"v1|{ts}|"), INVALID_CURSOR),  # empty id
        (hex_of(f"v1||{instance}"), INVALID_CURSOR),  # empty timestamp
        (hex_of("v1"), INVALID_CURSOR),
        (hex_of(f"v1|2026-03-01T12:00:00+00|{instance}"), INVALID_CURSOR),  # no microseconds
        (hex_of(f"v1|2026-03-01T12:00:00.000+00|{instance}"), INVALID_CURSOR),
        (hex_of(f"v1|2026-03-01 12:00:00.000000+00|{instance}"), INVALID_CURSOR),
        (hex_of(f"v1|2026-03-01T12:00:00.000000Z|{instance}"), INVALID_CURSOR),
        (hex_of(f"v1|2026-03-01T12:00:00.000000|{instance}"), INVALID_CURSOR),  # no offset
        (hex_of(f"v1|2026-03-01T12:00:00.000000+0530|{instance}"), INVALID_CURSOR),
        (hex_of(f"v1|2026-13-01T12:00:00.000000+00|{instance}"), INVALID_CURSOR),  # no 13th month
        (hex_of(f"v1|2026-02-30T12:00:00.000000+00|{instance}"), INVALID_CURSOR),
        (hex_of(f"v1|{ts} |{instance}"), INVALID_CURSOR),
        # Accepted shapes: an offset with minutes, an id holding '|' (it is the rest).
        (hex_of(f"v1|2026-03-01T12:00:00.000000+05:30|{instance}"), 0),
        (hex_of("v1|2026-03-01T12:00:00.000000-03|a|b"), 0),
    ]
    check(
        su,
        [
            (f"(SELECT count(*) FROM df.list_instances(NULL, 10, NULL, '{cursor}'))", expected)
            for cursor, expected in cases
        ],
    )
    # A cursor after nothing at all is no error.
    assert page(su, 10, hex_of(f"v1|{ts}|ffffffff"))[0] == []
    assert page(su, 10, hex_of("v1|3000-01-01T00:00:00.000000+00|0"))[0] == [instance]


def test_a_deep_page_reads_about_its_size_not_everything_before_it(conn: Conn) -> None:
    """Migration 12: 'each filter has an index that yields rows in page order, so a page
    costs about its size'. The cursor condition (created_at < $4 OR (created_at = $4 AND
    id > $5)) is not an index bound: the scan starts at the newest instance and filters
    (EXPLAIN: Index Cond: created_at IS NOT NULL, Rows Removed by Filter: <depth>), so page k
    reads k*limit rows and paging through N instances costs O(N^2). Measured on 40,000
    instances: 1 ms for page 1, 10 ms for the last. Adding the redundant bound
    `AND i.created_at <= $4` makes it an Index Cond."""
    conn.execute("SET pg_durable.enable_superuser_instances = on")
    with conn.transaction():
        conn.execute("SELECT df.start('SELECT 1') FROM generate_series(1, 3000)")
    conn.execute(
        "UPDATE df.instances SET created_at = created_at - make_interval(secs => random() * 100000)"
    )
    conn.execute("VACUUM ANALYZE df.instances")
    rows = conn.execute(
        "SELECT id, created_at FROM df.instances ORDER BY created_at DESC, id"
    ).fetchall()
    ts, last_id = rows[2500][1], rows[2500][0]
    cursor = conn.execute(
        "SELECT encode(convert_to('v1|' || to_char(%s::timestamptz,"
        " 'YYYY-MM-DD\"T\"HH24:MI:SS.USOF') || '|' || %s, 'UTF8'), 'hex')",
        (ts, last_id),
    ).fetchone()[0]

    def index_reads() -> int:
        conn.execute("SELECT pg_stat_force_next_flush()")
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT sum(idx_tup_read) FROM pg_stat_user_indexes WHERE relname = 'instances'"
        ).fetchone()
        return int(row[0] or 0)

    before = index_reads()
    page = conn.execute(
        "SELECT instance_id FROM df.list_instances(NULL, 10, NULL, %s)", (cursor,)
    ).fetchall()
    read = index_reads() - before
    assert [r[0] for r in page] == [r[0] for r in rows[2501:2511]]
    assert read < 200, f"a 10-row page at depth 2,500 read {read} index entries"


# -- df.instance_info and df.instance_executions -------------------------------------------------

Execution = tuple[int, str, int, int, str | None]


def executions(conn: Conn, instance: str, limit: int | None = 100) -> list[Execution]:
    rows = conn.execute(
        "SELECT * FROM df.instance_executions(%s, %s)", (instance, limit)
    ).fetchall()
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def checkpoints(su: Conn, instance: str) -> int:
    row = su.execute(
        "SELECT checkpoints FROM df._runs WHERE instance_id = %s", (instance,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_instance_info(su: Conn) -> None:
    instance = start(su, "'SELECT 1', 'my label'")
    cur = su.execute("SELECT * FROM df.instance_info(%s)", (instance,))
    assert [c.name for c in cur.description or []] == [
        "instance_id",
        "label",
        "function_name",
        "function_version",
        "current_execution_id",
        "status",
        "output",
    ]
    assert cur.fetchall() == [(instance, "my label", FUNCTION_NAME, "1.0.0", 1, "pending", None)]
    su.execute(
        "UPDATE df._runs SET generation = 3, output = 'x' WHERE instance_id = %s", (instance,)
    )
    su.execute("UPDATE df.instances SET status = 'failed' WHERE id = %s", (instance,))
    check(
        su,
        [
            (
                f"(SELECT row(current_execution_id, status, output)::text"
                f" FROM df.instance_info('{instance}'))",
                "(3,failed,x)",
            ),
            ("(SELECT count(*) FROM df.instance_info('00000000'))", 0),
            ("(SELECT count(*) FROM df.instance_info(NULL))", 0),
            # By name, as pg_durable's callers may write it.
            (f"(SELECT label FROM df.instance_info(instance_id => '{instance}'))", "my label"),
        ],
    )


def test_executions_of_a_root_loop(app: App, worker: ThreadWorker, su: Conn) -> None:
    c = app.conn
    c.execute("CREATE TABLE app.counter (n int)")
    c.execute("INSERT INTO app.counter VALUES (0)")
    # Three iterations of at least a second each, then the condition is false.
    instance, status = app.run(
        "df.loop('UPDATE app.counter SET n = n + 1 RETURNING n', 'SELECT n < 3 FROM app.counter')"
    )
    assert status == "completed"
    rows = executions(c, instance)
    assert [(r[0], r[1]) for r in rows] == [
        (3, "Completed"),
        (2, "ContinuedAsNew"),
        (1, "ContinuedAsNew"),
    ]
    # Each iteration's output is its body's result; the last one is the instance's output.
    assert [r[4] for r in rows] == [
        '{"rows":[{"n":3}],"row_count":1}',
        '{"rows":[{"n":2}],"row_count":1}',
        '{"rows":[{"n":1}],"row_count":1}',
    ]
    # An iteration lasts at least a second, the last one ends with its condition.
    assert all(900 <= r[3] < 10_000 for r in rows[1:]), rows
    assert 0 <= rows[0][3] < 5_000, rows
    # Every checkpoint counts in exactly one execution.
    assert all(r[2] >= 2 for r in rows), rows
    assert sum(r[2] for r in rows) == checkpoints(su, instance)
    info = c.execute(
        "SELECT current_execution_id, status, output FROM df.instance_info(%s)", (instance,)
    ).fetchone()
    assert info == (3, "completed", '{"rows":[{"n":3}],"row_count":1}')
    # The same numbers as df.list_instances and df.metrics.
    assert c.execute(
        "SELECT execution_count FROM df.list_instances() WHERE instance_id = %s", (instance,)
    ).fetchone() == (3,)
    assert su.execute("SELECT total_executions, total_events FROM df.metrics()").fetchone() == (
        3,
        checkpoints(su, instance),
    )

    # Limits: newest first, capped at 10,000, at least 1.
    assert executions(c, instance, 1) == rows[:1]
    assert executions(c, instance, None) == rows  # the default, 5
    assert executions(c, instance, 20_000) == rows
    assert c.execute("SELECT count(*) FROM df.instance_executions(%s)", (instance,)).fetchone() == (
        3,
    )
    check(
        c,
        [
            (
                f"(SELECT count(*) FROM df.instance_executions('{instance}', 0))",
                Error("limit_count must be at least 1"),
            ),
            (
                f"(SELECT count(*) FROM df.instance_executions('{instance}', -1))",
                Error("limit_count must be at least 1"),
            ),
            ("(SELECT count(*) FROM df.instance_executions('00000000'))", 0),
        ],
    )


def test_executions_while_running_and_when_cancelled(
    app: App, worker: ThreadWorker, su: Conn
) -> None:
    c = app.conn
    instance = app.start("@> ('SELECT 1 AS tick' ~> df.wait_for_signal('go'))")
    wait = node_id(c, instance, kind="SIGNAL")
    wait_until(lambda: views(c, instance)[wait][0] == "running", "the first wait")
    # Running: no duration yet, the events so far.
    ((gen, status, events, duration, output),) = executions(c, instance)
    assert (gen, status, duration, output) == (1, "Running", 0, None)
    assert events == checkpoints(su, instance) > 0

    signal(app, instance, "go")
    wait_until(
        lambda: (
            stamp_of(c, instance, wait) == f"{instance}::2"
            and views(c, instance)[wait][0] == "running"
        ),
        "the second iteration's wait",
    )
    rows = executions(c, instance)
    assert [(r[0], r[1], r[3] == 0) for r in rows] == [
        (2, "Running", True),
        (1, "ContinuedAsNew", False),
    ]
    assert rows[1][4] == '{"signal_name":"go","timed_out":false,"data":{}}'
    c.execute("SELECT df.cancel(%s)", (instance,))
    rows = executions(c, instance)
    assert [(r[0], r[1], r[4]) for r in rows] == [
        (2, "Cancelled", None),
        (1, "ContinuedAsNew", '{"signal_name":"go","timed_out":false,"data":{}}'),
    ]
    assert rows[0][3] >= 0 and sum(r[2] for r in rows) == checkpoints(su, instance)

    # A failure ends the only execution with the error.
    failed, status = app.run("'SELECT 1/0'")
    assert status == "failed"
    ((gen, status, events, duration, output),) = executions(c, failed)
    assert (gen, status) == (1, "Failed")
    assert output == "SQL execution failed: error returned from database: division by zero"
    assert events == checkpoints(su, failed) and duration >= 0


def end_root_execution(su: Conn, instance: str, generation: int, then: int) -> None:
    """Checkpoint what a root loop beginning its next iteration hands df._checkpoint: the
    execution ``generation`` ended, the root is at generation ``then``."""
    task = su.execute(
        "INSERT INTO df._tasks (instance_id, role_oid, activation, kind, token)"
        " SELECT i.id, i.submitted_by, 1000000 + %s, 'timer', gen_random_uuid()"
        "   FROM df.instances i WHERE i.id = %s RETURNING id, token",
        (generation, instance),
    ).fetchone()
    assert task is not None
    change = {
        "state": None,
        "generation": then,
        "writes": [],
        "tasks": [],
        "dropped": [],
        "outcome": None,
        "ended_execution": {"generation": generation, "output": None},
    }
    su.execute(
        "SELECT * FROM df._checkpoint(%s, %s, %s, %s, 0, 30)",
        (task[0], task[1], Jsonb(change), uuid.uuid4()),
    )


def test_executions_of_a_pending_instance_and_the_kept_history(su: Conn) -> None:
    instance = start(su, "'SELECT 1'")
    assert executions(su, instance) == [(1, "Running", 0, 0, None)]
    # A loop that iterated for long keeps its newest 1,000 executions.
    for ended, generation in ((1, 2), (2, 3), (3, 1002)):
        end_root_execution(su, instance, ended, generation)
    rows = executions(su, instance)
    assert [(r[0], r[1]) for r in rows] == [(1002, "Running"), (3, "ContinuedAsNew")]
    assert executions(su, instance, 10_000)[-1][0] == 3
    assert su.execute(
        "SELECT min(generation), count(*) FROM df._executions WHERE instance_id = %s",
        (instance,),
    ).fetchone() == (3, 1)  # the current execution is derived, not stored


# -- row-level scoping -----------------------------------------------------------------------------


def test_monitoring_shows_only_the_callers_instances(su: Conn, make_role: RoleFactory) -> None:
    alice, bob = make_role(), make_role()
    mine = start(alice.conn, "'SELECT 1', 'shared label'")
    theirs = start(bob.conn, "'SELECT 1' ~> 'SELECT 2', 'shared label'")
    su_own = start(su, "'SELECT 1', 'shared label'")
    # As if a root loop had iterated once: each has an ended execution in the history.
    su.execute("UPDATE df._runs SET generation = 2 WHERE instance_id IN (%s, %s)", (mine, theirs))
    su.execute(
        "INSERT INTO df._executions (instance_id, generation, status, started_at, finished_at,"
        " first_event, events) SELECT id, 1, 'ContinuedAsNew', created_at, now(), 0, 0"
        " FROM df.instances WHERE id IN (%s, %s)",
        (mine, theirs),
    )
    counts = (
        "(SELECT count(*) FROM df.list_instances())",
        "(SELECT count(*) FROM df.list_instances(NULL, 10, 'shared label'))",
        "(SELECT count(*) FROM df.list_instances('pending', 10, NULL))",
    )
    for conn, own in ((alice.conn, mine), (bob.conn, theirs)):
        other = theirs if own == mine else mine
        check(conn, [(sql, 1) for sql in counts])
        check(
            conn,
            [
                ("(SELECT instance_id FROM df.list_instances(NULL, 10, NULL))", own),
                (f"(SELECT count(*) FROM df.instance_info('{own}'))", 1),
                (f"(SELECT count(*) FROM df.instance_executions('{own}'))", 2),
                # Another role's instance is an unknown one, everywhere.
                (f"(SELECT count(*) FROM df.instance_info('{other}'))", 0),
                (f"(SELECT count(*) FROM df.instance_executions('{other}'))", 0),
                (f"(SELECT count(*) FROM df.instance_nodes('{other}'))", 0),
                (f"(SELECT count(*) FROM df.instance_info('{su_own}'))", 0),
                # The history table itself, read directly.
                ("(SELECT array_agg(instance_id::text) FROM df._executions)", [own]),
                ("(SELECT array_agg(instance_id::text) FROM df._runs)", [own]),
            ],
        )
    # Superusers see everyone's.
    check(
        su,
        [
            *[(sql, 3) for sql in counts],
            *[(f"(SELECT count(*) FROM df.instance_info('{i}'))", 1) for i in (mine, theirs)],
            (f"(SELECT count(*) FROM df.instance_executions('{theirs}'))", 2),
        ],
    )
    # Users still cannot read what the engine keeps for itself.
    check(
        alice.conn,
        [
            (
                "(SELECT count(*) FROM (SELECT state FROM df._runs) s)",
                Error("permission denied for table _runs"),
            ),
            ("(SELECT count(*) FROM df._tasks)", Error("permission denied for table _tasks")),
        ],
    )


# -- workers ---------------------------------------------------------------------------------------

WORKER_COLUMNS = [
    "worker_id",
    "hostname",
    "pid",
    "started_at",
    "last_seen_at",
    "alive",
    "concurrency",
    "version",
    "tasks_held",
    "step_names",
]
TASK_COLUMNS = [
    "worker_id",
    "task_id",
    "instance_id",
    "submitted_by",
    "node_id",
    "node_type",
    "kind",
    "attempts",
    "lease_expires_at",
    "lease_expired",
]


def test_workers_show_liveness_and_what_each_holds(
    su: Conn, app: App, worker: ThreadWorker
) -> None:
    import os
    import socket

    import pgdurable

    wait_until(
        lambda: su.execute("SELECT count(*) FROM df.workers()").fetchone() == (1,),
        "the worker's registration",
    )
    cur = su.execute("SELECT * FROM df.workers()")
    assert [c.name for c in cur.description or []] == WORKER_COLUMNS
    ((worker_id, host, pid, started, seen, alive, concurrency, version, held, names),) = (
        cur.fetchall()
    )
    assert worker_id == worker.worker.id
    assert names == []  # the fixture's worker has no Python steps
    assert (host, pid, alive, concurrency, version, held) == (
        socket.gethostname(),
        os.getpid(),
        True,
        4,
        pgdurable.__version__,
        0,
    )
    assert started <= seen

    # A step in flight is held by the worker that runs it, under a lease.
    slow = app.start("'SELECT 1' ~> 'SELECT pg_sleep(30)'")
    sleeper = node_id(app.conn, slow, query="SELECT pg_sleep(30)")
    wait_until(
        lambda: (
            su.execute(
                "SELECT count(*) FROM df.worker_tasks() WHERE node_id = %s", (sleeper,)
            ).fetchone()
            == (1,)
        ),
        "the step's lease",
    )
    assert su.execute("SELECT tasks_held FROM df.workers()").fetchone() == (1,)
    cur = su.execute("SELECT * FROM df.worker_tasks()")
    assert [c.name for c in cur.description or []] == TASK_COLUMNS
    ((holder, _, instance, role, node, node_type, kind, attempts, expires, expired),) = (
        cur.fetchall()
    )
    assert (holder, instance, role, node, node_type, kind, attempts, expired) == (
        worker.worker.id,
        slow,
        app.role,
        sleeper,
        "SQL",
        "sql",
        1,
        False,
    )
    assert expires > seen

    # Cancelled: the step is withdrawn, and the worker holds nothing.
    su.execute("SELECT df.cancel(%s)", (slow,))
    assert su.execute("SELECT tasks_held FROM df.workers()").fetchone() == (0,)


def test_a_dead_worker_keeps_its_expired_leases(su: Conn) -> None:
    """A worker killed without a clean stop is not alive and keeps its tasks, with leases
    that ran out, until another worker claims them (no worker runs here to do so)."""
    dead, live = uuid.uuid4(), uuid.uuid4()
    su.execute(
        "INSERT INTO df._worker_epoch (epoch_id, started_at, last_seen_at, hostname, pid,"
        " concurrency, version) VALUES"
        " (%s, now() - interval '2 hours', now() - interval '45 seconds', 'gone', 1, 10, 'a'),"
        " (%s, now() - interval '1 hour', now() - interval '5 seconds', 'here', 2, 10, 'b')",
        (dead, live),
    )
    waiting = start(su, "'SELECT 1'")
    held = start(su, "'SELECT 1'")
    su.execute(
        "UPDATE df._tasks SET lease_owner = %s, visible_at = now() - interval '1 second'"
        " WHERE instance_id = %s",
        (dead, held),
    )
    rows = su.execute("SELECT worker_id, hostname, alive, tasks_held FROM df.workers()")
    assert rows.fetchall() == [(dead, "gone", False, 1), (live, "here", True, 0)]
    # Alive is relative to the heartbeat interval the caller expects.
    rows = su.execute("SELECT worker_id, alive FROM df.workers('1 minute')")
    assert rows.fetchall() == [(dead, True), (live, True)]
    rows = su.execute("SELECT worker_id, alive FROM df.workers('1 second')")
    assert rows.fetchall() == [(dead, False), (live, False)]
    rows = su.execute(
        "SELECT worker_id, instance_id, submitted_by, node_id, node_type, kind, attempts,"
        " lease_expired FROM df.worker_tasks()"
    )
    assert rows.fetchall() == [(dead, held, "postgres", None, None, "start", 0, True)]
    # The other instance's task is queued, held by nobody.
    assert su.execute(
        "SELECT lease_owner FROM df._tasks WHERE instance_id = %s", (waiting,)
    ).fetchone() == (None,)


def test_workers_only_by_explicit_grant(su: Conn, make_role: RoleFactory) -> None:
    user, admin = make_role(), make_role(grant=False)
    su.execute("SELECT df.grant_usage(%s, with_grant => true)", (admin.name,))
    check(
        user.conn,
        [
            (
                "(SELECT count(*) FROM df.workers())",
                Error("permission denied for function workers"),
            ),
            (
                "(SELECT count(*) FROM df.worker_tasks())",
                Error("permission denied for function worker_tasks"),
            ),
        ],
    )
    su.execute(
        "INSERT INTO df._worker_epoch (epoch_id, hostname, pid, concurrency, version)"
        " VALUES (gen_random_uuid(), 'h', 1, 1, 'v')"
    )
    # System-wide: the admin sees workers and tasks it could not read itself.
    check(
        admin.conn,
        [
            ("(SELECT count(*) FROM df.workers())", 1),
            ("(SELECT count(*) FROM df.workers('1 second'))", 1),
            ("(SELECT count(*) FROM df.worker_tasks())", 0),
            (
                "(SELECT count(*) FROM df._worker_epoch)",
                Error("permission denied for table _worker_epoch"),
            ),
        ],
    )
    # An admin passes them on with with_grant, and takes them back with revoke_usage.
    admin.conn.execute("SELECT df.grant_usage(%s, with_grant => true)", (user.name,))
    check(user.conn, [("(SELECT count(*) FROM df.workers())", 1)])
    admin.conn.execute("SELECT df.revoke_usage(%s)", (user.name,))
    su.execute(f"REVOKE EXECUTE ON FUNCTION df.workers(interval) FROM {user.name}")
    assert not outcome(
        su, "has_function_privilege(%s, 'df.workers(interval)', 'EXECUTE')", [user.name]
    )
    assert not outcome(
        su, "has_function_privilege(%s, 'df.worker_tasks()', 'EXECUTE')", [user.name]
    )
    # GRANT EXECUTE is the other explicit way.
    su.execute(f"GRANT EXECUTE ON FUNCTION df.worker_tasks() TO {user.name}")
    check(user.conn, [("(SELECT count(*) FROM df.worker_tasks())", 0)])


def test_grants_for_monitoring_and_their_renewal(su: Conn, make_role: RoleFactory) -> None:
    """df.grant_usage grants what monitoring reads, df.revoke_usage takes it back, and
    df.refresh_grants gives it to roles granted before this version."""
    admin, user = make_role(grant=False), make_role(grant=False)
    su.execute("SELECT df.grant_usage(%s, with_grant => true)", (admin.name,))
    admin.conn.execute("SELECT df.grant_usage(%s)", (user.name,))
    granted = (
        "has_table_privilege(%s, 'df._executions', 'SELECT')",
        "has_column_privilege(%s, 'df._runs', 'checkpoints', 'SELECT')",
    )
    for expr in granted:
        assert outcome(su, expr, [user.name]) is True, expr
    assert (
        outcome(su, "has_column_privilege(%s, 'df._runs', 'state', 'SELECT')", [user.name]) is False
    )
    for fn in ("df.workers(interval)", "df.worker_tasks()"):
        assert outcome(su, f"has_function_privilege(%s, '{fn}', 'EXECUTE')", [user.name]) is False
        assert (
            outcome(
                su, f"has_function_privilege(%s, '{fn}', 'EXECUTE WITH GRANT OPTION')", [admin.name]
            )
            is True
        )

    # As after an upgrade from a version without them: the upgrade's df.refresh_grants renews
    # the admin's grant, then the user's from the admin.
    su.execute(f"REVOKE SELECT ON df._executions FROM {admin.name} CASCADE")
    su.execute(f"REVOKE SELECT (checkpoints) ON df._runs FROM {admin.name} CASCADE")
    su.execute(f"REVOKE EXECUTE ON FUNCTION df.workers(interval) FROM {admin.name} CASCADE")
    for expr in granted:
        assert outcome(su, expr, [user.name]) is False, expr
    su.execute("SELECT df.refresh_grants()")
    for expr in granted:
        assert outcome(su, expr, [user.name]) is True, expr
    assert outcome(
        su, "has_function_privilege(%s, 'df.workers(interval)', 'EXECUTE')", [admin.name]
    )
    check(user.conn, [("(SELECT count(*) FROM df._executions)", 0)])
    admin.conn.execute("SELECT df.revoke_usage(%s)", (user.name,))
    for expr in granted:
        assert outcome(su, expr, [user.name]) is False, expr
    su.execute("SELECT df.revoke_usage(%s)", (admin.name,))
    for expr in granted:
        assert outcome(su, expr, [admin.name]) is False, expr

    # An admin not renewed yet still revokes what it granted, without an error for what it
    # never held.
    su.execute("SELECT df.grant_usage(%s, with_grant => true)", (admin.name,))
    admin.conn.execute("SELECT df.grant_usage(%s)", (user.name,))
    su.execute(f"REVOKE SELECT ON df._executions FROM {admin.name} CASCADE")
    su.execute(f"REVOKE SELECT (checkpoints) ON df._runs FROM {admin.name} CASCADE")
    admin.conn.execute("SELECT df.revoke_usage(%s)", (user.name,))
    for expr in (
        "has_schema_privilege(%s, 'df', 'USAGE')",
        "has_column_privilege(%s, 'df._runs', 'output', 'SELECT')",
        "has_table_privilege(%s, 'df.nodes', 'SELECT')",
    ):
        assert outcome(su, expr, [user.name]) is False, expr
