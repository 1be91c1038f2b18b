"""The shared prompt cache: decoder-only models run the prompt once per batch, not once per row.

In a causal model the P virtual positions attend only to each other, so their hidden states and
per-layer keys/values are the same for every row. `SharedPromptCache` runs them with batch size 1
and gives each call a fresh `DynamicCache` whose tensors are `expand`ed views of those keys/values:
a batch costs about P + B·L tokens instead of B·(P+L), and the backward of `expand` sums the
prompt's gradient over the rows. Without a graph to build (`generate`, evaluation under no_grad)
the keys/values are kept and reused until a parameter of the model changes.

The injector asks `reason_against` first; when it returns a reason, it concatenates the prompt
to every row as usual. Each decision is logged once per model and reason.

Training on an accelerator concatenates too: there a step is bound by kernel launches more than by
token count, and the prompt pass (every layer again, forward and backward, for P tokens) made a
training step 1.3-2.0x slower than concatenation on an H100 (benchmarks/gpu_results.md).
Evaluation and `generate` there still share the prompt: without a graph its keys/values are
computed once and kept, so the shared path only saves work.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .tasks import TaskSpec, cache_argument, is_decoder_only

logger = logging.getLogger(__name__)

SHARED = None  # `reason_against` result when the shared path applies

_KeyValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (1, H_kv, n, D_head) keys, values


class SharedPromptCache:
    """Computes the prompt's keys/values once and hands out per-call caches that hold them.

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
        self._kept: tuple[tuple, _KeyValues] | None = None  # (key, keys/values) from a no-graph pass
        self._logged: set[str | None] = set()

    def reason_against(self, kwargs: dict[str, Any], device: torch.device) -> str | None:
        """Why the call with these (first-call) arguments, on `device`, must concatenate the prompt;
        None when it can use the shared cache. Logs the path taken, once per model and reason."""
        reason = self.model_reason or call_reason(self.model, self.spec, kwargs, self.cache_key)
        if reason is SHARED and self.setting is None and device.type != "cpu" and self.needs_graph():
            reason = (f"training on {device.type}, where the extra prompt pass (forward and backward) costs "
                      "more than it saves (1.3-2.0x slower steps on an H100); "
                      "SoftPromptConfig(shared_prompt_cache=True) forces the shared path")
        if reason not in self._logged:
            self._logged.add(reason)
            name = type(self.model).__name__
            if reason is SHARED:
                logger.info("%s: soft prompt computed once per batch (shared prompt cache).", name)
            else:
                logger.info("%s: soft prompt concatenated to every row (plain path): %s.", name, reason)
        return reason

    def build(self, prompt: torch.Tensor, batch: int, into: Cache | None = None) -> Cache:
        """A cache holding the keys/values of `prompt` ((n, D), already in the model's dtype) for
        `batch` rows: `into` (an empty `DynamicCache`, e.g. the one `generate` made), or a new one.

        The cache tensors are (batch, H_kv, n, D_head) `expand`ed views of one pass; layers grow
        out of place, so the views are never written to.
        """
        cache = DynamicCache() if into is None else into
        for idx, (keys, values) in enumerate(self._key_values(prompt)):
            if idx == len(cache.layers):
                cache.layers.append(DynamicLayer())
            layer = cache.layers[idx]
            layer.dtype, layer.device = keys.dtype, keys.device
            layer.keys = keys.expand(batch, -1, -1, -1)
            layer.values = values.expand(batch, -1, -1, -1)
            layer.is_initialized = True
        return cache

    def needs_graph(self) -> bool:
        """Whether a prompt pass now must be recorded for backward (or may differ per call, as
        dropout does in training), so its keys/values cannot be kept."""
        return self.model.training or (
            torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters())
        )

    def _key_values(self, prompt: torch.Tensor) -> _KeyValues:
        """Per-layer keys/values of the prompt: reused while no graph is needed and no parameter
        changed (optimizer steps and `load_state_dict` bump `_version`, `.data =` moves the pointer)."""
        if self.needs_graph():
            self._kept = None
            return self._run_prompt(prompt)
        device = prompt.device.type
        autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
        key = (prompt.shape, prompt.dtype, prompt.device, autocast,
               tuple((p.data_ptr(), p._version) for p in self.model.parameters()))
        if self._kept is None or self._kept[0] != key:
            self._kept = (key, self._run_prompt(prompt))
        return self._kept[1]

    def _run_prompt(self, prompt: torch.Tensor) -> _KeyValues:
        """One pass of the base model over the prompt alone: (1, n, D) -> per-layer keys/values."""
        num = prompt.shape[0]
        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        # A feature-extraction model is its own base model and carries the injection hooks:
        # `forward` skips them.
        run = self.base.forward if self.base is self.model else self.base
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

