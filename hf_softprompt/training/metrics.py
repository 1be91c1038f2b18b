"""`PerPromptMetrics`: a `compute_metrics` that also reports each prompt's own rows.

The Trainer hands `compute_metrics` the label columns named in `TrainingArguments.label_names`;
with `label_names=["labels", "soft_prompt_ids"]` it gets each row's prompt id next to its labels
(and still passes the column to the model, which chooses each row's prompt from it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from transformers import EvalPrediction

from ..model.rows import NO_PROMPT


class PerPromptMetrics:
    """Wrap a `compute_metrics` function: its metrics over all rows, and over each prompt's rows
    as `<prompt name>_<metric>` (`<no_prompt_label>_<metric>`, by default `none_<metric>`, for rows
    without a prompt). Keys never overwrite each other: a prompt named like the label is refused at
    construction, and two groups that would write one key (prompt `a_b` with metric `c` and prompt
    `a` with metric `b_c`) are refused with both named.

    Args:
        compute_metrics (`Callable[[EvalPrediction], dict]`): the metrics of one group of rows.
        prompt_names (`Sequence[str]`): the model's prompts in order, `soft_prompt_names(model)`
            (a `soft_prompt_ids` value is a position in this list).
        no_prompt_label (`str`, defaults to `"none"`): the key prefix of rows without a prompt.

    Example:
        ```python
        args = TrainingArguments(..., label_names=["labels", "soft_prompt_ids"])
        trainer = SoftPromptTrainer(..., soft_prompt_config={"sentiment": cfg1, "topics": cfg2},
                                    compute_metrics=PerPromptMetrics(accuracy, ["sentiment", "topics"]))
        trainer.evaluate()  # {"eval_accuracy": ..., "eval_sentiment_accuracy": ..., "eval_topics_accuracy": ...}
        ```
    """

    def __init__(self, compute_metrics: Callable[[EvalPrediction], dict[str, Any]],
                 prompt_names: Sequence[str], no_prompt_label: str = "none") -> None:
        self.compute_metrics = compute_metrics
        self.prompt_names = list(prompt_names)
        if no_prompt_label in self.prompt_names:
            raise ValueError(
                f"A prompt is named {no_prompt_label!r}, the label of rows without a prompt: their metrics "
                f"would overwrite each other. Pass PerPromptMetrics(..., no_prompt_label='...') with a label "
                f"that is not one of {self.prompt_names}."
            )
        self.no_prompt_label = no_prompt_label

    def __call__(self, prediction: EvalPrediction) -> dict[str, Any]:
        labels = prediction.label_ids
        if not isinstance(labels, (tuple, list)) or len(labels) != 2:
            raise ValueError(
                "PerPromptMetrics needs each row's prompt id next to its labels: pass "
                "TrainingArguments(label_names=['labels', 'soft_prompt_ids']) (and a soft_prompt_ids column)."
            )
        labels, ids = labels[0], np.asarray(labels[1]).reshape(-1)
        metrics = dict(self.compute_metrics(EvalPrediction(predictions=prediction.predictions, label_ids=labels)))
        for prompt_id in sorted(set(ids.tolist())):
            rows = np.flatnonzero(ids == prompt_id)
            name = self.no_prompt_label if prompt_id == NO_PROMPT else self.prompt_names[prompt_id]
            part = self.compute_metrics(EvalPrediction(predictions=_rows(prediction.predictions, rows),
                                                       label_ids=_rows(labels, rows)))
            keys = {f"{name}_{key}": value for key, value in part.items()}
            clash = sorted(set(keys) & set(metrics))
            if clash:
                raise ValueError(
                    f"The metrics of prompt {name!r} would overwrite {clash} (a key of all rows, or of another "
                    "prompt whose name and metric join to the same text). Rename a prompt, or its metric."
                )
            metrics.update(keys)
        return metrics


def _rows(values: Any, rows: np.ndarray) -> Any:
    if isinstance(values, (tuple, list)):
        return type(values)(_rows(v, rows) for v in values)
    return None if values is None else np.asarray(values)[rows]
