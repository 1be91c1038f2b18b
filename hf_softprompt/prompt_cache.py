"""The shared prompt cache: decoder-only models run each prompt once per call, not once per row.

In a causal model the P virtual positions attend only to each other, so their hidden states and
per-layer keys/values are the same for every row that uses the prompt. `SharedPromptCache` runs
each distinct prompt of a call alone (batch size 1) and gives the call a fresh `DynamicCache`
holding, for every row, the keys/values of its own prompt: a batch over K prompts costs about
K·P + B·L tokens instead of B·(P+L). With one prompt the cache tensors are `expand`ed views of one
pass; with several, rows are gathered from the K passes (shorter prompts front-padded with zero
filler slots that the attention mask hides). The backward of `expand`/`index_select` sums each
prompt's gradient over its own rows only.

The keys/values are computed anew for every call (`generate` computes them once, at its first
step): nothing is kept between calls, so no edit of the prompt or of the base weights (optimizer
steps, `load_state_dict`, `.data` writes, `model.to(dtype)`) can leave a stale cache, and calls
from several threads share no state.

The injector asks `reason_against` first; when it returns a reason, it concatenates the prompt
to every row as usual. Each decision is logged once per model and reason.

Training on an accelerator concatenates too: there a step is bound by kernel launches more than by
token count, and the prompt pass (every layer again, forward and backward, for P tokens) made a
training step 1.3-2.0x slower than concatenation on an H100 (benchmarks/gpu_results.md).
Evaluation and `generate` there still share the prompt.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .routing import RowPrompts, rows_in_use
from .tasks import TaskSpec, cache_argument, is_decoder_only

logger = logging.getLogger(__name__)

SHARED = None  # `reason_against` result when the shared path applies

_KeyValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (1, H_kv, n, D_head) keys, values


class SharedPromptCache:
    """Computes each prompt's keys/values once per call and hands the call a cache that holds them.

    Args:
        model (`PreTrainedModel`): the soft-prompted model (decoder-only for the cache to apply).
        spec (`TaskSpec`): how the model's task head reads labels and outputs.
        setting (`bool`, *optional*): `SoftPromptConfig.shared_prompt_cache`: None where faster,
            True wherever possible, False never.
        front (`bool`, defaults to `True`): whether the prompt sits in front of the input.
    """

    def __init__(
        self, model: nn.Module, spec: TaskSpec, setting: bool | None = None, front: bool = True
    ) -> None:
        self.model = model
        self.spec = spec
        self.base = getattr(model, "base_model", model)
        self.setting = setting
        self.model_reason = model_reason(model, self.base, setting is not False, front)
        self.cache_key = cache_argument(model)  # the real call's cache argument
        self._base_cache_key = cache_argument(self.base)  # the prompt pass's (read once, not per step)
        self._logged: set[str | None] = set()

    def reason_against(self, kwargs: dict[str, Any], device: torch.device) -> str | None:
        """Why the call with these (first-call) arguments, on `device`, must concatenate the prompt;
        None when it can use the shared cache. Logs the path taken, once per model and reason."""
        reason = self.model_reason or call_reason(self.model, self.spec, kwargs, self.cache_key)
        if reason is SHARED and self.setting is None and device.type != "cpu" and self.needs_graph():
            reason = (f"training on {device.type}, where the extra prompt pass (forward and backward) costs "
                      "more than it saves (1.3-2.0x slower steps on an H100); "
                      "SoftPromptConfig(shared_prompt_cache=True) forces the shared path")
        if reason not in self._logged:  # two threads may both log it: harmless
            self._logged.add(reason)
            name = type(self.model).__name__
            if reason is SHARED:
                logger.info("%s: soft prompt computed once per batch (shared prompt cache).", name)
            else:
                logger.info("%s: soft prompt concatenated to every row (plain path): %s.", name, reason)
        return reason

    def needs_graph(self) -> bool:
        """Whether a prompt pass now must be recorded for backward (training, or grad enabled with
        trainable parameters)."""
        return self.model.training or (
            torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters())
        )

    def build(self, prompts: Sequence[torch.Tensor], rows: RowPrompts, into: Cache | None = None) -> Cache:
        """A cache holding, for each row, the keys/values of its prompt: `prompts[k]` ((P_k, D),
        already in the model's dtype) is slot k of `rows`. Fills `into` (an empty `DynamicCache`,
        e.g. the one `generate` made) or a new one.

        Layers grow out of place (`torch.cat`), so the cache tensors are never written to.
        """
        per_slot = [self._run_prompt(prompt, slot, rows) for slot, prompt in enumerate(prompts)]
        width = rows.width
        cache = DynamicCache() if into is None else into
        for idx in range(len(per_slot[0])):
            keys = self._rows([kv[idx][0] for kv in per_slot], rows, width)
            values = self._rows([kv[idx][1] for kv in per_slot], rows, width)
            if idx == len(cache.layers):
                cache.layers.append(DynamicLayer())
            layer = cache.layers[idx]
            layer.dtype, layer.device = keys.dtype, keys.device
            layer.keys, layer.values = keys, values
            layer.is_initialized = True
        return cache

    @staticmethod
    def _rows(per_slot: list[torch.Tensor], rows: RowPrompts, width: int) -> torch.Tensor:
        """(B, H, width, D_head): each row's prompt, front-padded with zeros to `width`."""
        if rows.single_slot is not None:
            return per_slot[0].expand(rows.batch_size, -1, -1, -1)  # views of one pass
        first = per_slot[0]
        padded = [torch.cat([t.new_zeros(1, t.shape[1], width - t.shape[2], t.shape[3]), t], dim=2)
                  for t in per_slot]
        padded.append(first.new_zeros(1, first.shape[1], width, first.shape[3]))  # rows with no prompt
        table = torch.cat(padded)  # (K + 1, H, width, D_head)
        return table.index_select(0, (rows.index % table.shape[0]).to(table.device))  # -1 -> last

    def _run_prompt(self, prompt: torch.Tensor, slot: int, rows: RowPrompts) -> _KeyValues:
        """One pass of the base model over one prompt alone: (1, n, D) -> per-layer keys/values."""
        num = prompt.shape[0]
        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        # A feature-extraction model is its own base model and carries the injection: call its class's
        # forward. Modules the prompt owns see a call of one row, its own.
        run = (lambda **kw: type(self.base).forward(self.base, **kw)) if self.base is self.model else self.base
        single = RowPrompts((rows.slots[slot],), (num,), torch.zeros(1, dtype=torch.long, device=prompt.device))
        with rows_in_use(single):
            run(inputs_embeds=prompt.unsqueeze(0), attention_mask=None, use_cache=True,
                position_ids=torch.arange(num, device=prompt.device).unsqueeze(0),
                return_dict=True, **{self._base_cache_key: cache})
        return [(layer.keys, layer.values) for layer in cache.layers]


