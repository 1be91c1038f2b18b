"""transformers pipelines with a prompt chosen per call or per input.

A pipeline calls the model itself and passes on only the arguments it knows: `soft_prompt_names`
given to a stock pipeline never reaches the model (text-classification hands unknown arguments to
its tokenizer, which drops them). `prompted_pipeline(pipe)` wraps a pipeline so that its calls take
`soft_prompt_names=`: one name for every input, or one per input. Inputs are grouped by prompt and
each group runs through the stock pipeline inside `using_soft_prompt(model, name)`, so every model
call the pipeline makes (a classifier's forward, each step of `generate()`) uses that prompt; the
outputs come back in the order of the inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..model.injector import require_bank
from ..model.scoped import using_soft_prompt


class PromptedPipeline:
    """A transformers `Pipeline` whose calls take `soft_prompt_names=`; everything else is the
    wrapped pipeline's (attributes, arguments, outputs)."""

    def __init__(self, pipeline: Any) -> None:
        model = getattr(pipeline, "model", None)
        if model is None or not callable(pipeline):
            raise TypeError(f"prompted_pipeline takes a transformers Pipeline, got {type(pipeline).__name__}.")
        require_bank(model)  # a model without prompts has nothing to choose
        self.pipeline = pipeline

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)

    def __call__(self, inputs: Any = None, *args: Any,
                 soft_prompt_names: str | None | Sequence[str | None] = (), **kwargs: Any) -> Any:
        """Run the pipeline; `soft_prompt_names`: a prompt name (or None: no prompt) for every
        input, or a list with one per input of a list of inputs. Not given: the model's active prompt."""
        call_args = () if inputs is None else (inputs, *args)
        if isinstance(soft_prompt_names, str) or soft_prompt_names is None:
            with using_soft_prompt(self.pipeline.model, soft_prompt_names):
                return self.pipeline(*call_args, **kwargs)
        names = list(soft_prompt_names)
        if not names:
            return self.pipeline(*call_args, **kwargs)
        if not isinstance(inputs, (list, tuple)):
            raise TypeError(
                f"soft_prompt_names={names!r} gives one prompt per input, so the inputs must be a list, got "
                f"{type(inputs).__name__}. Pass a list, or one name (soft_prompt_names='...') for every input."
            )
        if len(names) != len(inputs):
            raise ValueError(f"soft_prompt_names has {len(names)} entries for {len(inputs)} inputs; give one per "
                             "input (None: no prompt).")
        outputs: list[Any] = [None] * len(inputs)
        for name in dict.fromkeys(names):  # one pipeline call per prompt, in order of first use
            rows = [i for i, n in enumerate(names) if n == name]
            with using_soft_prompt(self.pipeline.model, name):
                group = self.pipeline([inputs[i] for i in rows], *args, **kwargs)
            if not isinstance(group, list) or len(group) != len(rows):
                raise TypeError(
                    f"{type(self.pipeline).__name__} returned {type(group).__name__} for a list of {len(rows)} "
                    "inputs, not one output per input; call it once per prompt with soft_prompt_names='...'."
                )
            for i, out in zip(rows, group, strict=True):
                outputs[i] = out
        return outputs


def prompted_pipeline(pipeline: Any) -> PromptedPipeline:
    """Wrap a transformers pipeline so that its calls take `soft_prompt_names=` (one name for
    every input, or one per input).

    Example:
        ```python
        classify = prompted_pipeline(pipeline("text-classification", model=model, tokenizer=tokenizer))
        classify(["a wonderful film", "Rates rise again"], soft_prompt_names=["sentiment", "topics"])
        ```
    """
    return PromptedPipeline(pipeline)
