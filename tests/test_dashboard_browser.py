"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): live pages,
cancel and signal through the page, and the screenshots of docs/dashboard.md.

Chromium is /usr/bin/chromium (``apt-get install chromium``; .ci/run installs it). Without it
these tests are skipped, unless PGDURABLE_REQUIRE_BROWSER is set (as CI sets it): then they
fail. With PGDURABLE_SCREENSHOTS=DIR they save a screenshot of each view there
(docs/images/ holds the ones docs/dashboard.md shows).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import python_steps_for_tests  # noqa: F401  (the Python steps the worker has)
import uvicorn
from conftest import Role, RoleFactory, ThreadWorker, quote

from pgdurable.dashboard.app import DashboardConfig
from pgdurable.dashboard.server import make_server
from pgdurable.embedded import EmbeddedPostgres, free_port
from pgdurable.python_steps import registered

CHROMIUM = "/usr/bin/chromium"
# As root in a container, without a network: no sandbox, and no background connections.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not os.path.exists(CHROMIUM):
    if os.environ.get("PGDURABLE_REQUIRE_BROWSER"):
        raise RuntimeError(f"{CHROMIUM} is missing and PGDURABLE_REQUIRE_BROWSER is set")
    pytest.skip(f"{CHROMIUM} is not installed", allow_module_level=True)

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Served:
    """A dashboard served over real HTTP in a thread of the test process."""

    def __init__(self, dsn: str):
        self.port = free_port()
        config = DashboardConfig(dsn, refresh_seconds=0.3)
        self.server: uvicorn.Server = make_server(config, "127.0.0.1", self.port)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the dashboard did not start"
            time.sleep(0.05)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture
def site(
    cluster: EmbeddedPostgres,
    dbname: str,
    dsn: str,
    conn: psycopg.Connection[Any],
    make_role: RoleFactory,
) -> Iterator[tuple[Role, Served]]:
    """A role with a schema of its own, a worker, and the dashboard as that role."""
    role = make_role()
    conn.execute(f"CREATE SCHEMA {quote(role.name)} AUTHORIZATION {quote(role.name)}")
    worker = ThreadWorker(dsn, concurrency=4, steps=registered())
    served = Served(cluster.dsn(dbname, user=role.name))
    try:
        yield role, served
    finally:
        served.stop()
        worker.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    yield tab
    context.close()


def start(role: Role, graph: str, label: str | None = None) -> str:
    row = role.conn.execute(f"SELECT df.start({graph}, %s)", (label,)).fetchone()
    assert row is not None
    return str(row[0])


def status(role: Role, instance: str) -> str:
    row = role.conn.execute("SELECT df.status(%s)", (instance,)).fetchone()
    assert row is not None
    return str(row[0])


