"""The pgdurable command as a user runs it: real processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psycopg

from pgdurable.embedded import EmbeddedPostgres, free_port

ROOT = Path(__file__).resolve().parent.parent


class Process:
    """A pgdurable subprocess whose combined output is collected by a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgdurable", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        self.output = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output += line

    def wait_for(self, needle: str, timeout: float = 90) -> str:
        """The output so far, once it contains ``needle``."""
        deadline = time.monotonic() + timeout
        while needle not in self.output:
            assert self.proc.poll() is None, f"exited early:\n{self.output}"
            assert time.monotonic() < deadline, f"{needle!r} not seen:\n{self.output}"
            time.sleep(0.05)
        return self.output

    def stop(self, sig: int) -> int:
        """Send ``sig`` and return the exit code."""
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        self._reader.join(timeout=5)
        return code


def _server_log(data: Path) -> str:
    log = data / "server.log"
    return f"\n--- {log} ---\n{log.read_text(errors='replace')[-3000:]}" if log.exists() else ""


def test_up_runs_a_first_workflow_stops_cleanly_and_reuses_its_data(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = str(free_port())
    web = free_port()
    proc = Process(
        "up",
        "--data-dir",
        str(data),
        "--port",
        port,
        "--run",
        "examples/hello.sql",
        "--dashboard-port",
        str(web),
    )
    try:
        out = proc.wait_for("the worker keeps running")
        assert "installed the schema of release" in out
        assert f"'postgresql://app@127.0.0.1:{port}/postgres'" in out
        assert "completed:" in out and '"greetings": 2' in out
        # The dashboard, as the application role: it sees the hello instance.
        assert f"dashboard: http://127.0.0.1:{web}/ (as role app)" in out
        listing = httpx.get(f"http://127.0.0.1:{web}/instances?label=hello", timeout=10)
        assert listing.status_code == 200 and "completed" in listing.text
    finally:
        assert proc.stop(signal.SIGINT) == 0, proc.output
    # PostgreSQL was stopped too
    assert not (data / "postmaster.pid").exists(), proc.output + _server_log(data)

    proc = Process("up", "--data-dir", str(data), "--port", port, "--no-dashboard")
    try:
        out = proc.wait_for("ready: concurrency")
        assert "installed schema" not in out  # the same data, already installed
        with psycopg.connect(f"postgresql://app@127.0.0.1:{port}/postgres") as conn:
            row = conn.execute("SELECT count(*) FROM df.instances WHERE label = 'hello'")
            assert row.fetchone() == (1,)
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.output


def test_install_is_idempotent_and_reports_errors(cluster: EmbeddedPostgres) -> None:
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS cli_install")
        admin.execute("CREATE DATABASE cli_install")
    dsn = cluster.dsn("cli_install")
    first = run_pgdurable("install", "--dsn", dsn)
    assert first.returncode == 0, first.stderr
    assert "applied" in first.stderr
    again = run_pgdurable("install", env={**os.environ, "PGDURABLE_DSN": dsn})
    assert again.returncode == 0
    assert "up to date" in again.stderr
    bad = run_pgdurable("install", "--dsn", "postgresql://nobody@127.0.0.1:1/x")
    assert bad.returncode != 0
    assert "install failed" in bad.stderr


def test_worker_rejects_a_malformed_dsn() -> None:
    result = run_pgdurable("worker", "--dsn", "host=x port=notaport bogus")
    assert result.returncode != 0
    assert "invalid DSN" in result.stderr


def run_pgdurable(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``pgdurable ARGS`` run to its end, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "pgdurable", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


def get_when_up(url: str) -> httpx.Response:
    """GET ``url`` once its server accepts connections (it prints its address first)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return httpx.get(url, timeout=5)
        except httpx.ConnectError:
            assert time.monotonic() < deadline, f"{url} never answered"
            time.sleep(0.1)


def test_dashboard_serves_until_a_signal_and_refuses_what_it_cannot_do(
    cluster: EmbeddedPostgres, dsn: str
) -> None:
    port = free_port()
    proc = Process("dashboard", "--dsn", dsn, "--port", str(port))
    try:
        proc.wait_for(f"dashboard: http://127.0.0.1:{port}/")
        page = get_when_up(f"http://127.0.0.1:{port}/")
        assert page.status_code == 200 and "Overview" in page.text
        assert httpx.get(f"http://127.0.0.1:{port}/", headers={"host": "evil"}).status_code == 400
        # The same port again: a clear error at once.
        taken = run_pgdurable("dashboard", "--dsn", cluster.dsn(), "--port", str(port))
        assert taken.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in taken.stderr
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.output
    assert dsn not in proc.output  # no secrets in its output
    # A database without the schema: a page that says so.
    proc = Process("dashboard", "--dsn", cluster.dsn(), "--port", str(port))
    try:
        proc.wait_for("dashboard: ")
        page = get_when_up(f"http://127.0.0.1:{port}/instances")
        assert page.status_code == 503 and "pgdurable install" in page.text
    finally:
        assert proc.stop(signal.SIGINT) == 0, proc.output
    # Reachable from other machines only with a login.
    exposed = run_pgdurable("dashboard", "--dsn", cluster.dsn(), "--host", "0.0.0.0")
    assert exposed.returncode == 2 and "pass --login" in exposed.stderr
