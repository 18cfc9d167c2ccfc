"""The dashboard's charts as SVG: completions and failures over time, and an instance's
timeline of steps. Pure: numbers in, SVG text out; every text is escaped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape
from typing import Any

# Leaves of a graph: the nodes that do the work and take time, drawn on the timeline.
STEP_TYPES = frozenset(
    {"SQL", "HTTP", "HTTP_MULTIPART", "CALL", "SLEEP", "WAIT_SCHEDULE", "SIGNAL"}
)


def bar_chart(bars: Sequence[Mapping[str, Any]], label_format: str) -> str:
    """Stacked bars of ``completed`` (below) and ``failed`` (above) per time slot, each bar
    labelled with its ``start`` formatted by ``label_format`` (strftime)."""
    width, height, pad, axis = 720, 160, 28, 18
    n = max(len(bars), 1)
    peak = max((b["completed"] + b["failed"] for b in bars), default=0) or 1
    slot = (width - pad) / n
    bar_width = max(slot * 0.7, 1.0)
    plot = height - axis - 8
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}"'
        f' width="{width}" height="{height}" role="img"'
        f' aria-label="completed and failed instances over time">',
        f'<text x="0" y="12" class="axis">{peak}</text>',
        f'<line x1="{pad}" y1="{8 + plot}" x2="{width}" y2="{8 + plot}" class="axis-line"/>',
    ]
    every = max(1, n // 8)  # at most about eight labels under the bars
    for i, b in enumerate(bars):
        x = pad + i * slot + (slot - bar_width) / 2
        done_h = plot * b["completed"] / peak
        fail_h = plot * b["failed"] / peak
        start = b["start"].strftime(label_format)
        tip = f"{start}: {b['completed']} completed, {b['failed']} failed"
        parts.append(f'<g class="bar"><title>{escape(tip)}</title>')
        if done_h:
            y = 8 + plot - done_h
            parts.append(
                f'<rect class="completed" x="{x:.1f}" y="{y:.1f}" width="{bar_width:.1f}"'
                f' height="{done_h:.1f}"/>'
            )
        if fail_h:
            y = 8 + plot - done_h - fail_h
            parts.append(
                f'<rect class="failed" x="{x:.1f}" y="{y:.1f}" width="{bar_width:.1f}"'
                f' height="{fail_h:.1f}"/>'
            )
        parts.append("</g>")
        if i % every == 0:
            parts.append(f'<text x="{x:.1f}" y="{height - 4}" class="axis">{escape(start)}</text>')
    parts.append("</svg>")
    return "".join(parts)


@dataclass(frozen=True)
class Span:
    """One step on the timeline: when it started and ended (None: still running)."""

    node_id: str
    label: str
    status: str
    start: datetime
    end: datetime | None


def timeline(spans: Sequence[Span], begin: datetime, now: datetime) -> str:
    """One row per step, a bar from its start to its end (or ``now`` while it runs), on an
    axis from ``begin`` (the instance's start) to the latest end."""
    row_h, label_w, width = 22, 260, 760
    ends = [s.end or now for s in spans]
    finish = max([begin, *ends])
    total = max((finish - begin).total_seconds(), 0.001)
    scale = (width - label_w - 70) / total
    height = row_h * len(spans) + 24
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" viewBox="0 0 {width}'
        f' {height}" width="{width}" height="{height}" role="img" aria-label="timeline">',
        f'<text x="{label_w}" y="12" class="axis">0 s</text>',
        f'<text x="{width - 70}" y="12" class="axis" text-anchor="end">{_seconds(total)}</text>',
    ]
    for i, (span, end) in enumerate(zip(spans, ends, strict=True)):
        y = 20 + i * row_h
        x = label_w + max((span.start - begin).total_seconds(), 0) * scale
        w = max((end - span.start).total_seconds() * scale, 2.0)
        took = _seconds((end - span.start).total_seconds())
        label = escape(_cut(span.label, 40))
        parts.append(
            f'<g class="span status-{escape(span.status)}">'
            f"<title>{escape(span.label)} · {escape(span.status)} · {took}</title>"
            f'<a href="#step-{escape(span.node_id)}">'
            f'<text x="0" y="{y + 14}" class="span-label">{label}</text></a>'
            f'<rect x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" rx="3"/>'
            f'<text x="{x + w + 4:.1f}" y="{y + 14}" class="axis">{took}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _seconds(value: float) -> str:
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
