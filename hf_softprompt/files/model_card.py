"""The model card (README.md) pushed with an adapter: Hub metadata, how to load it, its config and
training results."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..config import EncoderType, SoftPromptConfig, TaskType, config_enum

LIBRARY_NAME = "hf-softprompt"
MODEL_CARD_NAME = "README.md"

# How each task head is loaded in the card's snippet, and the Hub's pipeline tag for it.
_TASK_CARD: dict[TaskType, tuple[str, str]] = {
    TaskType.CAUSAL_LM: ("AutoModelForCausalLM", "text-generation"),
    TaskType.SEQ_2_SEQ_LM: ("AutoModelForSeq2SeqLM", "text2text-generation"),
    TaskType.SEQ_CLS: ("AutoModelForSequenceClassification", "text-classification"),
    TaskType.TOKEN_CLS: ("AutoModelForTokenClassification", "token-classification"),
    TaskType.QUESTION_ANS: ("AutoModelForQuestionAnswering", "question-answering"),
    TaskType.MASKED_LM: ("AutoModelForMaskedLM", "fill-mask"),
    TaskType.FEATURE_EXTRACTION: ("AutoModel", "feature-extraction"),
}
# Logged values that describe the run's speed, not the model: left out of the results tables.
_SPEED_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_flos")


def build_model_card(
    config: SoftPromptConfig,
    *,
    base_model: str | None = None,
    repo_id: str | None = None,
    training_results: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    model_name: str | None = None,
    tags: Sequence[str] = (),
    datasets: str | list[str] | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    subfolder: str | None = None,
    other_prompts: Mapping[str, SoftPromptConfig] | None = None,
) -> ModelCard:
    """A model card for the adapter of `config`.

    Args:
        config (`SoftPromptConfig`): the prompt's complete config (as `get_soft_prompt_config` gives it).
        base_model (`str`, *optional*): base model id; defaults to `config.base_model_name_or_path`.
            Written into the metadata only when it is a Hub repo id (not a local path).
        repo_id (`str`, *optional*): where the adapter lives, for the loading snippet.
        training_results (*optional*): final metrics (`{"eval_accuracy": 0.91, ...}`) or a Trainer
            `state.log_history` (a list of logged dicts), rendered as results tables.
        model_name (`str`, *optional*): the card's title; defaults to the repo name.
        tags (`Sequence[str]`, defaults to `()`): extra metadata tags.
        datasets, license, language (*optional*): Hub metadata, passed through.
        subfolder (`str`, *optional*): the adapter's folder in the repo (a named prompt of a set).
        other_prompts (*optional*): `{name: config}` of the other prompts saved with this one
            (in `<name>/` folders), listed on the card.

    Returns:
        A `huggingface_hub.ModelCard`; `card.save(path)` writes it.

    Example:
        ```python
        card = build_model_card(get_soft_prompt_config(model), repo_id="me/sst2-prompt",
                                training_results=trainer.state.log_history)
        card.save("out/README.md")
        ```
    """
    base_model = base_model or config.base_model_name_or_path
    task = config_enum(TaskType, config.task_type or TaskType.FEATURE_EXTRACTION, "task_type")
    auto_class, pipeline_tag = _TASK_CARD[task]
    method, kind = _method(config)
    all_tags = [LIBRARY_NAME, "soft-prompt", method, *(t for t in tags if t)]
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=base_model if _is_repo_id(base_model) else None,
        tags=list(dict.fromkeys(all_tags)),
        pipeline_tag=pipeline_tag,
        datasets=datasets,
        license=license,
        language=language,
    )
    title = model_name or subfolder or (repo_id.split("/")[-1] if repo_id else "Soft prompt")
    base_text = f"[`{base_model}`](https://huggingface.co/{base_model})" if _is_repo_id(base_model) else (
        f"`{base_model}`" if base_model else "its base model")
    sections = [
        f"# {title}",
        f"A soft prompt of {config.num_virtual_tokens} virtual tokens ({kind}) for {base_text}, trained "
        f"with `{LIBRARY_NAME}`. Only the prompt (and any "
        "trained task head) is stored here, in PEFT's adapter layout; the base model's weights are not.",
        "## How to load",
        _load_snippet(auto_class, base_model, config.base_model_gguf_file, repo_id, _subfolder_args(subfolder)),
        "The files also load with PEFT (`PeftModel.from_pretrained(base, repo_id)`); PEFT places the "
        "prompt in front of the input, so outputs match when `placement` is `front`.",
        "## Configuration",
        _table(["Field", "Value"], [[k, _fmt(v)] for k, v in sorted(config.to_dict().items())
                                    if v is not None]),
    ]
    if other_prompts:
        sections += ["## Other prompts in this repo", _prompt_list(other_prompts) + "\n\n"
                     "`load_soft_prompt(model, repo_id)` loads them all; `name=\"...\"` picks one."]
    results = _results_section(training_results)
    if results:
        sections += ["## Training results", results]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def build_prompt_set_card(configs: Mapping[str, SoftPromptConfig], *, repo_id: str | None = None) -> ModelCard:
    """The root card of a set of named prompts saved without a `"default"` one."""
    first = next(iter(configs.values()))
    base_model = first.base_model_name_or_path
    auto_class, pipeline_tag = _TASK_CARD[config_enum(TaskType, first.task_type or TaskType.FEATURE_EXTRACTION,
                                                      "task_type")]
    data = ModelCardData(library_name=LIBRARY_NAME, base_model=base_model if _is_repo_id(base_model) else None,
                         tags=[LIBRARY_NAME, "soft-prompt", "multi-prompt"], pipeline_tag=pipeline_tag)
    title = repo_id.split("/")[-1] if repo_id else "Soft prompts"
    text = "\n\n".join([
        f"# {title}",
        f"{len(configs)} soft prompts for `{base_model or 'its base model'}`, trained with `{LIBRARY_NAME}`, "
        "each in its own folder (PEFT's multi-adapter layout):",
        _prompt_list(configs),
        "## How to load",
        _load_snippet(auto_class, base_model, first.base_model_gguf_file, repo_id, "",
                      comment="  # every prompt, by name"),
    ])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}\n")


def is_our_card(path: str | os.PathLike) -> bool:
    """Whether the README.md at `path` is a card this library wrote (so it may be replaced)."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(2000)
    except (OSError, UnicodeDecodeError):
        return False
    return head.startswith("---") and f"library_name: {LIBRARY_NAME}" in head