def screenshot(page: Page, name: str) -> None:
    folder = os.environ.get("PGDURABLE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"dashboard-{name}.png"), full_page=True)


def test_a_running_instance_page_shows_it_complete(site: tuple[Role, Served], page: Page) -> None:
    role, served = site
    instance = start(
        role,
        "'SELECT pg_sleep(1.5)' ~> ('SELECT 1 AS a' & 'SELECT 2 AS b') ~> 'SELECT 3 AS c'",
        "live",
    )
    page.goto(served.url(f"/instances/{instance}"))
    badge = page.locator("#instance-status")
    expect(badge).to_have_text("running", timeout=10_000)
    screenshot(page, "instance-running")
    # No reload: the page refreshes itself until the instance is done.
    expect(badge).to_have_text("completed", timeout=20_000)
    expect(page.locator("pre.output")).to_contain_text('"c": 3')
    expect(page.locator(".timeline")).to_be_visible()
    expect(page.locator("pre.explain")).to_contain_text("✓")


def test_cancel_through_the_page(site: tuple[Role, Served], page: Page) -> None:
    role, served = site
    instance = start(role, "df.wait_for_signal('never') ~> 'SELECT 1'", "to-cancel")
    page.goto(served.url(f"/instances/{instance}"))
    expect(page.locator("#instance-status")).to_have_text("running", timeout=10_000)
    dialogs: list[str] = []

    def accept(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    page.click("#cancel")
    expect(page.locator("#instance-status")).to_have_text("cancelled", timeout=10_000)
    assert dialogs == ["Cancel this instance?"]
    assert status(role, instance) == "cancelled"
    expect(page.locator(".flash.ok")).to_contain_text(f"Instance {instance} cancelled")


def test_signal_through_the_page(site: tuple[Role, Served], page: Page) -> None:
    role, served = site
    instance = start(
        role,
        "df.wait_for_signal('approve') |=> 'answer'"
        " ~> 'SELECT $answer.data::jsonb ->> ''by'' AS approver'",
        "approval",
    )
    page.goto(served.url(f"/instances/{instance}"))
    expect(page.locator(".signals")).to_contain_text("awaited", timeout=10_000)
    screenshot(page, "instance-waiting")
    page.fill("input[name=name]", "approve")
    page.fill("textarea[name=data]", "{not json")
    page.click("#send-signal")
    # Refused in the page: nothing was sent.
    expect(page.locator(".json-error")).to_contain_text("Not JSON")
    assert status(role, instance) == "running"
    page.fill("textarea[name=data]", '{"by": "ops"}')
    page.click("#send-signal")
    expect(page.locator(".flash.ok")).to_contain_text("Signal 'approve' sent.")
    expect(page.locator("#instance-status")).to_have_text("completed", timeout=20_000)
    expect(page.locator("pre.output")).to_contain_text('"approver": "ops"')


def test_every_view_renders(
    site: tuple[Role, Served], page: Page, conn: psycopg.Connection[Any]
) -> None:
    role, served = site
    conn.execute("SELECT df.grant_usage(%s, with_grant => true)", (role.name,))
    role.conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, total int)")
    for n in range(6):
        start(
            role,
            f"'INSERT INTO orders (total) VALUES ({n}) RETURNING id' |=> 'o'"
            " ~> ('SELECT pg_sleep(0.2)' & df.retry('SELECT $o.id AS id', 3, 0.1))"
            " ~> df.if('SELECT $o.id > 2', 'SELECT ''big''', 'SELECT ''small''')",
            "orders",
        )
    failed = start(
        role,
        "'SELECT 1 AS ok' |=> 'first'"
        " ~> ('SELECT pg_sleep(0.3)' & df.retry('SELECT 1/0', 2, 0.1)) ~> 'SELECT 2'",
        "broken",
    )
    start(role, "df.loop(df.wait_for_schedule('*/5 * * * *') ~> 'SELECT now()')", "every-5")
    start(role, "df.wait_for_signal('approve', 3600)", "approval")
    deadline = time.monotonic() + 20
    while status(role, failed) != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.5)

    page.goto(served.url("/"))
    expect(page.locator(".count.status-failed .n")).to_have_text("1")
    screenshot(page, "overview")
    page.goto(served.url("/instances"))
    expect(page.locator("table.instances")).to_contain_text("orders")
    screenshot(page, "instances")
    page.goto(served.url(f"/instances/{failed}"))
    expect(page.locator("pre.output")).to_contain_text("division by zero")
    expect(page.locator(".diagram")).to_contain_text("attempt 2 of 2")
    screenshot(page, "instance-failed")
    page.goto(served.url("/instances?label=orders"))
    page.locator("table.instances a.mono").first.click()
    expect(page.locator("#instance-status")).to_have_text("completed")
    expect(page.locator(".diagram g.untaken").first).to_be_attached()
    screenshot(page, "instance-completed")
    start(role, "'SELECT pg_sleep(5)'", "slow")
    page.goto(served.url("/workers"))
    expect(page.locator("table.workers")).to_contain_text("util.echo")
    deadline = time.monotonic() + 10
    while not page.locator("table.tasks").count():  # the page does not refresh by itself
        assert time.monotonic() < deadline, "the slow step never showed on the workers page"
        time.sleep(0.2)
        page.reload()
    screenshot(page, "workers")
    page.goto(served.url("/schedules"))
    expect(page.locator("table.schedules")).to_contain_text("*/5 * * * *")
    screenshot(page, "schedules")
    # Bulk cancel: tick all, confirm.
    page.goto(served.url("/instances?status=running"))
    page.on("dialog", lambda d: d.accept())
    page.check("input.select-all")
    page.click("text=Cancel selected")
    expect(page.locator(".flash.ok")).to_contain_text("Cancel requested for 3 instance(s).")
