"""Performing an HTTP or HTTP_MULTIPART step under the egress policy (docs/http.md).

``perform`` takes the task payload the interpreter built (variables already substituted) and
returns the node's outcome: the response envelope on success, the error text on failure. It
never raises for anything the request or the remote side does; cancellation propagates so the
worker can abandon the requests of cancelled instances. The pure parts (envelope, body
classification, 5xx preview, multipart encoding) are plain functions, testable without I/O.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from .. import __version__
from .egress import Blocked, EgressPolicy, check_url, resolve

__all__ = [
    "HttpOutcome",
    "MultipartPart",
    "body_preview",
    "build_envelope",
    "classify_body",
    "encode_multipart",
    "perform",
    "response_headers",
    "server_error_message",
]

log = logging.getLogger("pgdurable.worker")

TEXT_CONTENT_TYPES = frozenset(
    {
        "application/json",
        "application/xml",
        "application/javascript",
        "application/ecmascript",
        "application/x-www-form-urlencoded",
        "application/graphql",
        "application/yaml",
        "application/x-yaml",
    }
)
PREVIEW_BYTES = 512
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Credentials meant for one origin must not follow a redirect to another.
_ORIGIN_BOUND_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "host"})
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\\r\n]|\\[^\r\n])*"'
_TOKEN_RE = re.compile(_TOKEN)
_PARAMETER = rf"[ \t]*{_TOKEN}[ \t]*=[ \t]*(?:{_TOKEN}|{_QUOTED})[ \t]*"
_MEDIA_TYPE_RE = re.compile(rf"[ \t]*{_TOKEN}/{_TOKEN}[ \t]*(?:;{_PARAMETER})*;?[ \t]*")
_ASCII_WHITESPACE = b" \t\n\r\x0c"
_BOMS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


@dataclass(frozen=True)
class HttpOutcome:
    """What an HTTP step ended with.

    ``succeeded``: the node succeeds (a 2xx/3xx/4xx response) or fails. ``value``: the
    response envelope JSON text on success, the error text on failure. ``code``: the failure
    class (None on success): 'http_5xx', 'http_timeout', 'http_connection', 'http_request',
    'http_blocked', 'http_too_large' or 'http_invalid'.
    """

    succeeded: bool
    value: str
    code: str | None


@dataclass(frozen=True)
class MultipartPart:
    """One validated multipart/form-data part."""

    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None


class _Failure(Exception):
    """Ends the step with a failure outcome (code, error text)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass
class _Hop:
    """The request as it stands on the current redirect hop."""

    method: str
    url: str
    headers: dict[str, bytes]
    content: bytes | None


async def perform(request: Mapping[str, Any], policy: EgressPolicy) -> HttpOutcome:
    """Perform the HTTP step described by ``request`` under ``policy``.

    ``request`` is the payload the interpreter built: type, method, url, body, headers,
    parts (multipart), timeout_seconds and idempotency_key. Never raises except for
    cancellation (and programming errors in the caller's payload type itself).
    """
    kind = "HTTP_MULTIPART" if request.get("type") == "HTTP_MULTIPART" else "HTTP"
    url = request.get("url")
    try:
        if not isinstance(url, str):
            raise _Failure("http_invalid", f"{kind} url must be a string")
        try:
            check_url(url, policy)
        except Blocked as exc:
            raise _Failure("http_blocked", str(exc)) from None
        hop, timeout = _prepare(request, kind, url)
    except _Failure as exc:
        return HttpOutcome(False, exc.text, exc.code)

    started = time.monotonic()
    current = [hop]  # the hops so far; the last one is in flight, for the error messages
    scope = asyncio.timeout(timeout)
    try:
        async with scope:
            return await _exchange(hop, kind, policy, started, current)
    except _Failure as exc:
        return HttpOutcome(False, exc.text, exc.code)
    except Exception as exc:
        url = current[-1].url
        if isinstance(exc, TimeoutError) and scope.expired():
            return HttpOutcome(
                False, f"HTTP timeout after {_seconds(timeout)}s: {url}", "http_timeout"
            )
        # A bug or an error no transport path above anticipated: fail the step, not the worker.
        log.warning("HTTP step to %s failed unexpectedly", url, exc_info=True)
        return HttpOutcome(False, f"HTTP request failed: {url} - {_describe(exc)}", "http_request")


