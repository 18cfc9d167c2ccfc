"""examples/embeddings runs as its README says: documents inserted start one workflow each,
a Python step embeds their chunks with a model its package ships, and a similarity query
finds the right document."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "embeddings" / "run.py"


def test_the_embedding_pipeline_finds_the_right_document(tmp_path: Path, capsys: object) -> None:
    spec = importlib.util.spec_from_file_location("embeddings_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    sys.modules["embeddings_example"] = example
    spec.loader.exec_module(example)
    found = example.main(["how do I speed up a slow database query?", "--data-dir", str(tmp_path)])
    assert found[0][0] == "Indexes in PostgreSQL"
    assert found[0][1] > found[1][1]
    log = (tmp_path / "worker.log").read_text()
    assert "Traceback" not in log, log
