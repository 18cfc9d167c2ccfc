"""The ``pgdurable`` command: up | install | worker | dashboard | ls | show | watch | cancel |
restart | signal.
Thin: parses flags, calls the library."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import psycopg
import uvicorn
from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler
from rich.markup import escape

from . import __version__, schema
from .dashboard import server as dashboard_server
from .dashboard.app import DashboardConfig
from .embedded import EmbeddedPostgres, EmbeddedPostgresError, bin_path
from .monitor import queries, render
from .python_steps import import_steps
from .worker.batch import DEFAULT_BATCH_SIZE, MAX_BATCH_SIZE
from .worker.egress import EgressPolicy
from .worker.loop import Worker, WorkerConfig, WorkerError

console = Console(stderr=True)  # messages and logs
output = Console()  # what the monitoring commands show


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if console.is_terminal:
        logging.basicConfig(
            level=level, format="%(message)s", handlers=[RichHandler(console=console)]
        )
    else:  # one plain line per record, for journald, docker and friends
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # The pool reports every failed connection attempt; the worker already says, once per
    # retry, that the database is unreachable.
    logging.getLogger("psycopg").setLevel(logging.WARNING)
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)


@click.group()
@click.version_option(__version__, prog_name="pgdurable")
def main() -> None:
    """Durable execution inside PostgreSQL."""


@main.command()
@click.option("--dsn", envvar="PGDURABLE_DSN", required=True, help="Database to install into.")
def install(dsn: str) -> None:
    """Install or upgrade the df schema in an existing database (idempotent)."""
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            # An upgrade says in NOTICEs which roles it granted new privileges to, and which
            # delegated administrators must grant them again.
            conn.add_notice_handler(lambda d: console.print(f"notice: {d.message_primary}"))
            applied = schema.install(conn)
    except (psycopg.Error, schema.SchemaError) as exc:
        raise click.ClickException(f"install failed: {exc}") from None
    if applied:
        console.print(f"applied: {', '.join(applied)}")
    else:
        console.print(f"schema is up to date (release {__version__})")


F = TypeVar("F", bound=Callable[..., Any])


def _worker_options(f: F) -> F:
    f = click.option(
        "--concurrency", default=10, show_default=True, help="Steps run at the same time."
    )(f)
    f = click.option(
        "--role-slots",
        envvar="PGDURABLE_ROLE_SLOTS",
        type=click.IntRange(min=1),
        default=None,
        help="The most steps one role runs at the same time on this worker [default: "
        "--concurrency]. Whatever the cap, roles with work share the slots fairly.",
    )(f)
    f = click.option(
        "--batch-size",
        envvar="PGDURABLE_BATCH_SIZE",
        type=click.IntRange(min=1, max=MAX_BATCH_SIZE),
        default=DEFAULT_BATCH_SIZE,
        show_default=True,
        help="The most SQL steps of one role, ready at once, that run and commit in one "
        "transaction (1: each alone).",
    )(f)
    f = click.option(
        "--single-role",
        is_flag=True,
        help="Run every step as the DSN's role (managed Postgres with one password).",
    )(f)
    f = click.option(
        "--lease-seconds",
        envvar="PGDURABLE_LEASE_SECONDS",
        default=30.0,
        show_default=True,
        type=click.FloatRange(min=0.5),
        help="How long a claimed step stays reserved without a heartbeat; a dead worker's "
        "steps are taken over after this.",
    )(f)
    f = click.option(
        "--reconcile-interval",
        envvar="PGDURABLE_RECONCILE_INTERVAL",
        type=click.FloatRange(min=0, max=86400),
        default=None,
        help="Seconds between purges of finished instances past retention; 0 disables them "
        "[default: pg_durable.reconcile_interval, else 300].",
    )(f)
    f = click.option(
        "--purge-batch-size",
        envvar="PGDURABLE_PURGE_BATCH_SIZE",
        type=click.IntRange(min=1),
        default=500,
        show_default=True,
        help="Finished instances removed per purge transaction.",
    )(f)
    f = click.option(
        "--import",
        "imports",
        envvar="PGDURABLE_IMPORTS",
        multiple=True,
        metavar="MODULE",
        help="A module whose Python steps (@pgdurable.step) this worker runs (repeat, or "
        "comma-separate).",
    )(f)
    f = click.option(
        "--metrics-port",
        envvar="PGDURABLE_METRICS_PORT",
        type=click.IntRange(min=1, max=65535),
        default=None,
        help="Serve Prometheus metrics at http://HOST:PORT/metrics [default: none].",
    )(f)
    f = click.option(
        "--metrics-host",
        envvar="PGDURABLE_METRICS_HOST",
        default="127.0.0.1",
        show_default=True,
        help="The address the metrics are served on (0.0.0.0: every interface).",
    )(f)
    f = click.option(
        "--trace",
        envvar="PGDURABLE_TRACE",
        is_flag=True,
        help="Emit OpenTelemetry traces of instances and steps, as the OTEL_* variables say "
        "(needs the extra pgdurable[tracing]).",
    )(f)
    f = click.option("--verbose", "-v", is_flag=True, help="Debug logging.")(f)
    return _egress_options(f)


def _egress_options(f: F) -> F:
    """The operator's HTTP egress policy (docs/http.md); users cannot change it from SQL."""
    f = click.option(
        "--http-disable",
        envvar="PGDURABLE_HTTP_DISABLE",
        is_flag=True,
        help="Refuse every HTTP step.",
    )(f)
    f = click.option(
        "--http-allow-all",
        envvar="PGDURABLE_HTTP_ALLOW_ALL",
        is_flag=True,
        help="No host or address checks at all (private networks included).",
    )(f)
    f = click.option(
        "--http-allow-host",
        "http_allow_hosts",
        envvar="PGDURABLE_HTTP_ALLOW_HOSTS",
        multiple=True,
        metavar="SUFFIX",
        help="Only these hosts and their subdomains (repeat, or comma-separate); default: "
        "any public host.",
    )(f)
    f = click.option(
        "--http-allow-network",
        "http_allow_networks",
        envvar="PGDURABLE_HTTP_ALLOW_NETWORKS",
        multiple=True,
        metavar="CIDR",
        help="Private addresses HTTP steps may reach anyway, e.g. 10.1.2.0/24 (repeat, or "
        "comma-separate).",
    )(f)
    f = click.option(
        "--http-max-response-bytes",
        envvar="PGDURABLE_HTTP_MAX_RESPONSE_BYTES",
        default=10 * 1024 * 1024,
        show_default=True,
        type=click.IntRange(min=1),
        help="Larger responses fail the step.",
    )(f)
    f = click.option(
        "--http-max-redirects",
        envvar="PGDURABLE_HTTP_MAX_REDIRECTS",
        default=0,
        show_default=True,
        type=click.IntRange(min=0),
        help="Redirects to follow, each checked against the policy (0: return the 3xx).",
    )(f)
    return f


