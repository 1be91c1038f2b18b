"""Choices that hold for a block of code, in this thread (or asyncio task) only.

`without_soft_prompt(model)`: the base model under a soft-prompted model. `using_soft_prompt(model,
name)`: calls that name no prompt use `name`, for code that calls the model for you and cannot
pass `soft_prompt_names` (a `pipeline`, an evaluation harness).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .bank import DEFAULT_NAME
from .injector import get_injector, require_bank
from .rows import bare_calls, scoped_calls


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


@contextlib.contextmanager
def using_soft_prompt(model: nn.Module, name: str | None = DEFAULT_NAME) -> Iterator[nn.Module]:
    """Inside the block, calls of `model` that choose no prompt (no `soft_prompt_names` /
    `soft_prompt_ids`) use the prompt `name` for every row; `None`: no prompt. Unlike
    `set_active_soft_prompt`, other threads (and the code after the block) keep their choice.

    Made for code that calls the model for you and passes no extra argument through, such as
    transformers' pipelines: every call they make inside the block uses `name`.

    Example:
        ```python
        classify = pipeline("text-classification", model=model, tokenizer=tokenizer)
        with using_soft_prompt(model, "sentiment"):
            labels = classify(["a wonderful film", "dull"])
        ```
    """
    bank = require_bank(model)
    if name is not None and name not in bank:
        raise ValueError(f"using_soft_prompt names {name!r}, which {type(model).__name__} does not carry; its "
                         f"prompts are {bank.names()}. Use one of those, or None for no prompt.")
    with scoped_calls(model, name):
        yield model
