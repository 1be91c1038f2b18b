"""Read a learned prompt back as words: the vocabulary tokens nearest to each virtual token.

Lester et al. (2021, §7) interpret a trained prompt by listing, for each virtual token, its
nearest neighbours in the model's input embedding table by cosine similarity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..accessors import input_embeddings, weight_of
from .injector import get_injector, require_bank


@torch.no_grad()
def describe_soft_prompt(model: nn.Module, tokenizer: Any, k: int = 5,
                         name: str | None = None) -> list[list[tuple[str, float]]]:
    """The `k` vocabulary tokens nearest to each virtual token of a soft-prompted model.

    Similarity is the cosine between a virtual token (the prompt the model actually sees, i.e.
    after the P-tuning encoder if there is one) and each row of
    `model.get_input_embeddings().weight`. Only ids the tokenizer knows are candidates (some
    models pad their embedding table beyond the tokenizer's vocabulary).

    Args:
        model (`PreTrainedModel`): a model carrying a soft prompt (`add_soft_prompt`).
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer; tokens are returned as
            `tokenizer.convert_ids_to_tokens` spells them (e.g. `"Ġgreat"` for byte-level BPE).
        k (`int`, defaults to 5): neighbours per virtual token.
        name (`str`, *optional*): which prompt; defaults to the active one.

    Returns:
        One list per virtual token, in prompt order, of `(token, cosine_similarity)` pairs sorted
        from the most to the least similar.

    Example:
        ```python
        for i, neighbours in enumerate(describe_soft_prompt(model, tokenizer, k=3)):
            print(i, neighbours)  # 0 [('Ġreview', 0.41), ('Ġsentiment', 0.38), ('Ġrating', 0.35)]
        ```
    """
    if get_injector(model) is None:
        raise ValueError(
            f"{type(model).__name__} carries no soft prompt to describe; call add_soft_prompt (or "
            "load_soft_prompt) first."
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}. Typical values are 3 to 10.")
    weight = weight_of(input_embeddings(model)).detach()
    num_candidates = min(weight.shape[0], len(tokenizer))
    vocab = nn.functional.normalize(weight[:num_candidates].float(), dim=-1)  # (V, D)
    bank = require_bank(model)
    prompt = bank[bank.resolve(name)]().detach().to(vocab.device).float()  # (P, D)
    similarity = nn.functional.normalize(prompt, dim=-1) @ vocab.T  # (P, V)
    values, ids = similarity.topk(min(k, num_candidates), dim=-1)
    return [
        [(str(tokenizer.convert_ids_to_tokens(i)), v) for i, v in zip(row_ids, row_values, strict=True)]
        for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
    ]


def format_nearest_tokens(neighbours: list[list[tuple[str, float]]]) -> str:
    """A plain-text table of `describe_soft_prompt` output, one line per virtual token.

    Tokens are shown with `repr`, so leading spaces and BPE markers stay visible.

    Example:
        ```python
        print(format_nearest_tokens(describe_soft_prompt(model, tokenizer)))
        # virtual token  nearest vocabulary tokens (cosine similarity)
        #             0  'Ġreview' 0.412  'Ġsentiment' 0.384  ...
        ```
    """
    lines = ["virtual token  nearest vocabulary tokens (cosine similarity)"]
    for index, row in enumerate(neighbours):
        cells = "  ".join(f"{token!r} {similarity:.3f}" for token, similarity in row)
        lines.append(f"{index:>13}  {cells}")
    return "\n".join(lines) + "\n"
