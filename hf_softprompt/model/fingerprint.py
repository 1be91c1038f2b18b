"""Which base model a prompt belongs to, by its weights rather than by where they were loaded from.

A prompt is a few rows in the space of one model's input embeddings: it fits the weights it was
trained on, wherever they sit. `base_model_name_or_path` names a Hub id or a local path, and paths
move (a virtual environment, another machine, a converted copy), while other weights can sit at
the same path. So a save records a fingerprint of the input-embedding table, and a load (and
`PromptEmbedder`) compares it with the table it is given.

The fingerprint is the L2 norm of 16 fixed rows (those a tiny vocabulary has). It is cheap (16
rows, whatever the vocabulary); the same for the table in float32, bfloat16 or float16 (compared
with a relative tolerance of 1 %, above the rounding of half precision) and for a table with rows
appended (`resize_token_embeddings`); and far apart for other weights: two independently trained
tables of one width agree on a row's norm within 1 % by chance for a few rows, never for all 16.
"""

from __future__ import annotations

import math

import torch

from ..distributed import full_table

FINGERPRINT_VERSION = "norms-v1"
# Low rows, so every tokenizer has them and rows appended later never change them; spread to avoid
# the special tokens most vocabularies start with.
_ROWS = tuple(11 + 17 * i for i in range(16))
RELATIVE_TOLERANCE = 1e-2


def embedding_fingerprint(table: torch.Tensor) -> str:
    """The fingerprint of a (vocabulary, width) input-embedding table, as a short string."""
    table = full_table(table)
    rows = [r for r in _ROWS if r < table.shape[0]] or [0]  # a tiny test vocabulary has fewer
    norms = table.detach()[rows].float().norm(dim=-1).tolist()
    return f"{FINGERPRINT_VERSION}:{table.shape[1]}:" + ",".join(f"{n:.6g}" for n in norms)


def same_weights(saved: str, current: str) -> bool | None:
    """Whether two fingerprints come from the same table; None when one cannot be read (another
    version of the format), so the caller falls back on the base model's name."""
    a, b = _parse(saved), _parse(current)
    if a is None or b is None:
        return None
    (width_a, norms_a), (width_b, norms_b) = a, b
    common = min(len(norms_a), len(norms_b))  # a vocabulary resized across the sampled rows keeps its first ones
    return width_a == width_b and all(math.isclose(x, y, rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-6)
                                      for x, y in zip(norms_a[:common], norms_b[:common], strict=True))


def _parse(fingerprint: str) -> tuple[int, list[float]] | None:
    version, _, rest = fingerprint.partition(":")
    width, _, norms = rest.partition(":")
    if version != FINGERPRINT_VERSION:
        return None
    try:
        return int(width), [float(n) for n in norms.split(",")]
    except ValueError:
        return None
