"""The floor under the cost targets: what the rows a workflow must write cost PostgreSQL alone.

Run ``.venv/bin/python bench/floor.py [--seconds 6] [--rounds 3] [--clients 4]``.

bench/run.py measures pgdurable against pgbench's one-INSERT transaction. This script asks
how far down any engine could go: pgbench itself (a C client, prepared statements, no
worker, no claim, no validation, no security checks) writes the rows of a workflow as plain
SQL, and its rate is compared with the one-INSERT rate (4 clients, as bench/run.py measures
it) in the same run, alternating:

- ``insert``: bench/run.py's baseline, ``INSERT INTO bench_effects`` (one row, one commit).
- ``seq_step``: one middle step of a ten-step sequence, as a checkpoint writes it in
  pgdurable's schema: the step's effect, its task row handed to the next step, three df.nodes
  rows (the step completed, its THEN completed, the next step running), the instance's state
  in df._runs; one commit. Each client has an instance of its own.
- ``sql1``: a one-step workflow in pgdurable's schema, as two transactions (the caller's start,
  the worker's step): df.instances (whose trigger adds df._runs, the start task and the NOTIFY)
  and df.nodes; then the effect, the task deleted, the node, the state and the instance's
  status written.
- ``sql1_minimal``: the same rows in four bare tables (primary keys and one queue index; no
  other index, constraint, trigger or foreign key): the least any design that records an
  instance, its node, its state and its task could write.
- ``sql1_minimal_x5``: the same, five workflows' steps committed together (as pgdurable's
  batches do); their starts are still the callers' transactions, one each.

The sql1 scripts take each instance id from a sequence first (random ids would collide within
a run): one more round trip per workflow, a few microseconds of the server's CPU.

Each is reported per unit (a step, a workflow): its rate, its share of the ``insert`` rate,
PostgreSQL's CPU per unit, and how busy the machine was (a script whose clients wait on round
trips rather than on the CPU would understate the floor: ``--clients 16`` shows).
bench/README.md ("The floor under the targets") has the figures.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import DATABASE, PGBENCH_SQL, ROLE, CpuMeter, Server

from pgdurable.embedded import bin_path

BASELINE_CLIENTS = 4  # bench/run.py's baseline: pgbench's 4-client commit rate
RESULT = '{"rows":[],"row_count":0}'
# A ten-step sequence's interpreter state, as df._runs holds it (about 570 bytes).
SEQ_STATE = json.dumps(
    {
        "acts": {
            str(a): {"env": 0, "exec": 0, "node": f"{a:08x}", "slot": "left", "parent": a - 1}
            for a in range(1, 11)
        },
        "envs": {"0": {}},
        "next": 16,
        "execs": {"0": {"gen": 1, "scope": "00000000"}},
        "format": 2,
    }
)
SQL1_STATE = '{"acts": {}, "envs": {"0": {}}, "next": 2, "execs": {}, "format": 2}'
MINIMAL_SCHEMA = """
CREATE SCHEMA floor;
CREATE TABLE floor.instances (
    id varchar(8) PRIMARY KEY, label text, root_node varchar(8), status text DEFAULT 'pending',
    submitted_by regrole, created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now(), completed_at timestamptz);
CREATE TABLE floor.nodes (
    id varchar(8), instance_id varchar(8), node_type text, query text,
    status text DEFAULT 'pending', result jsonb, status_details jsonb, submitted_by regrole,
    created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now(),
    started_at timestamptz, PRIMARY KEY (instance_id, id));
CREATE TABLE floor.runs (
    instance_id varchar(8) PRIMARY KEY, state jsonb, checkpoints integer DEFAULT 0,
    output text, finished_at timestamptz);
CREATE TABLE floor.tasks (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, instance_id varchar(8), role_oid oid,
    activation integer, kind text, visible_at timestamptz DEFAULT now(), lease_owner uuid,
    token uuid);
