"""The dashboard's web app: a small Starlette app, rendered on the server with Jinja2.

Pages: the overview (``/``), the instances (``/instances``), one instance
(``/instances/{id}``), the workers (``/workers``) and the schedules (``/schedules``); actions
are POSTed forms (cancel, signal, restart, bulk cancel), each checked against the session's
CSRF token, that answer with a redirect back to the page (post/redirect/get). Pages that
change by themselves (the instances, a running instance) are refreshed by a few lines of
JavaScript that fetch the page's ``?partial=1`` form and swap it in.

Every query runs as the dashboard's role: the DSN's, or with ``login`` the PostgreSQL role
the visitor logged in as (its password checked by PostgreSQL itself, by connecting). See
sessions.py for the cookies, and docs/dashboard.md.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import psycopg
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..core.cron import CronError, next_tick
from . import charts, diagram, queries
from .sessions import COOKIE, Session, Sessions

INSTANCE_ID = re.compile(r"^[0-9a-f]{8}$")
PAGE_SIZE = 50
MAX_BULK = 500
"""The most instances one bulk cancel takes (a page of the list is 50)."""
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
APPLICATION_NAME = "pgdurable dashboard"
STATEMENT_TIMEOUT_MS = 15_000
MAX_STEPS_SHOWN = 500
"""The most steps an instance's page lists (and draws on its timeline)."""
MISSING_SCHEMA = (
    psycopg.errors.InvalidSchemaName,
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedFunction,
)

# Sent with every page: no script but the dashboard's own file, no framing, no referrer.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; "
    "form-action 'self'; base-uri 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


@dataclass(frozen=True)
class DashboardConfig:
    """How the dashboard connects and who may use it.

    ``dsn`` names the database; without ``login`` every query runs as its role. With
    ``login`` visitors log in with a PostgreSQL role and password, and the DSN's user and
    password are not used. ``allowed_hosts`` are the Host headers the app answers (a guard
    against DNS rebinding; None: any). ``refresh_seconds`` is how often live pages refresh.
    """

    dsn: str
    login: bool = False
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS
    refresh_seconds: float = 2.0


