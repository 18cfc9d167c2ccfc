"""Loading a graph from df.nodes rows (core/model.py): rows may have been written by hand,
bypassing df.start, so loading enforces df.start's limits again."""

from __future__ import annotations

from typing import Any

import pytest
from interp_sim import Sim, rows

from pgdurable.core.model import MAX_DEPTH, MAX_NODES, GraphError, graph_from_rows


def chain(depth: int) -> list[dict[str, Any]]:
    """A THEN chain whose deepest SQL node sits ``depth`` levels below the root."""
    out: list[dict[str, Any]] = []
    for level in range(depth):
        out.append(
            {
                "id": f"t{level:07d}",
                "node_type": "THEN",
                "left_node": f"s{level:07d}",
                "right_node": f"t{level + 1:07d}" if level + 1 < depth else f"s{depth:07d}",
            }
        )
        out.append({"id": f"s{level:07d}", "node_type": "SQL", "query": f"SELECT {level}"})
    out.append({"id": f"s{depth:07d}", "node_type": "SQL", "query": "SELECT 'last'"})
    return out


def test_the_deepest_graph_df_start_accepts_loads_and_runs() -> None:
    graph = graph_from_rows("abcd0123", "t0000000", chain(MAX_DEPTH))
    sim = Sim(graph)
    for level in range(MAX_DEPTH + 1):
        sim.complete(f"s{level:07d}", rows({"n": level}))
    assert sim.outcome is not None and sim.outcome.status == "completed"


def test_deeper_graphs_are_refused_at_load() -> None:
    with pytest.raises(GraphError, match="Graph exceeds maximum nesting depth of 256"):
        graph_from_rows("abcd0123", "t0000000", chain(MAX_DEPTH + 1))


def test_larger_graphs_are_refused_at_load() -> None:
    many = [{"id": "root", "node_type": "SQL", "query": "SELECT 1"}] + [
        {"id": f"x{i:07d}", "node_type": "SQL", "query": "SELECT 1"} for i in range(MAX_NODES)
    ]
    with pytest.raises(GraphError, match="Workflow exceeds maximum node count of 10000"):
        graph_from_rows("abcd0123", "root", many)