CREATE INDEX ON floor.tasks (role_oid, visible_at);
-- Instance ids for the sql1 scripts, above any df.start draws in this run's few instances.
CREATE SEQUENCE floor.ids START 2147483648;
GRANT USAGE ON SCHEMA floor TO PUBLIC;
"""


@dataclass
class Script:
    name: str
    text: str
    units: int  # steps or workflows per pgbench transaction (script run)
    unit: str
    user: str  # the role pgbench logs in as
    protocol: str = "prepared"  # bench/run.py's baseline uses "simple"


def _id(var: str) -> str:
    """The instance id in pgbench variable ``var`` (see sql1_script)."""
    return f":{var}"


def _sql1_start(schema: str, var: str) -> list[str]:
    inst = _id(var)
    lines = [
        f"INSERT INTO {schema}.instances (id, root_node, submitted_by)"
        f" VALUES ({inst}, 'aaaaaaaa', '{ROLE}');",
        f"INSERT INTO {schema}.nodes (id, instance_id, node_type, query, submitted_by)"
        f" VALUES ('aaaaaaaa', {inst}, 'SQL', 'INSERT INTO bench_effects(v) VALUES (1)',"
        f" '{ROLE}');",
    ]
    if schema == "floor":  # df.instances' trigger writes these in pgdurable's schema
        lines += [
            f"INSERT INTO floor.runs (instance_id) VALUES ({inst});",
            f"INSERT INTO floor.tasks (instance_id, role_oid, activation, kind)"
            f" VALUES ({inst}, '{ROLE}'::regrole, 0, 'start');",
        ]
    return ["BEGIN;", *lines, "COMMIT;"]


def _sql1_step(schema: str, var: str) -> list[str]:
    inst = _id(var)
    runs, tasks = ("df._runs", "df._tasks") if schema == "df" else ("floor.runs", "floor.tasks")
    return [
        "INSERT INTO bench_effects(v) VALUES (1);",
        f"DELETE FROM {tasks} WHERE instance_id = {inst};",
        f"UPDATE {schema}.nodes SET status = 'completed', result = '{RESULT}',"
        ' status_details = \'{"execution_id": "x::1"}\', updated_at = now(),'
        f" started_at = now() WHERE instance_id = {inst} AND id = 'aaaaaaaa';",
        f"UPDATE {runs} SET state = '{SQL1_STATE}', checkpoints = checkpoints + 1,"
        f" output = '{RESULT}', finished_at = now() WHERE instance_id = {inst};",
        f"UPDATE {schema}.instances SET status = 'completed', updated_at = now(),"
        f" completed_at = now() WHERE id = {inst};",
    ]


def sql1_script(schema: str, workflows: int) -> str:
    """``workflows`` one-step workflows: each start a transaction, their steps one more."""
    variables = [f"r{i}" for i in range(workflows)]
    # Ids from a sequence (random ones would collide within a run), one round trip each.
    lines = [f"SELECT lpad(to_hex(nextval('floor.ids')), 8, '0') AS {v} \\gset" for v in variables]
    for v in variables:
        lines += _sql1_start(schema, v)
    lines.append("BEGIN;")
    for v in variables:
        lines += _sql1_step(schema, v)
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


def seq_step_script(
    user: psycopg.Connection[tuple[object, ...]],
    conn: psycopg.Connection[tuple[object, ...]],
    clients: int,
) -> str:
    """A middle step of a ten-step sequence, each client writing rows of its own instance
    (started by ``user``, set up by ``conn``, the owner)."""
    g = " ~> ".join(f"'INSERT INTO bench_effects(v) VALUES ({n})'" for n in range(10))
    instances, tasks, done, then, nxt = [], [], [], [], []
    for _ in range(clients):
        row = user.execute(f"SELECT df.start(({g})::text)").fetchone()
        assert row is not None
        instance = str(row[0])
        # In insertion order (pre-order): the nine THENs, the root first, then the steps,
        # first to last. The fifth step, its THEN (the sixth THEN) and the sixth step.
        nodes = [
            str(r[0])
            for r in conn.execute(
                "SELECT id FROM df.nodes WHERE instance_id = %s ORDER BY ctid", (instance,)
            )
        ]
        task = conn.execute(
            "UPDATE df._tasks SET kind = 'sql', node_id = %s, lease_owner = gen_random_uuid(),"
            " token = gen_random_uuid(), visible_at = 'infinity', attempts = 1"
            " WHERE instance_id = %s RETURNING id",
            (nodes[13], instance),
        ).fetchone()
        assert task is not None
        instances.append(instance)
        tasks.append(str(task[0]))
        done.append(nodes[13])
        then.append(nodes[5])
        nxt.append(nodes[14])

    def pick(values: list[str], quote: bool = True) -> str:
        items = ", ".join(f"'{v}'" if quote else v for v in values)
        return f"(ARRAY[{items}])[:client_id + 1]"

    inst, step, parent, following = pick(instances), pick(done), pick(then), pick(nxt)
    return "\n".join(
        [
            "BEGIN;",
            "INSERT INTO bench_effects(v) VALUES (1);",
            f"UPDATE df._tasks t SET activation = t.activation + 1, kind = 'sql',"
            f" node_id = {following},"
            ' payload = \'{"sql": "INSERT INTO bench_effects(v) VALUES (6)"}\','
            " token = gen_random_uuid(), attempts = 1, deferrals = 0,"
            f" created_at = clock_timestamp() WHERE t.id = {pick(tasks, quote=False)};",
            f"UPDATE df.nodes n SET status = CASE WHEN n.id = {following} THEN 'running'"
            f" ELSE 'completed' END, result = CASE WHEN n.id = {following} THEN NULL"
            f" ELSE '{RESULT}'::jsonb END, status_details = '{{\"execution_id\": \"x::1\"}}',"
            f" updated_at = clock_timestamp() WHERE n.instance_id = {inst}"
            f" AND n.id IN ({step}, {parent}, {following});",
            f"UPDATE df._runs r SET state = '{SEQ_STATE}', generation = 1,"
            f" checkpoints = r.checkpoints + 1 WHERE r.instance_id = {inst};",
            "COMMIT;",
        ]
    )


def run_script(
    server: Server, base: Path, script: Script, seconds: int, clients: int
) -> tuple[float, float, float]:
    """pgbench runs ``script`` with ``clients`` clients: units per second, PostgreSQL's CPU
    per unit in milliseconds, and how busy the machine was (%)."""
    path = base / f"{script.name}.sql"
    path.write_text(script.text)
    cmd = [
        str(bin_path("pgbench")),
        "-h", "127.0.0.1", "-p", str(server.pg.port), "-U", script.user,
        "-n", "-M", script.protocol, "-f", str(path),
        "-c", str(clients), "-j", "2", "-T", str(seconds), DATABASE,
    ]  # fmt: skip
    meter = CpuMeter(server.postmaster_pid, [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    time.sleep(0.3)  # the postmaster reaps pgbench's backends: their CPU moves to it
    cpu = meter.stop()
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout)
    txs = re.search(r"number of transactions actually processed: (\d+)", done.stdout)
    if done.returncode != 0 or not (tps and txs):
        raise SystemExit(f"pgbench {script.name} failed:\n{done.stderr or done.stdout}")
    units = int(txs.group(1)) * script.units
    rate = float(tps.group(1)) * script.units
    return rate, 1000 * cpu["postgres"] / max(units, 1), cpu["busy_pct"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=6, help="per pgbench run")
    parser.add_argument("--rounds", type=int, default=3, help="alternated runs of each")
    parser.add_argument(
        "--clients", type=int, default=4, help="pgbench clients of the scripts (not the baseline)"
    )
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="pgdurable-floor-"))
    server = Server(base)
    try:
        server.start()
        admin = server.admin_dsn.split("://", 1)[1].split("@", 1)[0]
        with (
            psycopg.connect(server.admin_dsn, autocommit=True) as conn,
            psycopg.connect(server.user_dsn, autocommit=True) as user,
        ):
            conn.execute(MINIMAL_SCHEMA)
            seq_step = seq_step_script(user, conn, args.clients)
        scripts = [
            Script("insert", PGBENCH_SQL, 1, "transaction", ROLE, "simple"),
            Script("seq_step", seq_step, 1, "step", admin),
            Script("sql1", sql1_script("df", 1), 1, "workflow", admin),
            Script("sql1_minimal", sql1_script("floor", 1), 1, "workflow", admin),
            Script("sql1_minimal_x5", sql1_script("floor", 5), 5, "workflow", admin),
        ]
        runs: dict[str, list[tuple[float, float, float]]] = {s.name: [] for s in scripts}
        for _ in range(args.rounds):
            for script in scripts:
                clients = BASELINE_CLIENTS if script.name == "insert" else args.clients
                runs[script.name].append(run_script(server, base, script, args.seconds, clients))
        baseline = statistics.median(r[0] for r in runs["insert"])
        print(
            f"pgbench: insert (bench/run.py's baseline) {BASELINE_CLIENTS} clients; the others"
            f" {args.clients} clients, prepared; medians of {args.rounds} alternated runs of"
            f" {args.seconds} s"
        )
        print(f"{'script':18} {'per second':>12} {'of insert':>10} {'PG CPU/unit':>12} {'busy':>5}")
        for script in scripts:
            rate, cpu, busy = (statistics.median(r[k] for r in runs[script.name]) for k in range(3))
            print(
                f"{script.name:18} {rate:9,.0f} {script.unit[:2]:>2} {rate / baseline:9.1%}"
                f" {cpu:9.3f} ms {busy:4.0f}%"
            )
        return 0
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