class Problem(Exception):
    """An error page: an HTTP status and a message for the visitor."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def create_app(config: DashboardConfig) -> Starlette:
    """The dashboard as an ASGI app."""
    return Dashboard(config).app


class Dashboard:
    """The app and what its handlers share: the configuration, the sessions, the pool of
    connections as the DSN's role, and the templates."""

    def __init__(self, config: DashboardConfig):
        self.config = config
        self.sessions = Sessions()
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        self.templates = Environment(
            loader=PackageLoader("pgdurable.dashboard", "templates"),
            autoescape=select_autoescape(default=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters.update(when=_when, took=_took, pretty=_pretty, cut=_cut_note)
        static = resources.files("pgdurable.dashboard") / "static"
        routes = [
            Route("/", self.overview),
            Route("/instances", self.instances),
            Route("/instances/cancel", self.bulk_cancel, methods=["POST"]),
            Route("/instances/{instance_id}", self.instance),
            Route("/instances/{instance_id}/cancel", self.cancel, methods=["POST"]),
            Route("/instances/{instance_id}/signal", self.signal, methods=["POST"]),
            Route("/instances/{instance_id}/restart", self.restart, methods=["POST"]),
            Route("/workers", self.workers),
            Route("/schedules", self.schedules),
            Route("/login", self.login_page),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Mount("/static", StaticFiles(directory=str(static)), name="static"),
        ]
        middleware = []
        if config.allowed_hosts is not None:
            middleware.append(
                Middleware(TrustedHostMiddleware, allowed_hosts=list(config.allowed_hosts))
            )
        middleware.append(Middleware(_SecurityHeaders))
        self.app = Starlette(routes=routes, middleware=middleware, lifespan=self._lifespan)

    @asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if not self.config.login:
            self.pool = AsyncConnectionPool(
                self.config.dsn,
                min_size=1,
                max_size=4,
                kwargs={"autocommit": True, "application_name": APPLICATION_NAME},
                configure=_configure,
                # A database that is down gets its error page in seconds, not after 30.
                timeout=5,
                open=False,
            )
            await self.pool.open()
        try:
            yield
        finally:
            if self.pool is not None:
                await self.pool.close()
                self.pool = None

    # -- plumbing ------------------------------------------------------------------------------

    @asynccontextmanager
    async def _connect(self, session: Session) -> AsyncIterator[queries.Conn]:
        """A connection as the dashboard's role for this visitor."""
        if self.pool is not None:
            async with self.pool.connection() as conn:
                yield conn
            return
        if session.role is None or session.password is None:
            raise Problem(401, "Log in first.")
        conn = await psycopg.AsyncConnection.connect(
            login_conninfo(self.config.dsn, session.role, session.password), autocommit=True
        )
        async with conn:
            await _configure(conn)
            yield conn

    def _session(self, request: Request) -> tuple[Session, bool]:
        """The visitor's session, and whether it is new (its cookie must be set)."""
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is not None:
            return session, False
        return self.sessions.new(), True

    def _render(
        self, request: Request, session: Session, name: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        template = self.templates.get_template(name)
        html = template.render(
            request=request,
            session=session,
            login=self.config.login,
            version=__version__,
            refresh_ms=int(self.config.refresh_seconds * 1000),
            text_limit=queries.TEXT_LIMIT,
            flash=session.take_flash() if not context.get("partial") else [],
            **context,
        )
        return HTMLResponse(html, status_code=status)

    async def _page(
        self,
        request: Request,
        handler: Callable[[Request, Session, queries.Conn], Awaitable[Response]],
    ) -> Response:
        """Run a page's handler with the visitor's session and connection, turning the
        failures a visitor can cause into error pages."""
        session, new = self._session(request)
        if self.config.login and session.role is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            response: Response = RedirectResponse(
                "/login?" + urlencode({"next": target}), status_code=303
            )
            if request.query_params.get("partial") == "1":  # a refresh: no login page in it
                response = Response("Log in again.", status_code=401)
        else:
            try:
                async with self._connect(session) as conn:
                    response = await handler(request, session, conn)
            except Problem as exc:
                response = self._error(request, session, exc.status, exc.message)
            except psycopg.errors.InsufficientPrivilege as exc:
                response = self._error(request, session, 403, _db_message(exc))
            except psycopg.Error as exc:
                response = self._database_error(request, session, exc)
        if new:
            _set_cookie(request, response, session)
        return response

    def _database_error(self, request: Request, session: Session, exc: psycopg.Error) -> Response:
        """A page for a database error no handler expected: 503 when the database is
        unreachable or has no df schema, else 500; the server's message either way."""
        if isinstance(exc, MISSING_SCHEMA):
            return self._error(
                request,
                session,
                503,
                f"This database has no pgdurable schema ({_db_message(exc)}): "
                "run `pgdurable install` on it.",
            )
        status = 503 if isinstance(exc, psycopg.OperationalError) else 500
        return self._error(request, session, status, _db_message(exc))

    async def _action(
        self,
        request: Request,
        handler: Callable[[Request, Session, queries.Conn, dict[str, Any]], Awaitable[str]],
    ) -> Response:
        """Run a POSTed action: check the CSRF token, run it, and redirect to the page it
        returns (post/redirect/get), with its outcome or its error as a message there."""
        session, new = self._session(request)
        form = await request.form()
        fields = {k: form.getlist(k) if k == "ids" else form.get(k) for k in form}
        if new or not session.check_csrf(_text(fields.get("csrf"))):
            response: Response = self._error(
                request,
                session,
                403,
                "The form has expired or did not come from this page: "
                "reload the page and try again.",
            )
        elif self.config.login and session.role is None:
            response = RedirectResponse("/login", status_code=303)
        else:
            try:
                async with self._connect(session) as conn:
                    back = await handler(request, session, conn, fields)
                response = RedirectResponse(back, status_code=303)
            except Problem as exc:
                response = self._error(request, session, exc.status, exc.message)
            except psycopg.errors.InsufficientPrivilege as exc:
                response = self._error(request, session, 403, _db_message(exc))
            except psycopg.Error as exc:
                response = self._database_error(request, session, exc)
        if new:
            _set_cookie(request, response, session)
        return response

    def _error(self, request: Request, session: Session, status: int, message: str) -> Response:
        return self._render(request, session, "error.html", status=status, message=message)

    # -- overview ------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        """Counts by status, completions and failures over time, the labels that fail and
        the ones that run slowest."""
        return await self._page(request, self._overview)

    async def _overview(self, request: Request, session: Session, conn: queries.Conn) -> Response:
        window = request.query_params.get("window", "24h")
        if window not in queries.WINDOWS:
            window = "24h"
        now = datetime.now(UTC)
        since = now - queries.WINDOWS[window][0]
        bars = await queries.finished_over_time(conn, window, now)
        allowed = await queries.privileges(conn)
        return self._render(
            request,
            session,
            "overview.html",
            counts=await queries.status_counts(conn),
            window=window,
            windows=list(queries.WINDOWS),
            chart=Markup(charts.bar_chart(bars, "%H:%M" if window != "7d" else "%b %d")),
            finished=sum(b["completed"] + b["failed"] for b in bars),
            failing=await queries.failing_labels(conn, since),
            slowest=await queries.slowest_labels(conn, since),
            metrics=await queries.metrics(conn) if allowed.metrics else None,
        )

    # -- instances -----------------------------------------------------------------------------

    async def instances(self, request: Request) -> Response:
        """The instances, newest first, filtered, a page at a time."""
        return await self._page(request, self._instances)

    async def _instances(self, request: Request, session: Session, conn: queries.Conn) -> Response:
        params = request.query_params
        wanted = (params.get("id") or "").strip().lower()
        if wanted:
            return RedirectResponse(f"/instances/{_instance_path(wanted)}", status_code=303)
        filters, problems = _filters(params)
        after = (params.get("after") or None) if not problems else None
        rows: list[queries.Row] = []
        cursor = None
        if not problems:
            try:
                rows, cursor = await queries.list_instances(conn, filters, PAGE_SIZE, after)
            except psycopg.errors.InvalidParameterValue as exc:
                problems.append(_db_message(exc))
        query = {k: v for k, v in params.items() if k not in ("after", "partial") and v}
        partial = params.get("partial") == "1"
        return self._render(
            request,
            session,
            "_instance_rows.html" if partial else "instances.html",
            partial=partial,
            rows=rows,
            filters=filters,
            raw=params,
            problems=problems,
            statuses=queries.STATUSES,
            next_url=f"/instances?{urlencode({**query, 'after': cursor})}" if cursor else None,
            first_url=f"/instances?{urlencode(query)}" if after else None,
            refresh_url=f"/instances?{urlencode({**params, 'partial': '1'})}",
        )

    async def bulk_cancel(self, request: Request) -> Response:
        """Cancel the instances ticked in the list."""
        return await self._action(request, self._bulk_cancel)

    async def _bulk_cancel(
        self, request: Request, session: Session, conn: queries.Conn, form: dict[str, Any]
    ) -> str:
        ids = [i for i in form.get("ids") or [] if isinstance(i, str)]
        if not ids:
            session.say("error", "No instance was selected.")
        elif len(ids) > MAX_BULK:
            session.say("error", f"At most {MAX_BULK} instances can be cancelled at once.")
        else:
            cancelled, finished, missing = 0, [], []
            for instance_id in ids:
                before, _ = await _cancel_live(conn, instance_id)
                if before is None:
                    missing.append(instance_id)
                elif before in queries.TERMINAL:
                    finished.append(instance_id)
                else:
                    cancelled += 1
            session.say("ok", f"Cancel requested for {cancelled} instance(s).")
            if finished:
                session.say("error", f"Already finished: {', '.join(finished[:20])}")
            if missing:
                session.say("error", f"Not found: {', '.join(missing[:20])}")
        return _local(_text(form.get("back")), "/instances")

    # -- one instance --------------------------------------------------------------------------

    async def instance(self, request: Request) -> Response:
        """One instance: its graph, timeline, steps, signals and explain text."""
        return await self._page(request, self._instance)

    async def _instance(self, request: Request, session: Session, conn: queries.Conn) -> Response:
        instance_id = _instance_id(request)
        row = await queries.instance(conn, instance_id)
        if row is None:
            raise Problem(404, f"Instance {instance_id} was not found (or is another role's).")
        nodes = await queries.nodes(conn, instance_id)
        views = diagram.views(nodes)
        steps = [n for n in nodes if n["node_type"] in charts.STEP_TYPES]
        now = datetime.now(UTC)
        spans = [
            charts.Span(
                n["node_id"],
                diagram.label(views[n["node_id"]]),
                n["inferred_status"],
                n["started_at"],
                None if n["inferred_status"] == "running" else n["updated_at"],
            )
            for n in steps[:MAX_STEPS_SHOWN]
            if n["started_at"] is not None
        ]
        allowed = await queries.privileges(conn)
        terminal = row["status"] in queries.TERMINAL
        partial = request.query_params.get("partial") == "1"
        return self._render(
            request,
            session,
            "_instance_live.html" if partial else "instance.html",
            partial=partial,
            instance=row,
            terminal=terminal,
            diagram=Markup(diagram.draw(row["root_node"], views, row["generation"] or 0, now)),
            steps=steps[:MAX_STEPS_SHOWN],
            steps_left_out=max(len(steps) - MAX_STEPS_SHOWN, 0),
            awaited=[_signal(n) for n in nodes if n["node_type"] == "SIGNAL"],
            timeline=Markup(charts.timeline(spans, row["created_at"], now)) if spans else None,
            explain=await queries.explain(conn, instance_id),
            executions=await queries.executions(conn, instance_id),
            can_restart=allowed.restart and row["status"] in ("failed", "cancelled"),
            refresh_url=f"/instances/{instance_id}?partial=1",
        )

    async def cancel(self, request: Request) -> Response:
        """Cancel one instance."""
        return await self._action(request, self._cancel)

    async def _cancel(
        self, request: Request, session: Session, conn: queries.Conn, form: dict[str, Any]
    ) -> str:
        instance_id = _instance_id(request)
        before, answer = await _cancel_live(conn, instance_id)
        if before is None:
            raise Problem(404, f"Instance {instance_id} was not found (or is another role's).")
        if before in queries.TERMINAL:
            session.say("error", f"Instance {instance_id} is already {before}.")
        else:
            session.say("ok", answer)
        return f"/instances/{instance_id}"

    async def signal(self, request: Request) -> Response:
        """Send a signal, its data checked as JSON first."""
        return await self._action(request, self._signal)

    async def _signal(
        self, request: Request, session: Session, conn: queries.Conn, form: dict[str, Any]
    ) -> str:
        instance_id = _instance_id(request)
        name = (_text(form.get("name")) or "").strip()
        data = _text(form.get("data")) or ""
        if not name:
            session.say("error", "A signal needs a name.")
            return f"/instances/{instance_id}"
        try:
            json.loads(data or "null")
        except (ValueError, RecursionError) as exc:
            session.say("error", f"The signal's data is not JSON: {exc}")
            return f"/instances/{instance_id}"
        sent = queries.signal(conn, instance_id, name, data or "null")
        await _say_answer(session, sent, f"Signal {name!r} sent.")
        return f"/instances/{instance_id}"

    async def restart(self, request: Request) -> Response:
        """Restart a failed or cancelled instance from where it ended."""
        return await self._action(request, self._restart)

    async def _restart(
        self, request: Request, session: Session, conn: queries.Conn, form: dict[str, Any]
    ) -> str:
        instance_id = _instance_id(request)
        if not (await queries.privileges(conn)).restart:
            raise Problem(404, "This database's pgdurable has no df.restart: upgrade it.")
        await _say_answer(session, queries.restart(conn, instance_id))
        return f"/instances/{instance_id}"

    # -- workers and schedules -----------------------------------------------------------------

    async def workers(self, request: Request) -> Response:
        """The workers (where the role may see them) and the Python steps waiting for one."""
        return await self._page(request, self._workers)

    async def _workers(self, request: Request, session: Session, conn: queries.Conn) -> Response:
        allowed = await queries.privileges(conn)
        workers, tasks = [], []
        if allowed.workers:
            workers = await queries.workers(conn)
            tasks = await queries.worker_tasks(conn)
        held: dict[Any, list[queries.Row]] = {}
        for task in tasks:
            held.setdefault(task["worker_id"], []).append(task)
        return self._render(
            request,
            session,
            "workers.html",
            allowed=allowed.workers,
            workers=workers,
            held=held,
            waiting=await queries.waiting_calls(conn),
        )

    async def schedules(self, request: Request) -> Response:
        """The instances waiting on a cron schedule, with the next tick of each."""
        return await self._page(request, self._schedules)

    async def _schedules(self, request: Request, session: Session, conn: queries.Conn) -> Response:
        now = datetime.now(UTC)
        waits = await queries.schedule_waits(conn)
        for wait in waits:
            try:
                tick = next_tick(wait["cron"], wait["started_at"].timestamp())
                wait["next_tick"] = datetime.fromtimestamp(tick, UTC)
            except (CronError, TypeError, AttributeError):
                wait["next_tick"] = None
        return self._render(request, session, "schedules.html", waits=waits, now=now)

    # -- login ---------------------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        """The login form (with ``login``; else a note that there is nothing to log in to)."""
        session, new = self._session(request)
        response = self._render(
            request, session, "login.html", next=_local(request.query_params.get("next"), "/")
        )
        if new:
            _set_cookie(request, response, session)
        return response

    async def login(self, request: Request) -> Response:
        """Check a role and password by connecting as them; a fresh session on success."""
        session, new = self._session(request)
        form = await request.form()
        role = (_text(form.get("role")) or "").strip()
        password = _text(form.get("password")) or ""
        back = _local(_text(form.get("next")), "/")
        if new or not session.check_csrf(_text(form.get("csrf"))):
            return self._error(request, session, 403, "The form has expired: reload the page.")
        if not self.config.login:
            return RedirectResponse(back, status_code=303)
        try:
            if not role or not password:
                raise ValueError("a role and a password are both required")
            conn = await psycopg.AsyncConnection.connect(
                login_conninfo(self.config.dsn, role, password)
            )
            await conn.close()
        except (psycopg.Error, ValueError):
            # The server's message may say which of role and password was wrong; say neither.
            session.say(
                "error",
                "Login failed: unknown role or wrong password (or the database is unreachable).",
            )
            return RedirectResponse("/login?" + urlencode({"next": back}), status_code=303)
        fresh = self.sessions.log_in(session, role, password)
        response = RedirectResponse(back, status_code=303)
        _set_cookie(request, response, fresh)
        return response

    async def logout(self, request: Request) -> Response:
        """Forget the session."""
        session, new = self._session(request)
        form = await request.form()
        if new or not session.check_csrf(_text(form.get("csrf"))):
            return self._error(request, session, 403, "The form has expired: reload the page.")
        self.sessions.drop(session)
        response = RedirectResponse("/login" if self.config.login else "/", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response


class _SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


# -- helpers -----------------------------------------------------------------------------------


def login_conninfo(dsn: str, role: str, password: str) -> str:
    """The DSN's server and database, with the visitor's role and password and nothing of
    the dashboard's own credentials: no password file, service file entry, client
    certificate or Kerberos ticket, and PostgreSQL must ask for the password (a server that
    trusts the role without one refuses the login, rather than letting anyone in)."""
    params = conninfo_to_dict(dsn)
    for key in ("passfile", "service", "sslcert", "sslkey", "sslpassword"):
        params.pop(key, None)
    params.update(
        user=role,
        password=password,
        passfile=os.devnull,
        gssencmode="disable",
        require_auth="password,md5,scram-sha-256",
        application_name=APPLICATION_NAME,
    )
    params.setdefault("connect_timeout", 10)
    return make_conninfo("", **params)


async def _configure(conn: queries.Conn) -> None:
    """Every dashboard connection: a query that runs too long is cut short, rather than
    holding one of the few connections."""
    await conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")


def _set_cookie(request: Request, response: Response, session: Session) -> None:
    response.set_cookie(
        COOKIE,
        session.id,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def _instance_id(request: Request) -> str:
    instance_id = str(request.path_params["instance_id"])
    if not INSTANCE_ID.match(instance_id):
        raise Problem(404, "No instance has this id: ids are 8 lower-case hex digits.")
    return instance_id


def _instance_path(text: str) -> str:
    """``text`` as a path segment: an id as it is, anything else made harmless (the page
    then says it is not an id)."""
    return text if INSTANCE_ID.match(text) else re.sub(r"[^0-9a-zA-Z_-]", "_", text)[:40]


def _filters(params: Any) -> tuple[queries.Filters, list[str]]:
    problems: list[str] = []
    if any("\x00" in value for value in params.values()):
        problems.append("A filter holds a NUL character.")
        return queries.Filters(), problems
    status = params.get("status") or None
    if status is not None and status not in queries.STATUSES:
        problems.append(f"Unknown status {status!r}.")
    moments: list[datetime | None] = []
    for key in ("from", "to"):
        text = params.get(key) or ""
        try:
            moment = datetime.fromisoformat(text) if text else None
        except ValueError:
            problems.append(f"{key!r} is not a date and time: {text!r}.")
            moment = None
        if moment is not None and moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)  # the form's datetime-local is read as UTC
        moments.append(moment)
    label = params.get("label") or None
    return queries.Filters(status, label, moments[0], moments[1]), problems


def _local(url: str | None, default: str) -> str:
    """``url`` if it is a path on this site, else ``default``: a redirect never leaves it."""
    if url and url.startswith("/") and not url.startswith("//") and "\\" not in url:
        return url
    return default


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _db_message(exc: psycopg.Error) -> str:
    """The server's message, without the connection details psycopg may add."""
    diag = getattr(exc, "diag", None)
    primary = diag.message_primary if diag is not None else None
    if primary:
        return str(primary)
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__


async def _cancel_live(conn: queries.Conn, instance_id: str) -> tuple[str | None, str]:
    """Cancel the instance if it has not finished: its status before (None: no instance of
    this role's has this id) and df.cancel's answer ('' when it was not called)."""
    before = await queries.status(conn, instance_id) if INSTANCE_ID.match(instance_id) else None
    if before is None or before in queries.TERMINAL:
        return before, ""
    return before, await queries.cancel(conn, instance_id)


async def _say_answer(session: Session, call: Awaitable[str], done: str | None = None) -> None:
    """Show what a df function answered (or ``done``), or the error it raised; an instance
    it does not find (no_data_found) makes the page a 404."""
    try:
        answer = await call
    except psycopg.errors.NoDataFound as exc:
        raise Problem(404, _db_message(exc)) from None
    except psycopg.Error as exc:
        session.say("error", _db_message(exc))
        return
    session.say("ok", done or answer)


def _signal(node: queries.Row) -> dict[str, Any]:
    try:
        config = json.loads(node["query"] or "")
    except ValueError:
        config = {}
    name = config.get("signal_name") if isinstance(config, dict) else None
    timeout = config.get("timeout_seconds") if isinstance(config, dict) else None
    return {**node, "signal_name": name, "timeout": timeout}


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "—"


def _took(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "—"
    seconds = (end - start).total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def _pretty(text: str | None) -> str:
    """A JSON text indented for reading; anything else as it is."""
    if text is None:
        return ""
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):
        return text


def _cut_note(length: int | None) -> str:
    if length is None or length <= queries.TEXT_LIMIT:
        return ""
    return f"… cut: {queries.TEXT_LIMIT:,} of {length:,} characters shown"
