"""The web dashboard over HTTP: every page and action, row-level security, CSRF, login, bad
input. Real PostgreSQL, the real app (Starlette's test client speaks ASGI to it directly)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import python_steps_for_tests  # noqa: F401  (registers the steps the workers have)
from conftest import Role, RoleFactory, ThreadWorker, quote
from starlette.testclient import TestClient

from pgdurable.dashboard.app import DashboardConfig, create_app
from pgdurable.dashboard.sessions import COOKIE
from pgdurable.embedded import EmbeddedPostgres
from pgdurable.python_steps import registered

BASE = "http://127.0.0.1"


def client_for(dsn: str, **options: Any) -> TestClient:
    """A test client of a dashboard on ``dsn`` (its lifespan runs on __enter__)."""
    return TestClient(create_app(DashboardConfig(dsn, **options)), base_url=BASE)


@pytest.fixture
def tenants(
    cluster: EmbeddedPostgres, dbname: str, make_role: RoleFactory
) -> Iterator[tuple[Role, Role, TestClient, TestClient]]:
    """Two roles, and a dashboard connected as each."""
    a, b = make_role(), make_role()
    with (
        client_for(cluster.dsn(dbname, user=a.name)) as web_a,
        client_for(cluster.dsn(dbname, user=b.name)) as web_b,
    ):
        yield a, b, web_a, web_b


def start(role: Role, graph: str, label: str | None = None) -> str:
    row = role.conn.execute(f"SELECT df.start({graph}, %s)", (label,)).fetchone()
    assert row is not None
    return str(row[0])


def csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "no CSRF token on the page"
    return found.group(1)


def status(role: Role, instance: str) -> str:
    row = role.conn.execute("SELECT df.status(%s)", (instance,)).fetchone()
    assert row is not None
    return str(row[0])


def wait(role: Role, instance: str, timeout: int = 30) -> str:
    row = role.conn.execute("SELECT df.await_instance(%s, %s)", (instance, timeout)).fetchone()
    assert row is not None
    return str(row[0])


# -- pages and row-level security --------------------------------------------------------------


def test_each_tenant_sees_only_its_own_instances(tenants: Any) -> None:
    a, b, web_a, web_b = tenants
    mine = start(a, "'SELECT 1'", "a-label")
    theirs = start(b, "'SELECT 2'", "b-label")

    overview = web_a.get("/")
    assert overview.status_code == 200
    assert re.search(r'class="n">1</span><span class="what">pending', overview.text)

    listing = web_a.get("/instances").text
    assert mine in listing and "a-label" in listing
    assert theirs not in listing and "b-label" not in listing

    assert web_a.get(f"/instances/{mine}").status_code == 200
    page = web_a.get(f"/instances/{theirs}")
    assert page.status_code == 404 and "not found" in page.text
    assert "SELECT 2" not in page.text
    # B's instance through every other door: the live fragment, and each action.
    assert web_a.get(f"/instances/{theirs}?partial=1").status_code == 404
    token = csrf(web_a.get("/instances").text)
    for action in ("cancel", "restart", "signal"):
        answer = web_a.post(
            f"/instances/{theirs}/{action}", data={"csrf": token, "name": "x", "data": "{}"}
        )
        assert answer.status_code == 404, action
    assert status(b, theirs) == "pending"
    web_a.post("/instances/cancel", data={"csrf": token, "ids": [theirs]})
    assert status(b, theirs) == "pending"
    assert mine not in web_b.get("/instances").text


def test_unknown_and_malformed_ids_are_not_found(tenants: Any) -> None:
    _, _, web, _ = tenants
    assert web.get("/instances/0badc0de").status_code == 404
    for bad in ("nothex!!", "ABCDEF12", "1234567", "'%20OR%201=1"):
        assert web.get(f"/instances/{bad}").status_code == 404
    # The id box goes to the instance's page.
    found = web.get("/instances", params={"id": " 0BADC0DE "}, follow_redirects=False)
    assert found.status_code == 303 and found.headers["location"] == "/instances/0badc0de"


def test_instance_page_shows_graph_steps_results_and_explain(tenants: Any, dsn: str) -> None:
    a, _, web, _ = tenants
    worker = ThreadWorker(dsn, concurrency=2)
    try:
        done = start(a, "'SELECT 41 + 1 AS answer' |=> 'x' ~> 'SELECT $x.answer AS again'", "two")
        failed = start(a, "'SELECT 1/0'", "boom")
        assert wait(a, done) == "completed"
        assert wait(a, failed) == "failed"
    finally:
        worker.stop()
    page = web.get(f"/instances/{done}").text
    assert "SELECT 41 + 1 AS answer" in page and "&#34;again&#34;: 42" in page
    assert 'id="instance-status">completed' in page
    assert "data-final" in page  # a finished instance is not refreshed
    assert "Explain" in page and "✓" in page
    assert 'class="timeline"' in page
    failing = web.get(f"/instances/{failed}").text
    assert "division by zero" in failing
    # The live fragment: the same content without the page around it.
    fragment = web.get(f"/instances/{done}?partial=1").text
    assert "<html" not in fragment and "SELECT 41 + 1" in fragment


def test_huge_results_are_shown_cut(tenants: Any, dsn: str) -> None:
    a, _, web, _ = tenants
    worker = ThreadWorker(dsn, concurrency=1)
    try:
        big = start(a, "'SELECT repeat(''x'', 200000) AS big'")
        assert wait(a, big) == "completed"
    finally:
        worker.stop()
    page = web.get(f"/instances/{big}")
    assert page.status_code == 200
    assert len(page.text) < 60_000
    assert re.search(r"cut: 4,000 of 2\d\d,\d\d\d characters shown", page.text)


def test_hostile_text_is_escaped(tenants: Any) -> None:
    a, _, web, _ = tenants
    evil = "<script>alert(1)</script>"
    instance = start(a, f"'SELECT ''{evil}'''", evil)
    for path in ("/instances", f"/instances/{instance}", "/"):
        text = web.get(path).text
        assert evil not in text, path
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in web.get(f"/instances/{instance}").text


def test_instances_filters_and_keyset_pages(tenants: Any) -> None:
    a, _, web, _ = tenants
    ids = [start(a, "'SELECT 1'", "many") for _ in range(55)]
    other = start(a, "'SELECT 1'", "other")
    first = web.get("/instances", params={"label": "many"}).text
    shown = set(re.findall(r'href="/instances/([0-9a-f]{8})"', first))
    assert len(shown) == 50 and shown <= set(ids) and other not in shown
    next_url = re.search(r'href="(/instances\?[^"]+)" rel="next"', first)
    assert next_url
    second = web.get(next_url.group(1).replace("&amp;", "&")).text
    rest = set(re.findall(r'href="/instances/([0-9a-f]{8})"', second))
    assert rest | shown == set(ids) and not rest & shown
    assert 'rel="next"' not in second

    # Status: none of them is failed.
    assert not re.findall(
        r'href="/instances/([0-9a-f]{8})"', web.get("/instances", params={"status": "failed"}).text
    )
    # Time range: created in the future finds nothing; up to now finds them all.
    future = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")
    past = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")
    assert not re.findall(
        r'href="/instances/([0-9a-f]{8})"', web.get("/instances", params={"from": future}).text
    )
    upto = web.get("/instances", params={"label": "other", "from": past, "to": future}).text
    assert re.findall(r'href="/instances/([0-9a-f]{8})"', upto) == [other]
    assert not re.findall(
        r'href="/instances/([0-9a-f]{8})"', web.get("/instances", params={"to": past}).text
    )
    # Bad filters are said, not raised.
    bad = web.get("/instances", params={"status": "nope", "from": "yesterday"})
    assert bad.status_code == 200 and "Unknown status" in bad.text and "not a date" in bad.text
    assert "invalid after_cursor" in web.get("/instances", params={"after": "zz"}).text
    # The refreshed fragment is the table alone.
    fragment = web.get("/instances", params={"label": "other", "partial": "1"}).text
    assert "<html" not in fragment and other in fragment


# -- actions -----------------------------------------------------------------------------------


def test_cancel_needs_the_csrf_token(tenants: Any) -> None:
    a, _, web, _ = tenants
    instance = start(a, "'SELECT 1'")
    page = web.get(f"/instances/{instance}").text
    for data in ({}, {"csrf": "forged"}, {"csrf": ""}):
        refused = web.post(f"/instances/{instance}/cancel", data=data, follow_redirects=False)
        assert refused.status_code == 403
    assert status(a, instance) == "pending"
    # Another visitor's token is not this visitor's.
    other = TestClient(web.app, base_url=BASE)
    other.get("/")
    stolen = other.post(f"/instances/{instance}/cancel", data={"csrf": csrf(page)})
    assert stolen.status_code == 403 and status(a, instance) == "pending"

    done = web.post(
        f"/instances/{instance}/cancel", data={"csrf": csrf(page)}, follow_redirects=False
    )
    assert done.status_code == 303 and done.headers["location"] == f"/instances/{instance}"
    assert status(a, instance) == "cancelled"
    assert "cancelled" in web.get(done.headers["location"]).text


def test_signal_checks_its_json_and_is_delivered(tenants: Any, dsn: str) -> None:
    a, _, web, _ = tenants
    worker = ThreadWorker(dsn, concurrency=2)
    try:
        instance = start(
            a, "df.wait_for_signal('approve') |=> 'ok' ~> 'SELECT $ok.data::jsonb ->> ''by'' AS by'"
        )
        page = web.get(f"/instances/{instance}").text
        token = csrf(page)
        bad = web.post(
            f"/instances/{instance}/signal",
            data={"csrf": token, "name": "approve", "data": "{not json"},
        )
        assert "not JSON" in bad.text
        assert status(a, instance) in ("pending", "running")
        nameless = web.post(f"/instances/{instance}/signal", data={"csrf": token, "data": "1"})
        assert "needs a name" in nameless.text
        sent = web.post(
            f"/instances/{instance}/signal",
            data={"csrf": token, "name": "approve", "data": '{"by": "ops"}'},
        )
        assert "Signal &#39;approve&#39; sent." in sent.text
        assert wait(a, instance) == "completed"
        row = a.conn.execute("SELECT df.result(%s)::jsonb", (instance,)).fetchone()
        assert row and row[0]["rows"] == [{"by": "ops"}]
        assert "received" in web.get(f"/instances/{instance}").text
        # A finished instance takes no more signals: the error is said on the page.
        late = web.post(
            f"/instances/{instance}/signal", data={"csrf": token, "name": "approve", "data": "1"}
        )
        assert late.status_code == 200 and 'class="flash error"' in late.text
    finally:
        worker.stop()


def test_bulk_cancel_of_a_selection(tenants: Any) -> None:
    a, b, web, _ = tenants
    ids = [start(a, "'SELECT 1'", "bulk") for _ in range(5)]
    theirs = start(b, "'SELECT 1'")
    token = csrf(web.get("/instances").text)
    answer = web.post(
        "/instances/cancel",
        data={"csrf": token, "ids": [*ids[:3], theirs, "bogus"], "back": "/instances?label=bulk"},
        follow_redirects=False,
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/instances?label=bulk"
    assert [status(a, i) for i in ids] == ["cancelled"] * 3 + ["pending"] * 2
    assert status(b, theirs) == "pending"
    shown = web.get(answer.headers["location"]).text
    assert "Cancel requested for 3 instance(s)." in shown and "Not found" in shown
    # A redirect never leaves the site.
    away = web.post(
        "/instances/cancel",
        data={"csrf": token, "ids": [ids[3]], "back": "//evil.example/x"},
        follow_redirects=False,
    )
    assert away.headers["location"] == "/instances"
    nothing = web.post("/instances/cancel", data={"csrf": token})
    assert nothing.status_code == 200 and "No instance was selected" in nothing.text


# -- workers and schedules ---------------------------------------------------------------------


def test_workers_appear_only_where_granted(
    tenants: Any, dsn: str, conn: psycopg.Connection[Any]
) -> None:
    a, _, web, _ = tenants
    worker = ThreadWorker(dsn, concurrency=3, steps=registered())
    try:
        page = web.get("/workers").text
        assert "may not see them" in page and "util.echo" not in page
        conn.execute("SELECT df.grant_usage(%s, with_grant => true)", (a.name,))
        for _ in range(100):  # the worker writes its row once it has started
            page = web.get("/workers").text
            if "util.echo" in page:
                break
            time.sleep(0.1)
        assert "may not see them" not in page
        assert "util.echo" in page and "/ 3" in page and ">yes<" in page
        metrics = web.get("/").text
        assert "All roles (df.metrics)" in metrics
    finally:
        worker.stop()


def test_python_steps_waiting_for_a_worker_are_listed(
    tenants: Any, dsn: str, conn: psycopg.Connection[Any]
) -> None:
    a, _, web, _ = tenants
    conn.execute("SELECT df.grant_call(%s, '*')", (a.name,))
    worker = ThreadWorker(dsn, concurrency=1)  # has no Python step at all
    try:
        instance = start(a, "df.call('nobody.has.this', '{}')")
        for _ in range(100):
            page = web.get("/workers").text
            if instance in page:
                break
            time.sleep(0.1)
        assert instance in page and "nobody.has.this" in page
    finally:
        worker.stop()


def test_schedules_show_the_next_tick(tenants: Any, dsn: str) -> None:
    a, _, web, _ = tenants
    worker = ThreadWorker(dsn, concurrency=1)
    try:
        instance = start(a, "df.wait_for_schedule('*/5 * * * *')", "every-five")
        for _ in range(100):
            page = web.get("/schedules").text
            if instance in page:
                break
            time.sleep(0.1)
        assert instance in page and "every-five" in page and "*/5 * * * *" in page
        ticks = re.findall(r"(\d{4}-\d\d-\d\d \d\d:(\d\d):00)", page)
        assert ticks and int(ticks[-1][1]) % 5 == 0
    finally:
        worker.stop()


# -- login, sessions and headers ---------------------------------------------------------------


@pytest.fixture
def password_auth(cluster: EmbeddedPostgres) -> Iterator[str]:
    """Roles named dashpw_* must give their password (the test cluster trusts everyone
    else); yields the prefix."""
    hba = cluster.data_dir / "pg_hba.conf"
    before = hba.read_text()
    hba.write_text(
        "local all /^dashpw_ scram-sha-256\nhost all /^dashpw_ all scram-sha-256\n" + before
    )
    with psycopg.connect(cluster.dsn(), autocommit=True) as su:
        su.execute("SELECT pg_reload_conf()")
    try:
        yield "dashpw_"
    finally:
        hba.write_text(before)
        with psycopg.connect(cluster.dsn(), autocommit=True) as su:
            su.execute("SELECT pg_reload_conf()")


def test_login_with_a_role_and_password(
    cluster: EmbeddedPostgres,
    dbname: str,
    conn: psycopg.Connection[Any],
    password_auth: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    roles = []
    for who in ("a", "b"):
        name = f"{password_auth}{who}_{dbname}"
        conn.execute(f"CREATE ROLE {quote(name)} LOGIN PASSWORD 'secret-{name}'")
        conn.execute("SELECT df.grant_usage(%s)", (name,))
        session = psycopg.connect(
            cluster.dsn(dbname, user=name), password=f"secret-{name}", autocommit=True
        )
        roles.append(Role(name, session))
    a, b = roles
    theirs = start(b, "'SELECT 1'", "b-only")
    mine = start(a, "'SELECT 1'", "a-only")
    # The DSN names a role with no rights at all: with --login only its host and database count.
    with client_for(cluster.dsn(dbname, user="nobody_at_all"), login=True) as web:
        first = web.get("/", follow_redirects=False)
        assert first.status_code == 303 and first.headers["location"].startswith("/login")
        assert web.get("/instances/" + mine, follow_redirects=False).status_code == 303
        form = web.get("/login?next=/instances").text
        token = csrf(form)
        wrong = web.post(
            "/login", data={"csrf": token, "role": a.name, "password": "nope", "next": "/"}
        )
        assert "Login failed" in wrong.text and "secret" not in wrong.text
        # No password, whatever the dashboard's own password file holds; and no role that
        # the server would let in without one (the test cluster trusts every other role).
        passfile = tmp_path / "pgpass"
        passfile.write_text(f"*:*:*:{a.name}:secret-{a.name}\n")
        passfile.chmod(0o600)
        monkeypatch.setenv("PGPASSFILE", str(passfile))
        for role, password in ((a.name, ""), ("", ""), ("postgres", "anything")):
            refused = web.post(
                "/login", data={"csrf": token, "role": role, "password": password, "next": "/"}
            )
            assert "Login failed" in refused.text, (role, password)
            assert web.get("/", follow_redirects=False).status_code == 303
        assert web.get("/", follow_redirects=False).status_code == 303
        before = web.cookies.get(COOKIE)
        ok = web.post(
            "/login",
            data={
                "csrf": token,
                "role": a.name,
                "password": f"secret-{a.name}",
                "next": "/instances",
            },
            follow_redirects=False,
        )
        assert ok.status_code == 303 and ok.headers["location"] == "/instances"
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        assert "secret" not in cookie and web.cookies.get(COOKIE) != before
        listing = web.get("/instances").text
        assert mine in listing and theirs not in listing and a.name in listing
        # Logged out (or expired), a refresh gets 401, not the login page to paste in.
        web.cookies.clear()
        assert web.get("/instances?partial=1", follow_redirects=False).status_code == 401
        back = web.get("/instances?label=a-only", follow_redirects=False)
        assert back.headers["location"] == "/login?next=%2Finstances%3Flabel%3Da-only"
        web.cookies.set(COOKIE, ok.cookies[COOKIE])
        assert web.get(f"/instances/{theirs}").status_code == 404
        logout = web.post("/logout", data={"csrf": csrf(listing)}, follow_redirects=False)
        assert logout.status_code == 303
        assert web.get("/instances", follow_redirects=False).status_code == 303
    for role in roles:
        role.conn.close()
        conn.execute(f"DROP OWNED BY {quote(role.name)}")
        conn.execute(f"DROP ROLE {quote(role.name)}")


def test_hosts_headers_and_static_files(tenants: Any) -> None:
    _, _, web, _ = tenants
    page = web.get("/")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"
    # DNS rebinding: a page of another site that resolves its name to 127.0.0.1.
    assert web.get("/", headers={"host": "evil.example"}).status_code == 400
    assert web.get("/", headers={"host": "localhost:8787"}).status_code == 200
    assert "startRefresh" in web.get("/static/dashboard.js").text
    assert web.get("/static/../app.py").status_code == 404
    # Every page renders.
    for path in (
        "/",
        "/?window=1h",
        "/?window=7d",
        "/?window=bogus",
        "/instances",
        "/workers",
        "/schedules",
        "/login",
    ):
        assert web.get(path).status_code == 200, path
    assert "nothing to log in to" in web.get("/login").text


def test_restart_from_the_page(tenants: Any, dsn: str, conn: psycopg.Connection[Any]) -> None:
    a, _, web, web_b = tenants
    conn.execute("CREATE TABLE public.gate (open boolean)")
    conn.execute("GRANT SELECT ON public.gate TO PUBLIC")
    worker = ThreadWorker(dsn, concurrency=2)
    try:
        instance = start(
            a,
            "'SELECT 7 AS seven' |=> 's'"
            " ~> 'SELECT $s.seven / (SELECT count(*)::int FROM gate) AS x'",
        )
        assert wait(a, instance) == "failed"
        page = web.get(f"/instances/{instance}").text
        assert 'id="restart"' in page
        # Not for B, and not without the token.
        assert web_b.get(f"/instances/{instance}").status_code == 404
        token_b = csrf(web_b.get("/instances").text)
        assert (
            web_b.post(f"/instances/{instance}/restart", data={"csrf": token_b}).status_code == 404
        )
        assert web.post(f"/instances/{instance}/restart", data={}).status_code == 403
        assert status(a, instance) == "failed"

        conn.execute("INSERT INTO public.gate VALUES (true)")
        done = web.post(f"/instances/{instance}/restart", data={"csrf": csrf(page)})
        assert done.status_code == 200 and 'class="flash ok"' in done.text
        assert wait(a, instance) == "completed"
        row = a.conn.execute("SELECT df.result(%s)::jsonb", (instance,)).fetchone()
        assert row and row[0]["rows"] == [{"x": 7}]
        after = web.get(f"/instances/{instance}").text
        assert 'id="restart"' not in after and "Failed" in after  # the ended run, in executions
        # A completed instance cannot restart: the error is said on the page.
        again = web.post(f"/instances/{instance}/restart", data={"csrf": csrf(page)})
        assert 'class="flash error"' in again.text and "only a failed or cancelled" in again.text
    finally:
        worker.stop()


def test_bad_input_gets_a_page_not_a_crash(tenants: Any, dsn: str) -> None:
    a, _, web, _ = tenants
    worker = ThreadWorker(dsn, concurrency=2)
    try:
        blank = start(a, "df.sql(repeat(' ', 5000) || 'SELECT 1 AS one')")
        done = start(a, "'SELECT 1'")
        assert wait(a, blank) == "completed" and wait(a, done) == "completed"
    finally:
        worker.stop()
    assert web.get(f"/instances/{blank}").status_code == 200
    for params in ({"label": "a\x00b"}, {"after": "\x00"}, {"status": "\x00"}):
        page = web.get("/instances", params=params)
        assert page.status_code == 200 and "NUL" in page.text, params
    pending = start(a, "'SELECT 1'")
    page = web.get(f"/instances/{pending}").text
    token = csrf(page)
    deep = web.post(
        f"/instances/{pending}/signal",
        data={"csrf": token, "name": "x", "data": "[" * 5000 + "]" * 5000},
    )
    assert deep.status_code == 200 and "not JSON" in deep.text
    # Cancelling what already finished says so, alone or in a selection.
    finished = web.post(f"/instances/{done}/cancel", data={"csrf": token})
    assert "is already completed" in finished.text and status(a, done) == "completed"
    bulk = web.post("/instances/cancel", data={"csrf": token, "ids": [done, pending]})
    assert "Cancel requested for 1 instance(s)." in bulk.text
    assert f"Already finished: {done}" in bulk.text
    # Messages do not pile up in a session that never shows a page.
    for _ in range(30):
        web.post(f"/instances/{done}/cancel", data={"csrf": token}, follow_redirects=False)
    assert web.get("/").text.count('class="flash error"') == 10


def test_anonymous_visitors_cannot_push_out_logged_in_sessions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pgdurable.dashboard import sessions as sessions_module

    monkeypatch.setattr(sessions_module, "MAX_SESSIONS", 50)
    store = sessions_module.Sessions()
    logged_in = [store.log_in(store.new(), f"role{n}", "pw") for n in range(10)]
    for _ in range(500):
        store.new()
    assert all(store.get(s.id) is s for s in logged_in)


def test_a_loopback_alias_and_extra_names_are_answered() -> None:
    from pgdurable.dashboard.server import allowed_hosts

    alias = allowed_hosts("127.0.0.2")
    assert alias is not None and "127.0.0.2" in alias and "localhost" in alias
    assert allowed_hosts("127.0.0.1", ("dash.example.com",)) == (
        "127.0.0.1",
        "localhost",
        "::1",
        "[::1]",
        "dash.example.com",
    )
    assert allowed_hosts("0.0.0.0") is None
    assert allowed_hosts("0.0.0.0", ("dash.example.com",)) == ("dash.example.com",)