async def _exchange(
    hop: _Hop, kind: str, policy: EgressPolicy, started: float, current: list[_Hop]
) -> HttpOutcome:
    redirects = 0
    while True:
        # A fresh client per hop: a pooled connection would carry a TLS session verified
        # for one host over to another host behind the same address.
        async with httpx.AsyncClient(
            trust_env=False, follow_redirects=False, timeout=None
        ) as client:
            response = await _send(client, hop, policy)
            try:
                target = None
                if redirects < policy.max_redirects:
                    target = _redirect_target(response, hop.url)
                if target is None:
                    body = await _read_body(response, hop, policy.max_response_bytes)
                    break
            finally:
                await response.aclose()
        redirects += 1
        hop = _follow(hop, response.status_code, target)
        current.append(hop)

    duration_ms = int((time.monotonic() - started) * 1000)
    content_type = _first_header(response.headers.raw, b"content-type")
    text, encoding = classify_body(body, content_type)
    if response.status_code >= 500:
        return HttpOutcome(
            False,
            server_error_message(kind, hop.method, hop.url, response.status_code, text, encoding),
            "http_5xx",
        )
    envelope = build_envelope(
        response.status_code,
        text,
        encoding,
        response_headers(response.headers.raw),
        duration_ms,
    )
    return HttpOutcome(True, envelope, None)


async def _send(client: httpx.AsyncClient, hop: _Hop, policy: EgressPolicy) -> httpx.Response:
    """Send one hop and return the response with its body unread."""
    try:
        host = check_url(hop.url, policy)
        url = httpx.URL(hop.url)
    except Blocked as exc:
        raise _Failure("http_blocked", str(exc)) from None
    except httpx.InvalidURL as exc:
        raise _Failure(
            "http_invalid", f"HTTP request failed: {hop.url} - {_describe(exc)}"
        ) from None
    headers = dict(hop.headers)
    if policy.allow_all:
        targets: list[tuple[httpx.URL, dict[str, Any]]] = [(url, {})]
    else:
        port = url.port or (443 if url.scheme == "https" else 80)
        ascii_host = url.raw_host.decode("ascii")
        try:
            addresses = await resolve(ascii_host, port, policy)
        except Blocked as exc:
            raise _Failure("http_blocked", str(exc)) from None
        except OSError as exc:
            raise _Failure(
                "http_connection",
                f"HTTP connection failed: {hop.url} - could not resolve '{host}': {_describe(exc)}",
            ) from None
        # Connect to the address that was checked; Host and TLS still name the real host.
        headers.setdefault("host", httpx.Request("GET", url).headers["host"].encode("ascii"))
        extensions = {"sni_hostname": ascii_host} if url.scheme == "https" else {}
        targets = [(url.copy_with(host=address), extensions) for address in addresses]

    last: Exception | None = None
    for target, extensions in targets:
        request = httpx.Request(
            hop.method,
            target,
            headers=[(key.encode("ascii"), value) for key, value in headers.items()],
            content=hop.content,
            extensions=extensions,
        )
        try:
            return await client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            last = exc  # try the next checked address
        except httpx.HTTPError as exc:
            raise _Failure(
                "http_request", f"HTTP request failed: {hop.url} - {_describe(exc)}"
            ) from None
        except (OSError, ValueError) as exc:
            # ssl and h11 errors that httpx does not wrap on every path.
            raise _Failure(
                "http_request", f"HTTP request failed: {hop.url} - {_describe(exc)}"
            ) from None
    assert last is not None
    raise _Failure("http_connection", f"HTTP connection failed: {hop.url} - {_describe(last)}")


async def _read_body(response: httpx.Response, hop: _Hop, limit: int) -> bytes:
    url = hop.url
    too_large = _Failure(
        "http_too_large", f"HTTP response too large: {url} - more than {limit} bytes"
    )
    # A HEAD, 204 or 304 response declares the length of a body it does not carry.
    has_body = hop.method != "HEAD" and response.status_code not in (204, 304)
    declared = response.headers.get("content-length", "").strip()
    if has_body and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in response.aiter_raw():
            total += len(chunk)
            if total > limit:
                raise too_large
            chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise _Failure("http_request", f"HTTP request failed: {url} - {_describe(exc)}") from None
    return b"".join(chunks)


def _redirect_target(response: httpx.Response, url: str) -> str | None:
    """The absolute URL a redirect response points to, or None if it is not one we follow.

    Resolved against the hop's own URL, not the address-pinned URL that was sent."""
    if response.status_code not in _REDIRECT_STATUSES:
        return None
    location = _first_header(response.headers.raw, b"location")
    if not location or not location.strip():
        return None
    try:
        return str(httpx.URL(url).join(location.strip()))
    except httpx.InvalidURL:
        return None


def _follow(hop: _Hop, status: int, target: str) -> _Hop:
    method, content = hop.method, hop.content
    headers = dict(hop.headers)
    if (status == 303 and method != "HEAD") or (status in (301, 302) and method == "POST"):
        method, content = "GET", None
        for name in _BODY_HEADERS:
            headers.pop(name, None)
    if _origin(target) != _origin(hop.url):
        for name in _ORIGIN_BOUND_HEADERS:
            headers.pop(name, None)
    return _Hop(method, target, headers, content)


