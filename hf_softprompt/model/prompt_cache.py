"""The shared prompt cache: decoder-only models run each prompt once per call, not once per row.

In a causal model the P virtual positions attend only to each other, so their hidden states and
per-layer keys/values are the same for every row that uses the prompt. `SharedPromptCache` runs
the distinct prompts of a call once, as one batch of K rows (shorter prompts front-padded with
filler slots that the attention mask hides), and gives the call a fresh `DynamicCache` holding,
for every row, the keys/values of its own prompt: a batch over K prompts costs about K·P + B·L
tokens instead of B·(P+L). With one prompt the cache tensors are `expand`ed views of one pass;
with several, each row's are gathered from the K rows of the pass. The backward of `expand`/`index_select` sums each
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
from typing import Any, cast

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ..accessors import model_config
from ..distributed import is_fsdp_sharded
from .positions import positions_from_mask
from .rows import NO_PROMPT, RowPrompts, bare_calls, rows_in_use
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

    def reason_against(self, kwargs: dict[str, Any], device: torch.device,
                       rows: RowPrompts | None = None) -> str | None:
        """Why the call with these (first-call) arguments, on `device`, with these `rows`, must
        concatenate the prompt; None when it can use the shared cache. Logs the path taken, once per
        model and reason."""
        reason = self.model_reason or call_reason(self.model, self.spec, kwargs, self.cache_key)
        if reason is SHARED and self.setting is None and device.type != "cpu" and self.needs_graph():
            reason = (f"training on {device.type}, where the extra prompt pass (forward and backward) costs "
                      "more than it saves (1.3-2.0x slower steps on an H100); "
                      "SoftPromptConfig(shared_prompt_cache=True) forces the shared path")
        if reason is SHARED and self.setting is None and rows is not None and \
                rows.batch_size - int(rows.rows_of(NO_PROMPT).numel()) <= len(rows.slots):
            # One row per prompt (e.g. generate() at batch 1): nothing to share, and the prompt pass
            # would be one more forward call.
            reason = "each prompt serves a single row, so there is nothing to share"
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
        cache = DynamicCache() if into is None else into
        for idx, (keys, values) in enumerate(self._run_prompts(prompts, rows)):
            if idx == len(cache.layers):
                cache.layers.append(DynamicLayer())
            # `into` passed `call_reason`: an empty DynamicCache, all of whose layers are DynamicLayers.
            layer = cast(DynamicLayer, cache.layers[idx])
            # What `DynamicLayer.lazy_initialization` sets: in transformers 5.19 a `dtype` too, an attribute
            # later versions no longer declare (hence set untyped).
            cast(Any, layer).dtype = keys.dtype
            layer.device = keys.device
            layer.keys, layer.values = self._rows(keys, rows), self._rows(values, rows)
            layer.is_initialized = True
        return cache

    @staticmethod
    def _rows(per_slot: torch.Tensor, rows: RowPrompts) -> torch.Tensor:
        """(K, H, width, D_head) keys or values of the K prompts -> (B, H, width, D_head), each row its
        own prompt's (zeros for rows without one)."""
        if rows.single_slot is not None:
            return per_slot.expand(rows.batch_size, -1, -1, -1)  # views of one pass
        table = torch.cat([per_slot, per_slot.new_zeros(1, *per_slot.shape[1:])])  # + rows with no prompt
        return table.index_select(0, (rows.index % table.shape[0]).to(table.device))  # -1 -> the zeros

    def _run_prompts(self, prompts: Sequence[torch.Tensor], rows: RowPrompts) -> _KeyValues:
        """One pass of the base model over the K prompts alone, as a batch of K rows front-padded to
        the longest: per-layer (K, H_kv, width, D_head) keys/values, zero at the filler slots."""
        width = rows.width
        device = prompts[0].device
        lengths = torch.tensor([p.shape[0] for p in prompts], device=device)
        mask = (torch.arange(width, device=device).unsqueeze(0) >= (width - lengths).unsqueeze(1)).long()  # (K, w)
        embeds = torch.stack([torch.cat([p.new_zeros(width - p.shape[0], p.shape[1]), p]) for p in prompts])
        cache = DynamicCache(config=model_config(self.model).get_text_config(decoder=True))
        # The base model's call (a feature-extraction model is its own base model and carries the
        # injection: it computes bare inside `bare_calls`). Modules a prompt owns see a call of K
        # rows, one per prompt.
        own_rows = RowPrompts(rows.slots, rows.lengths, torch.arange(len(prompts), device=device))
        padded = bool((mask == 0).any())
        with bare_calls(self.model), rows_in_use(own_rows):
            self.base(inputs_embeds=embeds, attention_mask=mask if padded else None, use_cache=True,
                position_ids=positions_from_mask(mask), return_dict=True,
                **{self._base_cache_key: cache})
        keep = mask.view(len(prompts), 1, width, 1).bool()
        if not padded:
            return _key_values(cache)
        # Filler slots are masked for every real token; zero them so no stray value can leak.
        return [(keys.masked_fill(~keep, 0), values.masked_fill(~keep, 0)) for keys, values in _key_values(cache)]


def _key_values(cache: Cache) -> _KeyValues:
    """Per layer, the (keys, values) a prompt pass wrote into `cache`. `model_reason` admits only
    models whose cache layers are all `DynamicLayer`s, which the pass fills: transformers types the
    layers as any kind, their tensors as optional."""
    return [(cast(torch.Tensor, layer.keys), cast(torch.Tensor, layer.values))
            for layer in cast(list[DynamicLayer], cache.layers)]


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
    layers = DynamicCache(config=model_config(model).get_text_config(decoder=True)).layers
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
    if torch.is_grad_enabled() and is_fsdp_sharded(model):
        # FSDP reshards a layer's weights once the gradient of its first call is done; the prompt
        # pass is a second call of every layer, whose backward then finds them freed.
        return "the model is sharded with FSDP, whose backward serves one call per layer and step"
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
