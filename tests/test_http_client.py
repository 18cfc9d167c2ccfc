"""The HTTP step executor and the egress policy, against a local server (no internet)."""

from __future__ import annotations

import asyncio
import base64
import email.parser
import email.policy
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from httpserver import LocalHttpServer

from pgdurable import __version__
from pgdurable.worker.egress import Blocked, EgressPolicy, check_url, resolve
from pgdurable.worker.http import (
    HttpOutcome,
    MultipartPart,
    body_preview,
    build_envelope,
    classify_body,
    encode_multipart,
    perform,
    response_headers,
)

LOOPBACK = EgressPolicy(allowed_networks=("127.0.0.1/32",))
RESTRICTED = (
    "Blocked: the resolved IP address for '{}' is in a restricted range. "
    "df.http() cannot access private or internal network addresses."
)


@pytest.fixture
def server() -> Iterator[LocalHttpServer]:
    with LocalHttpServer() as s:
        yield s


def run(
    url: str,
    policy: EgressPolicy = LOOPBACK,
    method: str = "GET",
    body: str | None = None,
    headers: dict[str, Any] | None = None,
    timeout: float = 5,
    **extra: Any,
) -> HttpOutcome:
    request: dict[str, Any] = {
        "type": "HTTP",
        "method": method,
        "url": url,
        "body": body,
        "headers": headers,
        "timeout_seconds": timeout,
        "idempotency_key": "pgdurable:stamp:n1",
    }
    request.update(extra)
    return asyncio.run(perform(request, policy))


def run_multipart(
    url: str, parts: Any, headers: dict[str, Any] | None = None, policy: EgressPolicy = LOOPBACK
) -> HttpOutcome:
    return run(url, policy, "POST", headers=headers, type="HTTP_MULTIPART", parts=parts)


def envelope(outcome: HttpOutcome) -> dict[str, Any]:
    assert outcome.succeeded, outcome
    assert outcome.code is None
    value: dict[str, Any] = json.loads(outcome.value)
    return value


# --- pure parts ------------------------------------------------------------------------------


def test_classify_body() -> None:
    assert classify_body(b'{"a":1}', "application/json") == ('{"a":1}', "text")
    assert classify_body(b"caf\xe9", "text/plain; charset=ISO-8859-1") == ("café", "text")
    assert classify_body(b"caf\xe9", 'text/plain; charset="latin1"') == ("café", "text")
    assert classify_body(b"{}", "application/problem+json") == ("{}", "text")
    assert classify_body(b"<a/>", "application/atom+xml; charset=utf-8") == ("<a/>", "text")
    # textual type, invalid UTF-8: decoded with replacement, still text
    assert classify_body(b"a\xffb", "text/plain") == ("a\ufffdb", "text")
    # unknown charset and a codec that is not a text encoding fall back to UTF-8
    assert classify_body("é".encode(), "text/plain; charset=klingon") == ("é", "text")
    assert classify_body("é".encode(), "text/plain; charset=base64") == ("é", "text")
    # a byte-order mark wins over the declared charset and is dropped
    assert classify_body(b"\xef\xbb\xbfhi", "text/plain; charset=latin1") == ("hi", "text")
    assert classify_body(b"\xff\xfeh\x00i\x00", "text/plain") == ("hi", "text")
    # no or non-textual content type: UTF-8 without NUL is text, anything else base64
    assert classify_body("ünï".encode(), None) == ("ünï", "text")
    assert classify_body(b"plain", "application/octet-stream") == ("plain", "text")
    assert classify_body(b"a\x00b", "application/octet-stream") == ("YQBi", "base64")
    assert classify_body(b"\xff\xfe\xfd", None) == ("//79", "base64")
    assert classify_body(b"PNG\x00\x01", "image/png") == ("UE5HAAE=", "base64")
    assert classify_body(b"", None) == ("", "text")
    # PostgreSQL cannot store NUL in text or jsonb, so NUL text goes as base64 too
    assert classify_body(b"a\x00", "text/plain") == ("YQA=", "base64")


def test_response_headers() -> None:
    raw = [
        (b"X-Dup", b"first"),
        (b"Content-Type", b"text/plain"),
        (b"x-dup", b"second"),
        (b"X-Bad", b"\xff\xfe"),
        (b"X-Utf8", "é".encode()),
    ]
    assert response_headers(raw) == {"x-dup": "second", "content-type": "text/plain", "x-utf8": "é"}


