"""`without_soft_prompt(model)`: the base model under a soft-prompted model, for a block of code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .injector import get_injector
from .rows import bare_calls


@contextlib.contextmanager
def without_soft_prompt(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, `model` computes exactly as its bare base model: no prompt goes in, task
    heads are the base model's, outputs are not touched (like PEFT's `disable_adapter()`).

    Calls go through the model as usual (`model(...)`, `model.generate(...)`), so module hooks
    (accelerate's, FSDP's) run as they do for any call. A `soft_prompt_names`/`soft_prompt_ids`
    argument given inside the block is dropped: the block asks for no prompt. The block covers
    this thread (or asyncio task) only: calls from other threads keep their prompts.

    Example:
        ```python
        with without_soft_prompt(model):
            reference_logits = model(**batch).logits
        ```
    """
    injector = get_injector(model)
    if injector is None:
        raise ValueError(f"{type(model).__name__} carries no soft prompt; call the model as it is.")
    with bare_calls(model):
        yield model