def _origin(url: str) -> tuple[str, str, int | None]:
    parsed = httpx.URL(url)
    return parsed.scheme, parsed.host, parsed.port


def _prepare(request: Mapping[str, Any], kind: str, url: str) -> tuple[_Hop, float]:
    """Validate the payload and build the first hop; raises _Failure('http_invalid')."""
    method = request.get("method")
    if not isinstance(method, str) or not _TOKEN_RE.fullmatch(method):
        raise _Failure("http_invalid", f"Invalid HTTP method {method!r}.")
    timeout = request.get("timeout_seconds")
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise _Failure(
            "http_invalid", f"{kind} timeout_seconds must be a positive number, got {timeout!r}."
        )

    headers: dict[str, bytes] = {}
    given = request.get("headers")
    if given is not None and not isinstance(given, Mapping):
        raise _Failure("http_invalid", f"{kind} headers must be a JSON object.")
    for name, value in (given or {}).items():
        if not isinstance(value, str):
            continue
        key = str(name).lower()
        if kind == "HTTP_MULTIPART" and key == "content-type":
            continue
        if not _TOKEN_RE.fullmatch(str(name)):
            raise _Failure("http_invalid", f"Invalid header name {name!r}.")
        if any(c in value for c in "\r\n\0"):
            raise _Failure(
                "http_invalid", f"Invalid value for header '{name}': line breaks are not allowed."
            )
        headers[key] = value.encode("utf-8")
    headers.setdefault("user-agent", f"pgdurable/{__version__}".encode())
    headers.setdefault("accept", b"*/*")
    key_value = request.get("idempotency_key")
    if isinstance(key_value, str) and key_value:
        headers.setdefault("idempotency-key", key_value.encode("utf-8"))

    content: bytes | None
    if kind == "HTTP_MULTIPART":
        parts = _parts(request.get("parts"))
        boundary = secrets.token_hex(16)
        content = encode_multipart(parts, boundary)
        headers["content-type"] = f"multipart/form-data; boundary={boundary}".encode("ascii")
    else:
        body = request.get("body")
        if body is not None and not isinstance(body, str):
            raise _Failure("http_invalid", "HTTP body must be a string or null.")
        content = body.encode("utf-8") if body is not None else None
    return _Hop(method, url, headers, content), float(timeout)


def _parts(value: Any) -> list[MultipartPart]:
    if not isinstance(value, list):
        raise _Failure("http_invalid", "HTTP_MULTIPART parts must be a JSON array of objects.")
    parts = []
    for index, part in enumerate(value, start=1):
        where = f"HTTP_MULTIPART part {index}"
        if not isinstance(part, Mapping):
            raise _Failure(
                "http_invalid",
                f'{where}: expected a JSON object with "name" and "data_b64", '
                f"got {_json_type(part)}.",
            )
        name = part.get("name")
        if not isinstance(name, str):
            raise _Failure("http_invalid", f'{where}: "name" must be a string.')
        data_b64 = part.get("data_b64")
        if not isinstance(data_b64, str):
            raise _Failure("http_invalid", f"{where} ('{name}'): \"data_b64\" must be a string.")
        filename = part.get("filename")
        if filename is not None and not isinstance(filename, str):
            raise _Failure("http_invalid", f"{where} ('{name}'): \"filename\" must be a string.")
        content_type = part.get("content_type")
        if content_type is not None:
            if not isinstance(content_type, str):
                raise _Failure(
                    "http_invalid", f"{where} ('{name}'): \"content_type\" must be a string."
                )
            problem = _media_type_problem(content_type)
            if problem:
                raise _Failure("http_invalid", f"Invalid content_type for part '{name}': {problem}")
        try:
            data = base64.b64decode(
                data_b64.encode("utf-8").translate(None, _ASCII_WHITESPACE), validate=True
            )
        except (binascii.Error, ValueError) as exc:
            raise _Failure("http_invalid", f"Invalid base64 in part '{name}': {exc}") from None
        parts.append(
            MultipartPart(name, data, filename, content_type.strip() if content_type else None)
        )
    return parts


def _media_type_problem(value: str) -> str | None:
    if "\r" in value or "\n" in value:
        return "line breaks are not allowed"
    if not _MEDIA_TYPE_RE.fullmatch(value):
        return f"'{value}' is not a valid media type (expected type/subtype[; name=value]...)"
    return None


def encode_multipart(parts: Iterable[MultipartPart], boundary: str) -> bytes:
    """The multipart/form-data body of ``parts`` (RFC 7578), in order.

    Names and filenames are escaped as browsers do (``"`` → %22, CR → %0D, LF → %0A); a
    part has a Content-Type header only when one was given.
    """
    out = bytearray()
    for part in parts:
        disposition = f'form-data; name="{_escape_param(part.name)}"'
        if part.filename is not None:
            disposition += f'; filename="{_escape_param(part.filename)}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if part.content_type:
            out += f"Content-Type: {part.content_type}\r\n".encode()
        out += b"\r\n" + part.data + b"\r\n"
    out += f"--{boundary}--\r\n".encode("ascii")
    return bytes(out)