def test_build_envelope_is_compact_in_spec_order() -> None:
    text = build_envelope(404, "nö", "text", {"a": "b"}, 12)
    assert text == (
        '{"status":404,"body":"nö","encoding":"text","headers":{"a":"b"},"ok":false,'
        '"duration_ms":12}'
    )
    assert json.loads(build_envelope(204, "", "text", {}, 0))["ok"] is True
    assert json.loads(build_envelope(302, "", "text", {}, 0))["ok"] is False


def test_body_preview() -> None:
    assert body_preview("short", "text") == "short"
    exact = "a" * 512
    assert body_preview(exact, "text") == exact
    # 511 ASCII bytes then a 2-byte character: the cut must not split it
    text = "a" * 511 + "é" + "z" * 100
    assert body_preview(text, "text") == "a" * 511 + "... [truncated, 613 bytes total]"
    b64 = "QUFB" * 200
    assert body_preview(b64, "base64") == b64[:512] + "... [truncated, 800 base64 characters total]"
    assert body_preview("QUFB", "base64") == "QUFB"


def test_encode_multipart_exact() -> None:
    body = encode_multipart(
        [
            MultipartPart("field", b"value"),
            MultipartPart('we"ird\r\n', b"\x00\x01", "a.bin", "application/octet-stream"),
        ],
        "BOUND",
    )
    assert body == (
        b'--BOUND\r\nContent-Disposition: form-data; name="field"\r\n\r\nvalue\r\n'
        b'--BOUND\r\nContent-Disposition: form-data; name="we%22ird%0D%0A"; filename="a.bin"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n\x00\x01\r\n"
        b"--BOUND--\r\n"
    )


# --- policy: pure checks ---------------------------------------------------------------------


def blocked(url: str, policy: EgressPolicy) -> str:
    with pytest.raises(Blocked) as info:
        check_url(url, policy)
    return str(info.value)


def test_allow_list_suffix_rules() -> None:
    policy = EgressPolicy(allowed_hosts=("example.com", ".sub.org", "*.wild.net"))
    assert check_url("https://example.com/x", policy) == "example.com"
    assert check_url("https://API.Example.COM:8443/x?y#z", policy) == "api.example.com"
    assert check_url("http://user:pw@a.b.example.com/", policy) == "a.b.example.com"
    assert check_url("http://x.sub.org", policy) == "x.sub.org"
    assert check_url("http://x.wild.net", policy) == "x.wild.net"
    for host in ("evilexample.com", "example.com.evil.io", "sub.org", "wild.net", "org"):
        assert blocked(f"https://{host}/", policy) == (
            f"Blocked: '{host}' is not in the allowed endpoint list."
        )
    bare_ip = "Blocked: requests to bare IP addresses are not permitted by the egress allow-list."
    assert blocked("http://93.184.216.34/", policy) == bare_ip
    assert blocked("http://[2606:4700::1]:80/", policy) == bare_ip


def test_scheme_disabled_and_host_extraction() -> None:
    scheme = "Blocked: unsupported URL scheme '{}'. Only http and https are allowed."
    assert blocked("ftp://example.com/", EgressPolicy()) == scheme.format("ftp")
    assert blocked("FILE:///etc/passwd", EgressPolicy(allow_all=True)) == scheme.format("file")
    assert blocked("example.com/path", EgressPolicy()) == scheme.format("example.com/path")
    assert check_url("HTTPS://example.com", EgressPolicy(allow_all=True)) == "example.com"
    assert blocked("http://example.com/", EgressPolicy(enabled=False)) == (
        "Blocked: outbound HTTP requests are disabled by this worker's egress policy "
        "(pgdurable worker --http-disable)."
    )
    no_host = "Blocked: unable to extract hostname from URL."
    for url in ("http:///path", "http://user@/", "http://[::1/", "http://a:b:c/", "http://a b/"):
        assert blocked(url, EgressPolicy()) == no_host, url
    assert check_url("http://[2606:4700::1]:8080/", EgressPolicy()) == "2606:4700::1"
    assert check_url("https://example.com", EgressPolicy()) == "example.com"


