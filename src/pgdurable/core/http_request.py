"""The request an HTTP or HTTP_MULTIPART node sends, with its variables substituted.

Pure: the interpreter calls this when the node starts, and the worker performs the request
described by the returned payload. Substitution happens in raw mode into the URL, the body,
string header values, and multipart part names, filenames and ``data_b64`` (the latter only
when the whole value is one reference, so base64 text is never spliced together).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .model import Node
from .substitute import SubstitutionError, substitute_raw

__all__ = ["build_request", "idempotency_key"]

# A whole-value reference: $name, $name?, $name.col, $name.col?, or {var}.
_WHOLE_REFERENCE = re.compile(
    r"\$[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?\??|\{[A-Za-z_][A-Za-z0-9_]*\}"
)


def idempotency_key(stamp: str, node_id: str) -> str:
    """The Idempotency-Key of a step: the same for every attempt of one execution of a node
    (a redelivery after a crash, a df.retry), different per loop iteration."""
    return f"pgdurable:{stamp}:{node_id}"


def build_request(
    node: Node,
    names: Mapping[str, str],
    variables: Mapping[str, str],
    instance_id: str,
    label: str | None,
    key: str,
) -> dict[str, Any]:
    """The task payload for ``node``; raises SubstitutionError with the text the node fails
    with. Part shapes are checked by the worker, as in pg_durable."""

    def raw(text: str) -> str:
        return substitute_raw(text, names, variables, instance_id, label)

    config = node.config
    headers = config.get("headers")
    payload: dict[str, Any] = {
        "type": node.type,
        "method": str(config.get("method", "POST")).upper(),
        "url": raw(str(config.get("url", ""))),
        "headers": (
            {k: raw(v) for k, v in headers.items() if isinstance(v, str)}
            if isinstance(headers, dict)
            else None
        ),
        "timeout_seconds": config.get("timeout_seconds") or 30,
        "idempotency_key": key,
    }
    if node.type == "HTTP":
        body = config.get("body")
        payload["body"] = raw(body) if isinstance(body, str) else None
    else:
        parts = config.get("parts")
        payload["parts"] = (
            [_part(node, p, raw) for p in parts] if isinstance(parts, list) else parts
        )
    return payload


def _part(node: Node, part: Any, raw: Any) -> Any:
    if not isinstance(part, dict):
        return part
    out = dict(part)
    for field in ("name", "filename"):
        if isinstance(out.get(field), str):
            out[field] = raw(out[field])
    data = out.get("data_b64")
    if isinstance(data, str) and ("$" in data or "{" in data):
        if not _WHOLE_REFERENCE.fullmatch(data.strip()):
            raise SubstitutionError(
                f"HTTP_MULTIPART node {node.id}: data_b64 for part '{out.get('name')}' mixes a "
                "variable reference with other text. Use a single reference such as $name, "
                "$name.column or {variable} as the whole value."
            )
        out["data_b64"] = raw(data.strip())
    return out
