"""Workflow graphs built in Python: the SQL DSL's builders and operators, mirrored.

::

    from pgdurable import dsl as df

    graph = (
        df.sql("SELECT id, total FROM orders WHERE id = 7").named("o")
        >> df.call("billing.charge", {"order_id": "$o.id"}).named("c")
        >> "UPDATE orders SET charged = $c.charged WHERE id = 7"
    )
    graph.to_json()   # what SELECT df.start(...) takes

A :class:`Node` produces exactly the JSON text the SQL builders produce for the same graph
(``df.sql``, ``~>``, ``|=>``, ...; tests/test_python_api.py checks every builder), and each
builder checks its arguments as its SQL twin does, with the same messages. Plain strings
stand for SQL steps wherever a node is expected, as plain text does in SQL. Pure: no I/O.

Operators: ``a >> b`` is ``a ~> b`` (then), ``a & b`` is a JOIN, ``a | b`` a RACE, and
``a.named("x")`` is ``a |=> 'x'``. Python's own precedence applies (``>>`` binds tighter than
``&``, which binds tighter than ``|``); parenthesise as in SQL when unsure.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Union

from .core.model import is_step_name

__all__ = [
    "Node",
    "as_node",
    "break_",
    "call",
    "http",
    "http_multipart",
    "if_",
    "if_rows",
    "join",
    "loop",
    "map_",
    "race",
    "retry",
    "seq",
    "sleep",
    "sql",
    "timeout",
    "wait_for_schedule",
    "wait_for_signal",
]

Step = Union["Node", str]
"""A node, or a string: the SQL step it is (as plain text is in the SQL DSL)."""

_RESULT_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_HTTP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
_MULTIPART_METHODS = ("POST", "PUT", "PATCH")


@dataclass(frozen=True)
class Node:
    """One node of a workflow graph and the nodes under it (immutable)."""

    node_type: str
    left: Node | None = None
    right: Node | None = None
    condition: Node | None = None
    extras: tuple[Node, ...] = ()
    query: str | None = None
    result_name: str | None = None

    def named(self, name: str) -> Node:
        """This node with its result named ``name`` (``|=> 'name'``; ``df.as``)."""
        if name == "":
            raise ValueError("df.as: result name cannot be empty")
        if not _RESULT_NAME.fullmatch(name):
            raise ValueError(
                f"df.as: result name '{name}' is not a valid identifier — must match"
                " [a-zA-Z_][a-zA-Z0-9_]*"
            )
        return replace(self, result_name=name)

    def then(self, other: Step) -> Node:
        """This, then ``other`` (``~>``; ``df.seq``)."""
        return seq(self, other)

    def __rshift__(self, other: Step) -> Node:
        return seq(self, other)

    def __rrshift__(self, other: str) -> Node:
        return seq(other, self)

    def __and__(self, other: Step) -> Node:
        return join(self, other)

    def __rand__(self, other: str) -> Node:
        return join(other, self)

    def __or__(self, other: Step) -> Node:
        return race(self, other)

    def __ror__(self, other: str) -> Node:
        return race(other, self)

    def to_json(self) -> str:
        """The graph as the JSON text the SQL builders produce (what df.start takes)."""
        parts = ['{"node_type":', _string(self.node_type)]
        for key, child in (
            ("left_node", self.left),
            ("right_node", self.right),
            ("condition_node", self.condition),
        ):
            if child is not None:
                parts += [f',"{key}":', child.to_json()]
        if self.extras:
            parts += [',"extra_nodes":[', ",".join(e.to_json() for e in self.extras), "]"]
        if self.query is not None:
            parts += [',"query":', _string(self.query)]
        if self.result_name is not None:
            parts += [',"result_name":', _string(self.result_name)]
        return "".join([*parts, "}"])

    def __str__(self) -> str:
        return self.to_json()


def as_node(step: Step) -> Node:
    """``step`` as a node: a string is a SQL step."""
    if isinstance(step, Node):
        return step
    if isinstance(step, str):
        return sql(step)
    raise TypeError(f"a workflow step is a Node or SQL text, not {type(step).__name__}")


# -- steps --------------------------------------------------------------------------------------


def sql(query: str) -> Node:
    """A SQL step (``df.sql``): one statement, taken literally."""
    return Node("SQL", query=query)


def call(name: str, args: Mapping[str, Any] | None = None) -> Node:
    """A Python step (``df.call``): the step registered as ``name``, with ``args`` as its
    keyword arguments (named results and variables are substituted into their strings)."""
    if not is_step_name(name):
        raise ValueError(f"df.call: invalid step name '{name}'")
    if args is not None and not isinstance(args, Mapping):
        raise ValueError(
            f"df.call: args must be a JSON object of keyword arguments, not {type(args).__name__}"
        )
    return Node("CALL", query=f'{{"name":{_string(name)},"args":{_jsonb(dict(args or {}))}}}')


def sleep(seconds: int) -> Node:
    """A durable timer (``df.sleep``)."""
    if seconds < 0:
        raise ValueError("Sleep duration must be non-negative")
    return Node("SLEEP", query=str(int(seconds)))


def wait_for_schedule(cron_expr: str) -> Node:
    """Wait for the next tick of a cron schedule (``df.wait_for_schedule``; the expression
    is checked by df.start and when the wait begins)."""
    return Node("WAIT_SCHEDULE", query=f'{{"cron_expr":{_string(cron_expr)}}}')


def wait_for_signal(name: str, timeout_seconds: int | None = None) -> Node:
    """Wait for a signal sent with df.signal (``df.wait_for_signal``)."""
    if not name:
        raise ValueError("Signal name cannot be empty")
    if timeout_seconds is not None and timeout_seconds <= 0:
        raise ValueError("Timeout must be positive")
    timeout = "null" if timeout_seconds is None else str(int(timeout_seconds))
    return Node("SIGNAL", query=f'{{"signal_name":{_string(name)},"timeout_seconds":{timeout}}}')


def http(
    url: str,
    method: str = "POST",
    body: str | None = None,
    headers: Mapping[str, Any] | None = None,
    timeout_seconds: int = 30,
) -> Node:
    """An HTTP request (``df.http``)."""
    _http_check("df.http", url)
    method = method.upper()
    if method not in _HTTP_METHODS:
        raise ValueError(f"Invalid HTTP method: {method}. Must be GET, POST, PUT, DELETE, or PATCH")
    if timeout_seconds <= 0:
        raise ValueError("Timeout must be positive")
    body_json = "null" if body is None else _string(body)
    config = (
        f'{{"url":{_string(url)},"method":{_string(method)},"body":{body_json},'
        f'"headers":{_headers(headers)},"timeout_seconds":{int(timeout_seconds)}}}'
    )
    return Node("HTTP", query=config)


def http_multipart(
    url: str,
    method: str = "POST",
    parts: Sequence[Mapping[str, Any]] | None = None,
    headers: Mapping[str, Any] | None = None,
    timeout_seconds: int = 30,
) -> Node:
    """A multipart/form-data request (``df.http_multipart``)."""
    _http_check("df.http_multipart", url)
    method = method.upper()
    if method not in _MULTIPART_METHODS:
        raise ValueError(
            f"Invalid HTTP method for multipart: {method}. Must be POST, PUT, or PATCH"
        )
    if parts is None:
        raise ValueError("parts is required and cannot be NULL")
    if isinstance(parts, str | bytes | Mapping) or not isinstance(parts, Sequence):
        raise ValueError("parts must be a JSON array of part objects")
    if not parts:
        raise ValueError("parts must contain at least one part")
    if timeout_seconds <= 0:
        raise ValueError("Timeout must be positive")
    config = (
        f'{{"url":{_string(url)},"method":{_string(method)},"parts":{_jsonb(list(parts))},'
        f'"headers":{_headers(headers)},"timeout_seconds":{int(timeout_seconds)}}}'
    )
    return Node("HTTP_MULTIPART", query=config)


def break_(value: str | None = None) -> Node:
    """Leave the nearest enclosing loop, which completes with ``value`` (``df.break``)."""
    return Node("BREAK", query=f'{{"break_value":{"null" if value is None else _string(value)}}}')


# -- combinators --------------------------------------------------------------------------------


def seq(a: Step, b: Step) -> Node:
    """``a``, then ``b`` (``df.seq``, ``~>``)."""
    return Node("THEN", left=as_node(a), right=as_node(b))


def join(a: Step, b: Step, c: Step | None = None) -> Node:
    """Branches in parallel; the result is the array of their results (``df.join``, ``&``;
    with ``c``, ``df.join3``)."""
    extras = () if c is None else (as_node(c),)
    return Node("JOIN", left=as_node(a), right=as_node(b), extras=extras)


def race(a: Step, b: Step) -> Node:
    """Both in parallel; the first to finish decides (``df.race``, ``|``)."""
    return Node("RACE", left=as_node(a), right=as_node(b))


def if_(condition: Step, then_branch: Step, else_branch: Step) -> Node:
    """Run ``condition``; then ``then_branch`` if its result is truthy, else ``else_branch``
    (``df.if``, ``?> !>``)."""
    return Node(
        "IF", left=as_node(then_branch), right=as_node(else_branch), condition=as_node(condition)
    )


def if_rows(result_name: str, then_branch: Step, else_branch: Step) -> Node:
    """Branch on whether the named result has rows (``df.if_rows``)."""
    config = f'{{"condition_type":"result_has_rows","result_name":{_string(result_name)}}}'
    return Node("IF", left=as_node(then_branch), right=as_node(else_branch), query=config)


def loop(body: Step, condition: Step | None = None) -> Node:
    """Repeat ``body`` until a break, or while ``condition`` holds after each pass
    (``df.loop``, ``@>``)."""
    return Node(
        "LOOP", left=as_node(body), condition=None if condition is None else as_node(condition)
    )


def map_(
    source: str,
    body: Step,
    max_parallel: int = 10,
    item_name: str = "item",
    collect_errors: bool = False,
) -> Node:
    """Run ``body`` for each row of the named result ``source`` (or each element of a JSON
    array), at most ``max_parallel`` at once, the item named ``item_name`` inside it
    (``df.map``)."""
    if not _RESULT_NAME.fullmatch(source or ""):
        raise ValueError("df.map: source must be the name of an earlier result")
    if not _RESULT_NAME.fullmatch(item_name or ""):
        raise ValueError("df.map: item_name must be a valid result name")
    if not 1 <= max_parallel <= 1000:
        raise ValueError("df.map: max_parallel must be an integer from 1 to 1000")
    config = (
        f'{{"source":{_string(source)},"item":{_string(item_name)},'
        f'"max_parallel":{int(max_parallel)},"collect_errors":{_jsonb(bool(collect_errors))}}}'
    )
    return Node("MAP", left=as_node(body), query=config)


def retry(
    step: Step,
    max_attempts: int,
    backoff_seconds: float = 1,
    max_backoff_seconds: float = 60,
    retry_on: Sequence[str] | None = None,
) -> Node:
    """Run ``step`` again when it fails, with exponential backoff (``df.retry``)."""
    if max_attempts < 1:
        raise ValueError("df.retry: max_attempts must be at least 1")
    if backoff_seconds < 0:
        raise ValueError("df.retry: backoff_seconds must be non-negative")
    if not math.isfinite(backoff_seconds):
        raise ValueError("df.retry: backoff_seconds must be finite")
    if max_backoff_seconds < backoff_seconds:
        raise ValueError("df.retry: max_backoff_seconds must be at least backoff_seconds")
    if not math.isfinite(max_backoff_seconds):
        raise ValueError("df.retry: max_backoff_seconds must be finite")
    if retry_on is not None and (isinstance(retry_on, str) or not retry_on or not all(retry_on)):
        raise ValueError(
            "df.retry: retry_on must list error codes (SQLSTATE codes or classes, or http,"
            " http_5xx, http_timeout, http_connection, timeout, python)"
        )
    codes = "null" if retry_on is None else "[" + ",".join(map(_string, retry_on)) + "]"
    config = (
        f'{{"max_attempts":{int(max_attempts)},"backoff_seconds":{_seconds(backoff_seconds)},'
        f'"max_backoff_seconds":{_seconds(max_backoff_seconds)},"retry_on":{codes}}}'
    )
    return Node("RETRY", left=as_node(step), query=config)


def timeout(step: Step, seconds: float) -> Node:
    """Fail ``step`` if it runs longer than ``seconds`` (``df.timeout``)."""
    if seconds <= 0:
        raise ValueError("Timeout must be positive")
    if not math.isfinite(seconds):
        raise ValueError("df.timeout: seconds must be finite")
    return Node("TIMEOUT", left=as_node(step), query=f'{{"timeout_seconds":{_seconds(seconds)}}}')


# -- JSON text as PostgreSQL writes it ----------------------------------------------------------


def _string(text: str) -> str:
    """A JSON string as to_json(text) writes it (non-ASCII kept, control characters escaped)."""
    return json.dumps(text, ensure_ascii=False)


def _seconds(value: float) -> str:
    """A number of seconds as df._json_seconds writes it: float8 to numeric (15 significant
    digits), without an exponent or a needless fraction."""
    text = format(Decimal(format(float(value), ".15g")), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def _headers(headers: Mapping[str, Any] | None) -> str:
    return "null" if headers is None else _jsonb(dict(headers))


def _jsonb(value: Any) -> str:
    """``value`` as df._jsonb_compact writes a jsonb: object keys in jsonb's order (shorter
    first, then bytewise), numbers as numeric prints them, no spaces."""
    if isinstance(value, Mapping):
        keys = sorted(value, key=lambda k: (len(str(k).encode()), str(k).encode()))
        return "{" + ",".join(f"{_string(str(k))}:{_jsonb(value[k])}" for k in keys) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_jsonb(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} cannot be written in JSON")
        return format(Decimal(repr(value + 0.0)), "f")  # + 0.0: -0.0 is 0.0, as in jsonb
    if isinstance(value, str):
        return _string(value)
    raise TypeError(f"{type(value).__name__} cannot be written in JSON")


def _http_check(builder: str, url: str) -> None:
    if "{" not in url:
        scheme = url.split("://", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise ValueError(
                f"Blocked: unsupported URL scheme '{scheme}'. Only http and https are allowed."
            )