def test_literal_addresses_checked_without_lookup() -> None:
    policy = EgressPolicy()
    for host in ("127.0.0.1", "10.1.2.3", "169.254.169.254", "0.0.0.0", "100.64.0.1", "224.0.0.1"):
        assert blocked(f"http://{host}/", policy) == RESTRICTED.format(host)
    for host in ("::1", "::", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1"):
        assert blocked(f"http://[{host}]/", policy) == RESTRICTED.format(host)
    assert blocked("http://[2002:7f00:1::]/", policy) == RESTRICTED.format("2002:7f00:1::")
    assert check_url("http://93.184.216.34/", policy) == "93.184.216.34"
    assert check_url("http://[2606:4700::1]/", policy) == "2606:4700::1"
    # exemptions, including an IPv4-mapped address of an exempt IPv4 address
    assert check_url("http://127.0.0.1:9/", LOOPBACK) == "127.0.0.1"
    assert check_url("http://[::ffff:127.0.0.1]/", LOOPBACK) == "::ffff:127.0.0.1"
    assert blocked("http://127.0.0.2/", LOOPBACK) == RESTRICTED.format("127.0.0.2")
    assert check_url("http://127.0.0.2/", EgressPolicy(allow_all=True)) == "127.0.0.2"


def test_policy_entries_are_normalized_and_validated() -> None:
    policy = EgressPolicy(
        allowed_hosts="Example.com, .Sub.org *.wild.net",
        allowed_networks=["10.0.0.0/8,127.0.0.1", "::1/128"],
        max_redirects=3,
    )
    assert policy.allowed_hosts == ("example.com", ".sub.org", ".wild.net")
    assert policy.allowed_networks == ("10.0.0.0/8", "127.0.0.1", "::1/128")
    assert policy.max_redirects == 3 and policy.enabled and not policy.allow_all
    with pytest.raises(ValueError, match=r"invalid allowed network '10\.0\.0\.1/8': .*host bits"):
        EgressPolicy(allowed_networks="10.0.0.1/8")
    with pytest.raises(ValueError, match="invalid allowed network 'nonsense'"):
        EgressPolicy(allowed_networks="nonsense")
    with pytest.raises(ValueError, match=r"invalid allowed host 'https://x\.com'"):
        EgressPolicy(allowed_hosts="https://x.com")
    assert EgressPolicy() == EgressPolicy()
    # the dataclass itself normalizes and validates too
    direct = EgressPolicy(allowed_hosts=["A.com"], allowed_networks=["::1/128"])  # type: ignore[arg-type]
    assert (direct.allowed_hosts, direct.allowed_networks) == (("a.com",), ("::1/128",))
    assert hash(direct)
    with pytest.raises(ValueError, match="invalid allowed network"):
        EgressPolicy(allowed_networks=("300.0.0.0/8",))


def test_resolve() -> None:
    with pytest.raises(Blocked) as info:
        asyncio.run(resolve("localhost", 80, EgressPolicy()))
    assert str(info.value) == RESTRICTED.format("localhost")
    assert asyncio.run(resolve("localhost", 80, LOOPBACK)) == ["127.0.0.1"]
    assert "127.0.0.1" in asyncio.run(resolve("localhost", 80, EgressPolicy(allow_all=True)))
    assert asyncio.run(resolve("::ffff:127.0.0.1", 80, LOOPBACK)) == ["::ffff:7f00:1"]
    with pytest.raises(OSError):
        asyncio.run(resolve("no-such-host.invalid", 80, EgressPolicy()))


# --- the exchange ----------------------------------------------------------------------------


def test_envelope_fields(server: LocalHttpServer) -> None:
    server.reply(
        "/json",
        201,
        b'{"x": [1, 2]}',
        [("Content-Type", "application/json"), ("X-Dup", "1"), ("X-Dup", "2")],
    )
    result = envelope(run(server.url("/json")))
    assert list(result) == ["status", "body", "encoding", "headers", "ok", "duration_ms"]
    assert result["status"] == 201
    assert result["body"] == '{"x": [1, 2]}'
    assert result["encoding"] == "text"
    assert result["ok"] is True
    assert isinstance(result["duration_ms"], int) and 0 <= result["duration_ms"] < 5000
    assert result["headers"] == {
        "content-type": "application/json",
        "x-dup": "2",
        "content-length": "13",
        "connection": "close",
    }


def test_body_classification_end_to_end(server: LocalHttpServer) -> None:
    server.reply(
        "/latin", body=b"caf\xe9", headers=[("Content-Type", "text/html; charset=latin-1")]
    )
    server.reply("/bin", body=b"\x89PNG\x00", headers=[("Content-Type", "image/png")])
    server.reply("/utf8", body=b"\xff not utf-8")
    server.reply("/hdr", headers=[("X-Latin", b"\xe9t\xe9"), ("X-Ok", "fine")])
    assert envelope(run(server.url("/latin")))["body"] == "café"
    bin_result = envelope(run(server.url("/bin")))
    assert (bin_result["encoding"], base64.b64decode(bin_result["body"])) == (
        "base64",
        b"\x89PNG\x00",
    )
    assert envelope(run(server.url("/utf8")))["encoding"] == "base64"
    headers = envelope(run(server.url("/hdr")))["headers"]
    assert "x-latin" not in headers and headers["x-ok"] == "fine"


def test_4xx_and_3xx_succeed_with_ok_false(server: LocalHttpServer) -> None:
    server.reply("/missing", 404, "nope", [("Content-Type", "text/plain")])
    result = envelope(run(server.url("/missing")))
    assert (result["status"], result["ok"], result["body"]) == (404, False, "nope")


def test_5xx_fails_with_preview(server: LocalHttpServer) -> None:
    server.reply("/boom", 503, "down for maintenance", [("Content-Type", "text/plain")])
    outcome = run(server.url("/boom"), method="POST", body="x")
    assert outcome == HttpOutcome(
        False, f"HTTP POST {server.url('/boom')} returned 503: down for maintenance", "http_5xx"
    )
    server.reply("/long", 500, "é" * 300)
    outcome = run(server.url("/long"))
    assert outcome.value == (
        f"HTTP GET {server.url('/long')} returned 500: {'é' * 256}... [truncated, 600 bytes total]"
    )
    server.reply("/binary", 502, b"\x00" * 600, [("Content-Type", "application/octet-stream")])
    outcome = run(server.url("/binary"))
    b64 = base64.b64encode(b"\x00" * 600).decode()
    assert outcome.value == (
        f"HTTP GET {server.url('/binary')} returned 502: {b64[:512]}... "
        f"[truncated, {len(b64)} base64 characters total]"
    )
    server.reply("/mp", 500, "x")
    outcome = run_multipart(server.url("/mp"), [])
    assert outcome.value == f"HTTP_MULTIPART POST {server.url('/mp')} returned 500: x"


def test_request_headers_and_body(server: LocalHttpServer) -> None:
    server.reply("/echo")
    envelope(run(server.url("/echo"), method="PUT", body='{"raw": "body é"}'))
    (seen,) = server.hits("/echo")
    assert seen.method == "PUT"
    assert seen.body == '{"raw": "body é"}'.encode()
    assert seen.header("User-Agent") == f"pgdurable/{__version__}"
    assert seen.header("Idempotency-Key") == "pgdurable:stamp:n1"
    assert seen.header("Content-Type") is None
    assert seen.header("Accept-Encoding") is None  # bodies are returned as the server sent them
    assert seen.header("Host") == f"127.0.0.1:{server.port}"

    server.reply("/custom")
    headers = {
        "user-agent": "mine/1",
        "IDEMPOTENCY-KEY": "k-7",
        "X-Num": 5,
        "X-Null": None,
        "X-List": ["a"],
        "X-Str": "yes",
        "Content-Type": "application/json",
    }
    envelope(run(server.url("/custom"), method="POST", headers=headers))
    (seen,) = server.hits("/custom")
    names = [name.lower() for name, _ in seen.headers]
    assert names.count("user-agent") == 1 and seen.header("User-Agent") == "mine/1"
    assert names.count("idempotency-key") == 1 and seen.header("Idempotency-Key") == "k-7"
    assert seen.header("X-Str") == "yes" and seen.header("Content-Type") == "application/json"
    assert not {"x-num", "x-null", "x-list"} & set(names)
    assert seen.body == b"" and seen.header("Content-Length") == "0"


def test_invalid_requests_are_refused_before_sending(server: LocalHttpServer) -> None:
    url = server.url("/x")
    assert run(url, method="GET /x") == HttpOutcome(
        False, "Invalid HTTP method 'GET /x'.", "http_invalid"
    )
    assert run(url, timeout=0).code == "http_invalid"
    assert run(url, headers={"X-A": "a\r\nInjected: 1"}).value == (
        "Invalid value for header 'X-A': line breaks are not allowed."
    )
    assert run(url, headers={"Bad Name": "v"}).value == "Invalid header name 'Bad Name'."
    assert server.requests == []


def parse_form(seen: Any) -> list[EmailMessage]:
    head = f"Content-Type: {seen.header('Content-Type')}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + seen.body)
    assert isinstance(message, EmailMessage) and message.is_multipart()
    return [p for p in message.iter_parts() if isinstance(p, EmailMessage)]


def test_multipart_parts(server: LocalHttpServer) -> None:
    server.reply("/upload")
    parts = [
        {"name": "meta", "data_b64": base64.b64encode(b'{"k":1}').decode()},
        {
            "name": "file",
            "filename": "report.csv",
            "content_type": "text/csv; charset=utf-8",
            "data_b64": " YSxi\n LDEs\r\nMg== ",
        },
        {"name": "meta", "data_b64": "", "content_type": "application/json"},
    ]
    headers = {"content-type": "text/plain", "X-Trace": "t1"}
    envelope(run_multipart(server.url("/upload"), parts, headers))
    (seen,) = server.hits("/upload")
    assert (seen.header("Content-Type") or "").startswith("multipart/form-data; boundary=")
    assert seen.header("X-Trace") == "t1"
    assert seen.header("Idempotency-Key") == "pgdurable:stamp:n1"
    received = parse_form(seen)
    assert [p.get_param("name", header="content-disposition") for p in received] == [
        "meta",
        "file",
        "meta",
    ]
    assert [p.get_filename() for p in received] == [None, "report.csv", None]
    assert "filename" not in str(received[0]["Content-Disposition"])
    assert received[0].get("Content-Type") is None
    assert [p.get_content_type() for p in received[1:]] == ["text/csv", "application/json"]
    assert b"\r\nContent-Type: text/csv; charset=utf-8\r\n" in seen.body
    assert [p.get_payload(decode=True) for p in received] == [b'{"k":1}', b"a,b,1,2", b""]


def test_multipart_invalid_parts(server: LocalHttpServer) -> None:
    url = server.url("/upload")
    server.reply("/upload")
    bad_b64 = run_multipart(url, [{"name": "doc", "data_b64": "abc"}])
    assert bad_b64.code == "http_invalid"
    assert bad_b64.value.startswith("Invalid base64 in part 'doc': ")
    assert run_multipart(url, [{"name": "doc", "data_b64": "a$b="}]).value.startswith(
        "Invalid base64 in part 'doc': "
    )
    bad_type = run_multipart(url, [{"name": "doc", "data_b64": "", "content_type": "nonsense"}])
    assert bad_type == HttpOutcome(
        False,
        "Invalid content_type for part 'doc': 'nonsense' is not a valid media type "
        "(expected type/subtype[; name=value]...)",
        "http_invalid",
    )
    crlf = run_multipart(url, [{"name": "d", "data_b64": "", "content_type": "text/plain\r\nX: y"}])
    assert crlf.value == "Invalid content_type for part 'd': line breaks are not allowed"
    assert run_multipart(url, [{"data_b64": ""}]).value == (
        'HTTP_MULTIPART part 1: "name" must be a string.'
    )
    assert run_multipart(url, [{"name": "a", "data_b64": ""}, {"name": "b"}]).value == (
        "HTTP_MULTIPART part 2 ('b'): \"data_b64\" must be a string."
    )
    assert run_multipart(url, ["text"]).value == (
        'HTTP_MULTIPART part 1: expected a JSON object with "name" and "data_b64", got a string.'
    )
    assert run_multipart(url, {"name": "x"}).value == (
        "HTTP_MULTIPART parts must be a JSON array of objects."
    )
    assert server.requests == []


def test_timeout_on_slow_and_hanging_servers(server: LocalHttpServer) -> None:
    server.reply("/slow", body="late", delay=5)
    server.hang("/hang")
    for path, timeout in (("/slow", 0.5), ("/hang", 1)):
        started = time.monotonic()
        outcome = run(server.url(path), timeout=timeout)
        elapsed = time.monotonic() - started
        assert outcome == HttpOutcome(
            False, f"HTTP timeout after {timeout}s: {server.url(path)}", "http_timeout"
        )
        assert timeout <= elapsed < timeout + 1
        assert len(server.hits(path)) == 1


def test_transport_errors(server: LocalHttpServer) -> None:
    server.garbage("/garbage")
    outcome = run(server.url("/garbage"))
    assert outcome.code == "http_request"
    assert outcome.value.startswith(f"HTTP request failed: {server.url('/garbage')} - ")
    assert len(outcome.value) > len(f"HTTP request failed: {server.url('/garbage')} - ")

    with LocalHttpServer() as gone:
        closed_url = gone.url("/x")
    outcome = run(closed_url)
    assert outcome.code == "http_connection"
    assert outcome.value.startswith(f"HTTP connection failed: {closed_url} - ")
    assert outcome.value.endswith(" (Connection refused)")

    outcome = run("http://no-such-host.invalid/x", EgressPolicy())
    assert outcome.code == "http_connection"
    assert outcome.value.startswith(
        "HTTP connection failed: http://no-such-host.invalid/x - could not resolve "
        "'no-such-host.invalid': "
    )


def test_huge_responses_stop_early(server: LocalHttpServer) -> None:
    policy = EgressPolicy(allowed_networks=("127.0.0.1/32",), max_response_bytes=100_000)
    chunked = server.huge("/chunked", size=1 << 30)
    sized = server.huge("/sized", size=1 << 30, content_length=True)
    for path, route in (("/chunked", chunked), ("/sized", sized)):
        started = time.monotonic()
        outcome = run(server.url(path), policy)
        assert outcome == HttpOutcome(
            False,
            f"HTTP response too large: {server.url(path)} - more than 100000 bytes",
            "http_too_large",
        )
        assert time.monotonic() - started < 5
        assert route.sent < 1 << 30
    # at the limit exactly is fine; a HEAD response declares a length it does not carry
    server.reply("/exact", body=b"y" * 100_000)
    assert envelope(run(server.url("/exact"), policy))["body"] == "y" * 100_000
    server.reply("/big", body=b"z" * 200_000)
    head = envelope(run(server.url("/big"), policy, "HEAD"))
    assert (head["body"], head["headers"]["content-length"]) == ("", "200000")


def test_redirects_not_followed_by_default(server: LocalHttpServer) -> None:
    server.redirect("/from", "/to")
    server.reply("/to", body="target")
    result = envelope(run(server.url("/from")))
    assert (result["status"], result["ok"], result["headers"]["location"]) == (302, False, "/to")
    assert server.hits("/to") == []


def test_redirects_followed_when_allowed(server: LocalHttpServer) -> None:
    policy = EgressPolicy(allowed_networks=("127.0.0.1/32",), max_redirects=2)
    server.redirect("/a", "/b", 301)
    server.redirect("/b", server.url("/c"), 307)
    server.reply("/c", body="done")
    result = envelope(run(server.url("/a"), policy, "POST", body="payload"))
    assert (result["status"], result["body"]) == (200, "done")
    # 301 turns POST into a GET without body; 307 keeps what it was given
    assert [(r.method, r.body) for r in server.requests] == [
        ("POST", b"payload"),
        ("GET", b""),
        ("GET", b""),
    ]

    server.requests.clear()
    server.redirect("/see", "/c", 303)
    server.redirect("/keep", "/c", 308)
    envelope(run(server.url("/see"), policy, "PUT", body="p"))
    envelope(run(server.url("/keep"), policy, "PUT", body="p"))
    assert [(r.method, r.path, r.body) for r in server.requests] == [
        ("PUT", "/see", b"p"),
        ("GET", "/c", b""),
        ("PUT", "/keep", b"p"),
        ("PUT", "/c", b"p"),
    ]

    # more hops than allowed: the last redirect is the result
    server.requests.clear()
    server.redirect("/loop", "/loop")
    result = envelope(run(server.url("/loop"), policy))
    assert (result["status"], result["ok"]) == (302, False)
    assert len(server.hits("/loop")) == 3


def test_redirect_keeps_credentials_on_the_same_origin_only(server: LocalHttpServer) -> None:
    policy = EgressPolicy(allowed_networks=("127.0.0.1/32",), max_redirects=2)
    server.redirect("/same", "/other")
    server.redirect("/other", f"http://localhost:{server.port}/final")
    server.reply("/final")
    headers = {"Authorization": "Bearer s3cret", "X-Keep": "1"}
    envelope(run(server.url("/same"), policy, headers=headers))
    assert [r.header("Authorization") for r in server.requests] == [
        "Bearer s3cret",
        "Bearer s3cret",
        None,
    ]
    assert [r.header("X-Keep") for r in server.requests] == ["1", "1", "1"]
    assert server.requests[-1].header("Host") == f"localhost:{server.port}"


def test_redirect_targets_are_checked(server: LocalHttpServer) -> None:
    policy = EgressPolicy(allowed_networks=("127.0.0.1/32",), max_redirects=3)
    with LocalHttpServer("::1") as other:
        other.reply("/secret", body="internal")
        server.redirect("/v6", other.url("/secret"))
        assert run(server.url("/v6"), policy) == HttpOutcome(
            False, RESTRICTED.format("::1"), "http_blocked"
        )
        assert other.requests == []
    server.redirect("/meta", "http://169.254.169.254/latest/meta-data/")
    assert run(server.url("/meta"), policy) == HttpOutcome(
        False, RESTRICTED.format("169.254.169.254"), "http_blocked"
    )
    server.redirect("/ftp", "ftp://example.com/")
    assert run(server.url("/ftp"), policy).value == (
        "Blocked: unsupported URL scheme 'ftp'. Only http and https are allowed."
    )
    listed = EgressPolicy(allowed_hosts=("localhost",), max_redirects=1)
    assert run("http://localhost:1/", listed).value == RESTRICTED.format("localhost")


def test_loopback_blocked_by_default(server: LocalHttpServer) -> None:
    server.reply("/x", body="secret")
    default = EgressPolicy()
    port = server.port
    cases = {
        server.url("/x"): "127.0.0.1",
        f"http://localhost:{port}/x": "localhost",
        f"http://[::ffff:127.0.0.1]:{port}/x": "::ffff:127.0.0.1",
        f"http://[::1]:{port}/x": "::1",
    }
    for url, host in cases.items():
        assert run(url, default) == HttpOutcome(False, RESTRICTED.format(host), "http_blocked")
    assert run(server.url("/x"), EgressPolicy(enabled=False)).code == "http_blocked"
    assert run("gopher://x/", default).value.startswith("Blocked: unsupported URL scheme 'gopher'")
    assert server.requests == []


def test_exemptions_let_loopback_through(server: LocalHttpServer) -> None:
    server.reply("/x", body="hello")
    assert envelope(run(server.url("/x"), EgressPolicy(allow_all=True)))["body"] == "hello"
    assert envelope(run(server.url("/x"), LOOPBACK))["body"] == "hello"
    # a name is resolved once and the checked address is used; Host still names the host
    assert envelope(run(f"http://localhost:{server.port}/x", LOOPBACK))["body"] == "hello"
    assert server.requests[-1].header("Host") == f"localhost:{server.port}"


def test_ipv6_literal_url() -> None:
    with LocalHttpServer("::1") as v6:
        v6.reply("/six", body="over ipv6")
        url = v6.url("/six")
        assert url.startswith("http://[::1]:")
        policy = EgressPolicy(allowed_networks=("::1/128",))
        assert envelope(run(url, policy))["body"] == "over ipv6"
        assert v6.requests[0].header("Host") == f"[::1]:{v6.port}"
        assert run(url, LOOPBACK).value == RESTRICTED.format("::1")
        assert len(v6.requests) == 1


def test_cancellation_propagates(server: LocalHttpServer) -> None:
    server.hang("/hang")

    async def scenario() -> float:
        request = {
            "type": "HTTP",
            "method": "GET",
            "url": server.url("/hang"),
            "body": None,
            "headers": None,
            "timeout_seconds": 30,
            "idempotency_key": "k",
        }
        task = asyncio.create_task(perform(request, LOOPBACK))
        while not server.hits("/hang"):
            await asyncio.sleep(0.01)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - started

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) < 1


# --- TLS: the checked address is dialled, SNI and verification use the real name -----------


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, list[str | None]]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    names: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda _sock, name, _ctx: names.append(name)
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1], names
    stop.set()
    thread.join(2)
    sock.close()


def test_https_pins_address_but_uses_real_name(tls_server: tuple[int, list[str | None]]) -> None:
    port, names = tls_server
    outcome = run(f"https://localhost:{port}/", LOOPBACK)
    # the self-signed certificate is not trusted: verification is on
    assert outcome.code == "http_connection"
    assert "CERTIFICATE_VERIFY_FAILED" in outcome.value
    assert names == ["localhost"]
