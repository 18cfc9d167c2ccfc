"""Monitoring from SQL (spec §5.4, §9.1–9.5, §10.3; migration 0012; docs/monitoring.md):
df.instance_nodes and its inferred statuses, df.list_instances' pagination, df.instance_info,
df.instance_executions, df.workers and df.worker_tasks, and their row-level scoping.

Inferred statuses are checked on instances a real worker ran, so the stamps are the ones the
interpreter writes, and once on hand-written stamps for the rules no workflow reaches on
purpose (malformed graphs, unreadable stamps).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg
import pytest
from conftest import App, ThreadWorker
from psycopg.types.json import Jsonb
from sqlcheck import Conn, check

from pgdurable.embedded import EmbeddedPostgres

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


@pytest.fixture
def su(conn: Conn) -> Conn:
    """The superuser connection, allowed to start instances."""
    conn.execute("SET pg_durable.enable_superuser_instances = on")
    return conn


@dataclass
class Role:
    name: str
    conn: Conn


@pytest.fixture
def make_role(cluster: EmbeddedPostgres, dbname: str, conn: Conn) -> Iterator[Callable[..., Role]]:
    """LOGIN roles with df usage (unless grant=False) and a connection as each."""
    made: list[Role] = []

    def create(grant: bool = True) -> Role:
        name = f"pgd_mon_{uuid.uuid4().hex[:10]}"
        conn.execute(f"CREATE ROLE {name} LOGIN")
        if grant:
            conn.execute("SELECT df.grant_usage(%s)", (name,))
        role = Role(name, psycopg.connect(cluster.dsn(dbname), user=name, autocommit=True))
        made.append(role)
        return role

    yield create
    for role in made:
        role.conn.close()
        conn.execute(f"DROP OWNED BY {role.name}")
        conn.execute(f"DROP ROLE {role.name}")


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
    """The rules of §9.5 one by one, on stamps written by hand (no worker)."""
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


def test_instance_nodes_shows_only_the_callers_instances(
    su: Conn, make_role: Callable[..., Role]
) -> None:
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
