"""The one table of how task heads differ, and how a model's task and family are recognised."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import TaskType


@dataclass(frozen=True)
class TaskSpec:
    """What the injector must do for one task head.

    Attributes:
        per_position_labels: label keys with one entry per input token; virtual positions get -100.
        position_labels: label keys holding token indices (QA spans); shifted past the prompt.
        per_position_outputs: output fields with one entry per token; virtual positions are cut out
            so the caller sees outputs aligned with `input_ids` and `labels`.
        default_trainable: base submodules trained with the prompt when the config does not say
            (the freshly initialised task heads of classification and QA models).
        shifts_labels: the model's loss shifts per-position labels by one (causal LM), so the last
            virtual position predicts the first label.
    """

    per_position_labels: tuple[str, ...] = ()
    position_labels: tuple[str, ...] = ()
    per_position_outputs: tuple[str, ...] = ("hidden_states", "last_hidden_state")
    default_trainable: tuple[str, ...] = ()
    shifts_labels: bool = False


_HIDDEN = ("hidden_states", "last_hidden_state")
_HEADS = ("classifier", "score", "classification_head", "qa_outputs")

TASK_SPECS: dict[TaskType, TaskSpec] = {
    TaskType.CAUSAL_LM: TaskSpec(("labels",), (), ("logits", *_HIDDEN), shifts_labels=True),
    TaskType.MASKED_LM: TaskSpec(("labels",), (), ("logits", *_HIDDEN)),
    TaskType.TOKEN_CLS: TaskSpec(("labels",), (), ("logits", *_HIDDEN), _HEADS),
    TaskType.QUESTION_ANS: TaskSpec(
        (), ("start_positions", "end_positions"), ("start_logits", "end_logits", *_HIDDEN), _HEADS
    ),
    # Pooled heads: labels and logits are per example, nothing to shift or cut.
    TaskType.SEQ_CLS: TaskSpec((), (), _HIDDEN, _HEADS),
    TaskType.FEATURE_EXTRACTION: TaskSpec((), (), _HIDDEN),
    # The prompt goes on the encoder input; decoder labels and logits are never touched.
    TaskType.SEQ_2_SEQ_LM: TaskSpec((), (), ()),
}


def infer_task_type(model: nn.Module) -> TaskType:
    """The task head of `model`, read from transformers' Auto* mappings by class name."""
    from transformers.models.auto import modeling_auto as auto

    mappings: list[tuple[TaskType, Mapping[str, str | Sequence[str]]]] = [
        (TaskType.SEQ_2_SEQ_LM, auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
        (TaskType.CAUSAL_LM, auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
        (TaskType.SEQ_CLS, auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
        (TaskType.TOKEN_CLS, auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
        (TaskType.QUESTION_ANS, auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES),
        (TaskType.MASKED_LM, auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
        (TaskType.FEATURE_EXTRACTION, auto.MODEL_MAPPING_NAMES),
    ]
    name = type(model).__name__
    for task, mapping in mappings:
        # A mapping value is a class name, or a tuple of names for some model types.
        if any(name in ((v,) if isinstance(v, str) else v) for v in mapping.values()):
            return task
    # Fall back on the class-name suffix for classes the mappings do not list (custom subclasses).
    suffixes = {
        "ForCausalLM": TaskType.CAUSAL_LM, "LMHeadModel": TaskType.CAUSAL_LM,
        "ForConditionalGeneration": TaskType.SEQ_2_SEQ_LM,
        "ForSequenceClassification": TaskType.SEQ_CLS,
        "ForTokenClassification": TaskType.TOKEN_CLS,
        "ForQuestionAnswering": TaskType.QUESTION_ANS, "ForMaskedLM": TaskType.MASKED_LM,
    }
    for suffix, task in suffixes.items():
        if name.endswith(suffix):
            return task
    allowed = ", ".join(t.value for t in TaskType)
    raise ValueError(
        f"Cannot infer the task type of {name}. Pass SoftPromptConfig(task_type=...), one of {allowed}."
    )


def known_task_type(model: nn.Module) -> TaskType | None:
    """The task head of `model`, or None for a class transformers' mappings and suffixes do not know
    (a custom class: nothing to compare a config's task_type with)."""
    try:
        return infer_task_type(model)
    except ValueError:
        return None


def is_decoder_only(model: nn.Module) -> bool:
    """Whether `model` is a decoder-only (causal) architecture.

    Rule: not encoder-decoder, and its `model_type` has a causal-LM class but no masked-LM class
    (BERT-like encoders have both). Decoder-only models take `generate`-style positions from the
    attention mask and pool the last real token for sequence classification.
    """
    from transformers.models.auto import modeling_auto as auto

    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return False
    model_type = getattr(config, "model_type", None)
    return (
        model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def cache_argument(module: nn.Module) -> str:
    """The name `module.forward` gives its key/value cache: `cache` from transformers 5.24 on,
    `past_key_values` before (5.24 still accepts the old name, with a deprecation warning)."""
    accepted = inspect.signature(module.forward).parameters
    return "cache" if "cache" in accepted else "past_key_values"


# Config keys that hold a model's maximum number of positions, in the order they are read.
MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def max_positions(model_config: Any) -> int | None:
    """The model's maximum number of positions, when its config (a `PretrainedConfig` or the dict
    of its config.json) says; None when it names no limit."""
    for key in MAX_POSITION_KEYS:
        value = model_config.get(key) if isinstance(model_config, Mapping) else getattr(model_config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