def _config(dsn: str, options: dict[str, Any]) -> WorkerConfig:
    """A WorkerConfig from the options of _worker_options."""
    try:
        egress = EgressPolicy(
            enabled=not options["http_disable"],
            allow_all=options["http_allow_all"],
            allowed_hosts=options["http_allow_hosts"],
            allowed_networks=options["http_allow_networks"],
            max_response_bytes=options["http_max_response_bytes"],
            max_redirects=options["http_max_redirects"],
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    modules = [m.strip() for entry in options["imports"] for m in entry.split(",") if m.strip()]
    if modules and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the project's own modules
    try:
        steps = import_steps(modules)
    except ImportError as exc:
        raise click.ClickException(str(exc)) from None
    return WorkerConfig(
        dsn=dsn,
        concurrency=options["concurrency"],
        single_role=options["single_role"],
        lease_seconds=options["lease_seconds"],
        egress=egress,
        reconcile_interval=options["reconcile_interval"],
        purge_batch_size=options["purge_batch_size"],
        role_slots=options["role_slots"],
        batch_size=options["batch_size"],
        steps=steps,
        metrics_port=options["metrics_port"],
        metrics_host=options["metrics_host"],
        trace=options["trace"],
    )


@main.command()
@click.option("--dsn", envvar="PGDURABLE_DSN", required=True, help="Database to work on.")
@_worker_options
def worker(dsn: str, verbose: bool, **options: Any) -> None:
    """Run a worker against an existing database until SIGTERM/SIGINT."""
    _setup_logging(verbose)
    _run_worker(_config(dsn, options))


@main.command()
@click.option(
    "--dsn",
    envvar="PGDURABLE_DSN",
    required=True,
    help="Database to show; the dashboard queries as its role (with --login: its host, port "
    "and database only).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Anything but loopback needs --login, unless you also pass "
    "--no-login-ok.",
)
@click.option("--port", default=dashboard_server.DEFAULT_PORT, show_default=True)
@click.option(
    "--login",
    is_flag=True,
    envvar="PGDURABLE_DASHBOARD_LOGIN",
    help="Visitors log in with a PostgreSQL role and password, and see what that role sees.",
)
@click.option(
    "--no-login-ok",
    is_flag=True,
    help="Serve a non-loopback address without --login (everyone who reaches it acts as "
    "the DSN's role).",
)
@click.option(
    "--allowed-host",
    "allowed",
    multiple=True,
    metavar="NAME",
    help="Also answer requests for this host name (e.g. the public name a TLS proxy forwards "
    "with); repeatable. On loopback, only the loopback names are answered otherwise.",
)
@click.option(
    "--refresh",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0.2),
    help="Seconds between refreshes of live pages.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def dashboard(
    dsn: str,
    host: str,
    port: int,
    login: bool,
    no_login_ok: bool,
    allowed: tuple[str, ...],
    refresh: float,
    verbose: bool,
) -> None:
    """Serve the web dashboard (docs/dashboard.md) until SIGTERM/SIGINT."""
    _setup_logging(verbose)
    if not dashboard_server.is_loopback(host) and not login and not no_login_ok:
        raise click.UsageError(
            f"--host {host} is reachable from other machines: pass --login (or --no-login-ok)"
        )
    config = DashboardConfig(
        dsn,
        login=login,
        allowed_hosts=dashboard_server.allowed_hosts(host, allowed),
        refresh_seconds=refresh,
    )
    sock = _listen(host, port)
    server = dashboard_server.make_server(config, host, port, embedded=True)
    console.print(f"dashboard: {dashboard_server.url(host, port)}", highlight=False)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        await server.serve(sockets=[sock])

    asyncio.run(serve())