def _escape_param(value: str) -> str:
    return value.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Response headers for the envelope: lower-case names, values that are valid UTF-8
    (others skipped), the last value of a repeated name."""
    headers: dict[str, str] = {}
    for name, value in raw:
        try:
            headers[name.decode("utf-8").lower()] = value.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return headers


def classify_body(body: bytes, content_type: str | None) -> tuple[str, str]:
    """The envelope's (body, encoding) for ``body`` served as ``content_type`` (the first
    Content-Type header value, or None).

    Textual media types are decoded with their charset (unknown charsets as UTF-8, bad bytes
    replaced); anything else is text when it is valid UTF-8 without NUL, base64 otherwise.
    Text containing NUL is sent as base64 too: PostgreSQL text and jsonb cannot hold it.
    """
    mime, charset = _media_type(content_type)
    if _is_textual(mime):
        text = _decode(body, charset)
        if "\0" not in text:
            return text, "text"
    elif b"\0" not in body:
        try:
            return body.decode("utf-8"), "text"
        except UnicodeDecodeError:
            pass
    return base64.b64encode(body).decode("ascii"), "base64"


def build_envelope(
    status: int, body: str, encoding: str, headers: Mapping[str, str], duration_ms: int
) -> str:
    """The response envelope JSON text (compact, keys in pg_durable's order)."""
    envelope = {
        "status": status,
        "body": body,
        "encoding": encoding,
        "headers": dict(headers),
        "ok": 200 <= status < 300,
        "duration_ms": duration_ms,
    }
    return json.dumps(envelope, ensure_ascii=False, separators=(",", ":"))


def body_preview(body: str, encoding: str) -> str:
    """A 5xx body for an error message: at most 512 bytes of text (cut on a character
    boundary) or 512 base64 characters, with a note of the full size when cut."""
    if encoding == "base64":
        if len(body) <= PREVIEW_BYTES:
            return body
        return f"{body[:PREVIEW_BYTES]}... [truncated, {len(body)} base64 characters total]"
    raw = body.encode("utf-8", errors="surrogatepass")
    if len(raw) <= PREVIEW_BYTES:
        return body
    head = raw[:PREVIEW_BYTES].decode("utf-8", errors="ignore")
    return f"{head}... [truncated, {len(raw)} bytes total]"


def server_error_message(
    kind: str, method: str, url: str, status: int, body: str, encoding: str
) -> str:
    """The error text of a step whose response was a 5xx."""
    return f"{kind} {method} {url} returned {status}: {body_preview(body, encoding)}"


def _media_type(content_type: str | None) -> tuple[str, str | None]:
    if content_type is None:
        return "", None
    mime, *params = content_type.split(";")
    charset = None
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip('"').strip() or None
    return mime.strip().lower(), charset


def _is_textual(mime: str) -> bool:
    return (
        mime.startswith("text/")
        or mime.endswith(("+json", "+xml", "+yaml"))
        or mime in TEXT_CONTENT_TYPES
    )


def _decode(body: bytes, charset: str | None) -> str:
    # A byte-order mark overrides the declared charset, as in browsers and Rust's
    # encoding_rs (which pg_durable decodes with).
    for bom, encoding in _BOMS:
        if body.startswith(bom):
            return body[len(bom) :].decode(encoding, errors="replace")
    if charset:
        try:
            return body.decode(charset, errors="replace")
        except (LookupError, UnicodeError, ValueError, TypeError):
            pass  # unknown or not a text encoding (e.g. 'base64', 'idna'): fall back
    return body.decode("utf-8", errors="replace")


def _first_header(raw: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in raw:
        if key.lower() == name:
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                return None
    return None


def _describe(exc: BaseException) -> str:
    """A non-empty description of a transport error: its message, and the root cause's when
    that says more (httpx's "All connection attempts failed" hides "Connection refused")."""
    top = str(exc).strip() or type(exc).__name__
    root = None
    seen = {id(exc)}
    inner = exc.__cause__ or exc.__context__
    while inner is not None and id(inner) not in seen:
        seen.add(id(inner))
        text = str(inner).strip()
        if isinstance(inner, OSError) and isinstance(inner.errno, int) and inner.errno > 0:
            # asyncio words a refused connection "Connect call failed"; say what happened.
            text = os.strerror(inner.errno)
        if text and text != top:
            root = text
        inner = inner.__cause__ or inner.__context__
    return f"{top} ({root})" if root else top


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else type(value).__name__


def _seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)