def model_reason(model: nn.Module, base: nn.Module, enabled: bool = True, front: bool = True) -> str | None:
    """Why `model` can never share its prompt across rows (None when it can)."""
    if not enabled:
        return "disabled by SoftPromptConfig(shared_prompt_cache=False)"
    if not is_decoder_only(model):
        return "not a decoder-only model, so the prompt's hidden states depend on each row's input"
    if not front:
        return "placement='after_first_token' puts a real token before the prompt"
    # The real pass goes through `model`, the prompt pass through `base`.
    for module, needed in ((model, (cache_argument(model), "position_ids")),
                           (base, (cache_argument(base), "position_ids", "use_cache"))):
        accepted = inspect.signature(module.forward).parameters
        missing = [name for name in needed if name not in accepted]
        if missing:
            return f"{type(module).__name__}.forward takes no {' or '.join(missing)}"
    layers = DynamicCache(config=model.config.get_text_config(decoder=True)).layers
    other = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if other:
        return f"its cache has {', '.join(other)} layers (sliding-window or hybrid attention)"
    return SHARED


def call_reason(model: nn.Module, spec: TaskSpec, kwargs: dict[str, Any], cache_key: str) -> str | None:
    """Why this first call of a sequence must concatenate the prompt (None when it can share it);
    `cache_key` names the call's cache argument."""
    if any(kwargs.get(key) is not None for key in spec.position_labels):
        return "the span loss (start/end positions) is a softmax over every position, virtual ones included"
    if model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        return "activation checkpointing is on, and in training it drops the key/value cache"
    cache = kwargs.get(cache_key)
    if cache is not None and not (
        type(cache) is DynamicCache and not cache.offloading
        and all(type(layer) is DynamicLayer and not layer.is_initialized for layer in cache.layers)
    ):
        return f"the call passes a {type(cache).__name__} (only an empty DynamicCache can take the prompt)"
    if kwargs.get("token_type_ids") is not None:
        return "the call passes token_type_ids"
    if kwargs.get("output_attentions"):
        return "output_attentions=True asks for the attention of every virtual position"
    return SHARED