@main.command()
@click.option(
    "--data-dir",
    default=".pgdurable",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the embedded PostgreSQL keeps its data.",
)
@click.option("--port", default=54329, show_default=True, help="TCP port on 127.0.0.1.")
@click.option(
    "--run",
    "run_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Once ready, submit the workflow in this SQL file (it returns an id) and show it run.",
)
@click.option(
    "--dashboard-port",
    default=dashboard_server.DEFAULT_PORT,
    show_default=True,
    help="The dashboard's TCP port on 127.0.0.1, as the application role.",
)
@click.option("--no-dashboard", is_flag=True, help="Do not serve the dashboard.")
@_worker_options
def up(
    data_dir: Path,
    port: int,
    run_file: Path | None,
    dashboard_port: int,
    no_dashboard: bool,
    verbose: bool,
    **options: Any,
) -> None:
    """Start an embedded PostgreSQL with the schema installed, a worker in the foreground, and
    the dashboard."""
    _setup_logging(verbose)
    pg = EmbeddedPostgres(data_dir, port)
    try:
        console.print(f"starting PostgreSQL 18 in {pg.data_dir} ...")
        pg.start()
    except EmbeddedPostgresError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        dsn = pg.dsn()
        with psycopg.connect(dsn) as conn:
            try:
                applied = schema.install(conn)
            except schema.SchemaError as exc:
                raise click.ClickException(f"{exc} (data directory {pg.data_dir})") from None
            _ensure_app_role(conn)
        if applied:
            console.print(f"installed the schema of release {__version__}")
        app_dsn = pg.dsn(user=APP_ROLE)
        console.print(
            f"[bold green]ready[/]: {bin_path('psql')} '{app_dsn}'\n"
            f"  (role {APP_ROLE} runs workflows; superuser: '{dsn}')",
            highlight=False,
            soft_wrap=True,
        )
        config = _config(dsn, options)
        dashboard = None
        if not no_dashboard:
            dashboard = (
                dashboard_server.make_server(
                    DashboardConfig(app_dsn), "127.0.0.1", dashboard_port, embedded=True
                ),
                _listen("127.0.0.1", dashboard_port),
            )
            console.print(
                f"dashboard: {dashboard_server.url('127.0.0.1', dashboard_port)}"
                f" (as role {APP_ROLE})",
                highlight=False,
            )
        demo = (lambda: _show_run(app_dsn, run_file)) if run_file else None
        _run_worker(config, demo=demo, dashboard=dashboard)
    finally:
        console.print("stopping PostgreSQL ...")
        pg.stop()