def _prompt_list(configs: Mapping[str, SoftPromptConfig]) -> str:
    rows = []
    for name, config in configs.items():
        kind = _method(config)[1]
        rows.append([f"`{name}`", f"`{name}/`" if name != "default" else "root",
                     str(config.num_virtual_tokens), kind])
    return _table(["Prompt", "Folder", "Virtual tokens", "Method"], rows)


def _method(config: SoftPromptConfig) -> tuple[str, str]:
    """The card's tag for the prompt's method, and its name in a sentence."""
    if config.is_p_tuning:
        encoder = config_enum(EncoderType, config.encoder, "encoder").value.upper()
        return "p-tuning", f"P-tuning with an {encoder} encoder"
    if config.is_reparameterized:
        return "residual-prompt-tuning", "residual prompt tuning"
    return "prompt-tuning", "prompt tuning"


def _load_snippet(auto_class: str, base_model: str | None, gguf_file: str | None, source: str | None,
                  extra_args: str, comment: str = "") -> str:
    """The card's loading code, runnable as written where the base model and the adapter are."""
    base_args = json.dumps(base_model or "<base-model>")
    if gguf_file:
        base_args += f", gguf_file={json.dumps(gguf_file)}"
    where = json.dumps(source or "<this-repo-or-folder>")
    code = ("```python\n"
            f"from transformers import {auto_class}\nfrom hf_softprompt import load_soft_prompt\n\n"
            f"base = {auto_class}.from_pretrained({base_args})\n"
            f"model = load_soft_prompt(base, {where}{extra_args}){comment}\n```")
    if base_model and not _is_repo_id(base_model):
        code += ("\n\nThe base model was loaded from a local path. A copy of the same weights loads from any "
                 "path: the adapter records a fingerprint of the base model's input embeddings "
                 "(`base_model_fingerprint`) and `load_soft_prompt` checks that, not the path.")
    return code


def _subfolder_args(subfolder: str | None) -> str:
    return f", name=\"{subfolder}\"" if subfolder else ""


def _results_section(training_results: Any) -> str:
    """Markdown for final metrics (a mapping) or a Trainer log history (a list of dicts)."""
    if not training_results:
        return ""
    if isinstance(training_results, Mapping):
        final = dict(training_results)
        evals: list[Mapping[str, Any]] = []
    else:
        history = [dict(row) for row in training_results]
        evals = [row for row in history if any(k.startswith("eval_") for k in row)]
        final = dict(evals[-1]) if evals else {}
        final.update({k: v for row in history if "train_runtime" in row for k, v in row.items()})
    out = []
    final = {k: v for k, v in final.items() if k not in ("epoch", "step") and not k.endswith(_SPEED_SUFFIXES)}
    if final:
        out.append(_table(["Metric", "Value"], [[k, _fmt(v)] for k, v in sorted(final.items())]))
    if len(evals) > 1:
        metrics = sorted({k for row in evals for k in row if k.startswith("eval_")
                          and not k.endswith(_SPEED_SUFFIXES)})
        columns = ["epoch", "step", *metrics]
        out.append(_table(columns, [[_fmt(row.get(c, "")) for c in columns] for row in evals]))
    return "\n\n".join(out)


def _is_repo_id(name: str | None) -> bool:
    """Whether `name` can be a Hub repo id (the Hub rejects cards whose base_model is a local path)."""
    if not name or os.path.isabs(name) or name.startswith(".") or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
