"""Dashboard sessions: who is logged in, and the CSRF token every action must carry.

Every visitor gets a session: a random id in an HttpOnly, SameSite=Strict cookie, naming a
record kept in the server's memory. The record holds the visitor's CSRF token and, once they
logged in with a PostgreSQL role and password, that role and password; neither ever leaves the
server (the cookie is only the id), and a restart of the dashboard logs everybody out.

A form that changes something carries the session's CSRF token in a hidden field; a POST
whose token does not match is refused, whatever its cookie. SameSite=Strict already keeps
other sites' forms from sending the cookie; the token also covers browsers that ignore it, and
a visitor of the DSN's role, who has nothing else to steal.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field

COOKIE = "pgdurable_session"
IDLE_SECONDS = 12 * 3600
"""A session nobody used for this long is forgotten."""
MAX_FLASH = 10
MAX_SESSIONS = 10_000
"""Beyond this many sessions the least recently used are forgotten, so anonymous visitors
cannot fill the server's memory."""


@dataclass
class Session:
    """One visitor's session."""

    id: str
    csrf: str
    role: str | None = None
    password: str | None = field(default=None, repr=False)
    last_used: float = 0.0
    flash: list[tuple[str, str]] = field(default_factory=list)
    """Messages (kind, text) for the next page shown: the outcome of an action."""

    def check_csrf(self, token: str | None) -> bool:
        """Whether ``token`` is this session's CSRF token (compared in constant time)."""
        return token is not None and hmac.compare_digest(token.encode(), self.csrf.encode())

    def say(self, kind: str, text: str) -> None:
        """Show ``text`` on the next page (kind: 'ok' or 'error'); only the latest
        :data:`MAX_FLASH` messages are kept."""
        self.flash = [*self.flash[-(MAX_FLASH - 1) :], (kind, text)]

    def take_flash(self) -> list[tuple[str, str]]:
        """The messages to show now, forgotten once taken."""
        messages, self.flash = self.flash, []
        return messages


class Sessions:
    """The sessions of one dashboard process."""

    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}

    def get(self, session_id: str | None, now: float | None = None) -> Session | None:
        """The live session of this id, or None (unknown, or idle too long)."""
        now = time.time() if now is None else now
        session = self._by_id.get(session_id or "")
        if session is None:
            return None
        if now - session.last_used > IDLE_SECONDS:
            del self._by_id[session.id]
            return None
        session.last_used = now
        return session

    def new(self, now: float | None = None) -> Session:
        """A new anonymous session."""
        now = time.time() if now is None else now
        if len(self._by_id) >= MAX_SESSIONS:
            # Anonymous sessions go first, so that visitors who need no password cannot log
            # out those who gave one.
            oldest = sorted(self._by_id.values(), key=lambda s: (s.role is not None, s.last_used))
            for session in oldest[: len(oldest) // 10 + 1]:
                del self._by_id[session.id]
        session = Session(
            id=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), last_used=now
        )
        self._by_id[session.id] = session
        return session

    def log_in(self, session: Session, role: str, password: str) -> Session:
        """A fresh session for ``role`` in place of ``session`` (a new id, so an id learnt
        before the login is worth nothing after it)."""
        self.drop(session)
        fresh = self.new()
        fresh.role, fresh.password = role, password
        return fresh

    def drop(self, session: Session) -> None:
        """Forget ``session`` (log out)."""
        self._by_id.pop(session.id, None)