APP_ROLE = "app"


def _ensure_app_role(conn: psycopg.Connection[Any]) -> None:
    """The embedded server's application role: LOGIN, no superuser, its own schema ``app``.

    Workflows started by a superuser are refused unless the server allows them, so the
    embedded set-up gives newcomers an ordinary role to work as, the way production does.
    """
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (APP_ROLE,)).fetchone()
    if exists:
        return
    conn.execute(f"CREATE ROLE {APP_ROLE} LOGIN")
    conn.execute(f"CREATE SCHEMA {APP_ROLE} AUTHORIZATION {APP_ROLE}")
    conn.execute(f"ALTER ROLE {APP_ROLE} SET search_path = {APP_ROLE}, public")
    conn.execute("SELECT df.grant_usage(%s)", (APP_ROLE,))


def _listen(host: str, port: int) -> socket.socket:
    """The dashboard's socket, or a clear error if the port is taken."""
    try:
        return dashboard_server.bind(host, port)
    except OSError as exc:
        raise click.ClickException(
            f"the dashboard cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None


def _run_worker(
    config: WorkerConfig,
    demo: object = None,
    dashboard: tuple[uvicorn.Server, socket.socket] | None = None,
) -> None:
    """Run a worker (and the dashboard server, if given) until a signal; exit 0 after a clean
    stop."""

    async def main() -> None:
        worker = Worker(config)
        loop = asyncio.get_running_loop()

        def stop() -> None:
            worker.request_stop()
            if dashboard is not None:
                dashboard[0].should_exit = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        if callable(demo):
            loop.run_in_executor(None, demo)
        if dashboard is None:
            await worker.run()
            return
        server, sock = dashboard
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            await worker.run()
        finally:
            server.should_exit = True
            await serving

    try:
        asyncio.run(main())
    except WorkerError as exc:
        raise click.ClickException(str(exc)) from None


def _show_run(dsn: str, path: Path) -> None:
    """Submit the workflow in ``path`` and print its nodes' progress until it finishes."""
    try:
        _watch(dsn, path)
    except psycopg.Error as exc:
        console.print(f"[bold red]{path} failed:[/] {exc}", highlight=False, soft_wrap=True)


def _watch(dsn: str, path: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        text = path.read_text()
        console.print(
            f"[bold]submitting[/] {escape(str(path))}:\n{escape(text)}",
            highlight=False,
            soft_wrap=True,
        )
        row = conn.execute(text).fetchone()
        assert row is not None
        instance_id = str(row[0])
        console.print(f"started instance [bold]{instance_id}[/]")
        instance = _draw_until_done(console, conn, instance_id, 0.2)
        console.print(
            f"instance {instance_id} [bold]{instance['status']}[/]:"
            f" {escape(render.result_text(instance['output']))}",
            highlight=False,
            soft_wrap=True,
        )
        console.print("the worker keeps running; press Ctrl-C to stop")


# -- monitoring: ls, show, watch, cancel, restart, signal -------------------------------------

_dsn_option = click.option(
    "--dsn",
    envvar="PGDURABLE_DSN",
    required=True,
    help="Connect as the role whose instances to see (row-level security applies).",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")


@contextmanager
def _session(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection for one command; database errors become clean CLI errors."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            yield conn
    except psycopg.Error as exc:
        raise click.ClickException(exc.diag.message_primary or str(exc)) from None


@main.command("ls")
@_dsn_option
@click.option(
    "--status",
    type=click.Choice(["pending", "running", "completed", "failed", "cancelled"]),
    help="Only instances with this status.",
)
@click.option("--label", help="Only instances with exactly this label.")
@click.option("--limit", default=50, show_default=True, help="Instances per page.")
@click.option("--after", metavar="CURSOR", help="The next page (its cursor is printed).")
@_json_option
def ls(
    dsn: str, status: str | None, label: str | None, limit: int, after: str | None, as_json: bool
) -> None:
    """List your instances, newest first."""
    with _session(dsn) as conn:
        rows, cursor = queries.list_instances(conn, status, label, limit, after)
    if as_json:
        click.echo(render.to_json({"instances": rows, "next_cursor": cursor}))
        return
    output.print(render.instances_table(rows))
    if cursor:
        console.print(
            f"more: pgdurable ls --after {cursor}", highlight=False, markup=False, soft_wrap=True
        )


def _snapshot(conn: psycopg.Connection[Any], instance_id: str) -> tuple[dict[str, Any], list[Any]]:
    found = queries.instance(conn, instance_id)
    if found is None:
        raise click.ClickException(
            f"instance {instance_id} not found (or it was started by another role)"
        )
    return found, queries.nodes(conn, instance_id)


def _follow(
    conn: psycopg.Connection[Any], instance_id: str, interval: float
) -> Iterator[tuple[dict[str, Any], list[Any]]]:
    """Snapshots of an instance every ``interval`` seconds; the last one is terminal."""
    while True:
        instance, nodes = _snapshot(conn, instance_id)
        yield instance, nodes
        if instance["status"] in queries.TERMINAL:
            return
        time.sleep(interval)


def _draw_until_done(
    target: Console, conn: psycopg.Connection[Any], instance_id: str, interval: float
) -> dict[str, Any]:
    """Draw an instance until it ends (redrawn in place on a terminal, once at the end
    otherwise); returns its final row."""
    if target.is_terminal:
        with Live(console=target, auto_refresh=False) as live:
            for instance, nodes in _follow(conn, instance_id, interval):
                live.update(render.instance_view(instance, nodes, datetime.now(UTC)), refresh=True)
    else:
        *_, (instance, nodes) = _follow(conn, instance_id, interval)
        target.print(render.instance_view(instance, nodes, datetime.now(UTC)))
    return instance


def _as_json(instance: dict[str, Any], nodes: list[Any]) -> str:
    return render.to_json({"instance": instance, "nodes": [render.node_record(n) for n in nodes]})


@main.command()
@_dsn_option
@click.argument("instance_id")
@_json_option
def show(dsn: str, instance_id: str, as_json: bool) -> None:
    """Show an instance: its graph with each step's status, duration, result or error."""
    with _session(dsn) as conn:
        instance, nodes = _snapshot(conn, instance_id)
    if as_json:
        click.echo(_as_json(instance, nodes))
    else:
        output.print(render.instance_view(instance, nodes, datetime.now(UTC)))


@main.command()
@_dsn_option
@click.argument("instance_id")
@click.option("--interval", default=0.5, show_default=True, help="Seconds between refreshes.")
@_json_option
def watch(dsn: str, instance_id: str, interval: float, as_json: bool) -> None:
    """Follow an instance live until it ends; exit 0 if it completed, 1 otherwise.

    With --json, print a JSON document (as ``show --json``) each time something changed."""
    with _session(dsn) as conn:
        if as_json:
            last = ""
            for instance, nodes in _follow(conn, instance_id, interval):
                document = _as_json(instance, nodes)
                if document != last:
                    click.echo(document)
                    last = document
        else:
            instance = _draw_until_done(output, conn, instance_id, interval)
    if instance["status"] != "completed":
        sys.exit(1)


@main.command()
@_dsn_option
@click.argument("instance_id")
@click.option("--reason", default="Cancelled by user", show_default=True)
def cancel(dsn: str, instance_id: str, reason: str) -> None:
    """Cancel an instance: its steps in flight are interrupted and rolled back."""
    with _session(dsn) as conn:
        answer = queries.cancel(conn, instance_id, reason)
    if answer.startswith("Failed to cancel"):
        raise click.ClickException(answer)
    console.print(answer, highlight=False, markup=False)


@main.command()
@_dsn_option
@click.argument("instance_id")
def restart(dsn: str, instance_id: str) -> None:
    """Restart a failed or cancelled instance from where it ended: what completed is kept."""
    with _session(dsn) as conn:
        answer = queries.restart(conn, instance_id)
    console.print(answer, highlight=False, markup=False)


@main.command("signal")
@_dsn_option
@click.argument("instance_id")
@click.argument("name")
@click.argument("data", default="{}")
def send_signal(dsn: str, instance_id: str, name: str, data: str) -> None:
    """Send signal NAME to an instance, with DATA (JSON, or else a string; default {})."""
    with _session(dsn) as conn:
        queries.signal(conn, instance_id, name, data)
    console.print(f"signal '{name}' sent to {instance_id}", highlight=False, markup=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
