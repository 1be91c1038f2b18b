"""Labels of a prompted call: the prompt changes the context, never the set of predicted tokens.

Per-position labels get -100 at every virtual position in the sequence. A causal LM still predicts
`labels[:, 1:]` (the last virtual position would predict `labels[:, 0]`: it predicts nothing), so
the Trainer's count of target tokens, and losses with and without a prompt, compare as they are.
QA spans (start/end token indices) move to where their tokens are.
"""

from __future__ import annotations

import torch

from .layout import VirtualBlock
from .tasks import TaskSpec

# Forward flags of other libraries under which the loss reads the hidden state of every position
# and ignores `logits_to_keep` (TRL's fused LM head): labels must then cover the virtual positions.
FULL_SEQUENCE_LOSS_FLAGS = ("fused_lm_head",)


def tail_labels(kwargs: dict, spec: TaskSpec, length: int) -> bool:
    """Whether a causal LM's labels cover only the last `logits_to_keep` positions of an (B, L) input
    (a training step over the labelled tail, training/labelled_tail.py): the model compares them with
    the logits it keeps, which lie after any prompt."""
    keep, labels = kwargs.get("logits_to_keep"), kwargs.get("labels")
    return (spec.shifts_labels and isinstance(keep, int) and 0 < keep <= length
            and isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] == keep)


def check_label_shapes(kwargs: dict, spec: TaskSpec, batch: int, length: int) -> None:
    """Refuse per-position labels that do not line up with the (B, L) input (or its kept tail)."""
    if tail_labels(kwargs, spec, length):
        return
    for key in spec.per_position_labels:
        labels = kwargs.get(key)
        if labels is not None and (labels.dim() < 2 or labels.shape[:2] != (batch, length)):
            raise ValueError(
                f"{key} has shape {tuple(labels.shape)} for an input of shape {(batch, length)}; give one "
                "label per input token (-100 where none), e.g. the tokenizer's padding for labels too."
            )


def rewrite_labels(kwargs: dict, spec: TaskSpec, block: VirtualBlock, in_sequence: int, length: int,
                   takes_logits_to_keep: bool) -> None:
    """Labels for a first call whose sequence holds `in_sequence` virtual positions (W, or 0 when
    the prompt comes in as a cache)."""
    if not in_sequence or tail_labels(kwargs, spec, length):
        return
    keep = kwargs.get("logits_to_keep")
    keeps_real_only = (  # a causal LM asked for logits at the L real positions only
        spec.shifts_labels and takes_logits_to_keep
        and (keep is None or (isinstance(keep, int) and keep == 0))
        and not any(kwargs.get(flag) for flag in FULL_SEQUENCE_LOSS_FLAGS))
    if keeps_real_only:
        kwargs["logits_to_keep"] = length  # no LM head over virtual positions; labels stay (B, L)
        return
    for key in spec.per_position_labels:
        labels = kwargs.get(key)
        if labels is None:
            continue
        if spec.shifts_labels:  # the last virtual position would predict labels[:, 0]
            labels = torch.cat([labels.new_full((labels.shape[0], 1), -100), labels[:, 1:]], 1)
        kwargs[key] = block.assemble(labels, labels.new_full((labels.shape[0], block.width), -100))
    for key in spec.position_labels:
        if kwargs.get(key) is not None:
            kwargs[key] = block.shift_positions(kwargs[key])
