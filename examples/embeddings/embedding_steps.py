"""The pipeline's Python step: embed one chunk of text and store its vector.

The model is tokenlearn-static-model's: static word embeddings (64 dimensions, a 10,000-word
vocabulary), shipped inside the package, so nothing is downloaded when it runs.
"""

from __future__ import annotations

from static_model import get_embeddings

from pgdurable import StepContext, step


def embed(text: str) -> list[float]:
    """The text's embedding (unit length)."""
    vector = get_embeddings(text)
    assert isinstance(vector[0], float)
    return vector  # type: ignore[return-value]


def as_vector(values: list[float]) -> str:
    """A pgvector literal."""
    return "[" + ",".join(f"{v:.6f}" for v in values) + "]"


@step("embeddings.embed_chunk")
def embed_chunk(ctx: StepContext, chunk_id: int, text: str) -> dict[str, int]:
    """Embed the chunk and write its vector, in the transaction that records the step."""
    ctx.conn.execute(
        "UPDATE chunks SET embedding = %s::vector WHERE id = %s", (as_vector(embed(text)), chunk_id)
    )
    return {"chunk": chunk_id}
