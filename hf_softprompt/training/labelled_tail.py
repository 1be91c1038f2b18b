"""A causal LM's loss with its LM head over the labelled tail of the batch only.

A prompt is trained on short answers after long inputs: most positions of a batch carry label
-100 and predict nothing, yet the LM head (a (D, vocabulary) matmul, a fifth of a small model's
compute) and the cross-entropy run over all of them. When every row's labels start within the last
`k - 1` positions (left-padded batches: the answers end together), the step asks the model for
its last `k` logits (`logits_to_keep=k`, which transformers' causal LMs take) and passes the last
`k` labels: the same predicted tokens, the same loss, 9 % less time per step on the main job's
rows (SmolLM2-135M, benchmarks/bench_labelled_tail.py).

Only where nothing reads the logits: `compute_loss` without `return_outputs` (a training step) and
`prediction_step` with `prediction_loss_only` (a held-out loss pass, where `Trainer.prediction_step`
returns the loss alone), and only for a Trainer whose `compute_loss` (and, for the second,
`prediction_step`) is `Trainer`'s own, with no `compute_loss_func` and no label smoothing. TRL's
trainers, which read the logits for their metrics, keep full logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import Trainer

from ..model.injector import get_injector
from ..model.labels import FULL_SEQUENCE_LOSS_FLAGS


def labelled_tail_inputs(trainer: Trainer, inputs: Any) -> Any:
    """`inputs` with `logits_to_keep=k` and the last `k` labels where the step can skip the LM head
    over the unlabelled front of the batch (see the module docstring); else `inputs` unchanged."""
    injector = None if trainer.model is None else get_injector(trainer.model)
    if (injector is None or not injector.decoder_only or not injector.spec.shifts_labels
            or "logits_to_keep" not in injector.facts.accepts
            or trainer.compute_loss_func is not None or trainer.label_smoother is not None
            or not isinstance(inputs, Mapping) or "logits_to_keep" in inputs or "shift_labels" in inputs
            or any(inputs.get(flag) for flag in FULL_SEQUENCE_LOSS_FLAGS)):
        return inputs
    labels = inputs.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        return inputs
    length = labels.shape[1]
    labelled = (labels != -100).any(0).nonzero()
    if labelled.numel() == 0:
        return inputs
    # Logits at position t predict labels[:, t + 1], and labels[:, 0] is never predicted: keeping
    # the last k positions keeps every target when none sits before position length - k + 1.
    keep = length - max(int(labelled[0]), 1) + 1
    if keep >= length:
        return inputs
    return {**inputs, "labels": labels[:, length - keep:], "logits_to_keep": keep}


def compute_loss_over_labelled_tail(stock: Callable, trainer: Trainer, model: Any, inputs: Any, *args: Any,
                                    **kwargs: Any) -> Any:
    """`stock` (`Trainer.compute_loss`) with a training step's inputs cut to the labelled tail."""
    return_outputs = kwargs.get("return_outputs", args[0] if args else False)
    if not return_outputs:
        inputs = labelled_tail_inputs(trainer, inputs)
    return stock(model, inputs, *args, **kwargs)


def prediction_step_over_labelled_tail(stock: Callable, trainer: Trainer, model: Any, inputs: Any,
                                       prediction_loss_only: bool, *args: Any, **kwargs: Any) -> Any:
    """`stock` (`Trainer.prediction_step`) with a loss-only pass's inputs cut to the labelled tail."""
    if prediction_loss_only:
        inputs = labelled_tail_inputs(trainer, inputs)
    return stock(model, inputs, prediction_loss_only, *args, **kwargs)


def runs_trainer_method(trainer: Trainer, name: str, through: type | None = None) -> bool:
    """Whether a call of `trainer`'s method `name` runs `Trainer`'s own: the first class of its MRO
    that defines `name` is `Trainer`, or `through` (a class whose `name` calls `super()`) and then
    `Trainer`. Any other override, above `through` or below it, may read what `Trainer`'s returns."""
    owners = [cls for cls in type(trainer).__mro__ if name in vars(cls)]
    if through is not None and owners[:1] == [through]:
        owners = owners[1:]
    return owners[:1] == [Trainer]
