"""`load_soft_prompt`: an adapter from a local directory or a Hub repo, checked against the model
before the model is touched, then attached.

Interop with PEFT (`PeftModel.save_pretrained` / `PeftModel.from_pretrained`), both ways:
- Prompt tuning and P-tuning adapters load either way and give the same outputs for the same
  inputs, the task head of classifiers included (PEFT's `modules_to_save` keys,
  `base_model.classifier.weight`). PEFT returns causal-LM logits with the P virtual positions in
  front; ours are cut to the caller's length.
- P-tuning: PEFT stores only the encoder's output, so a P-tuning adapter saved by PEFT loads here
  as a plain prompt table (same outputs; `is_trainable=True` then trains that table). PEFT reads
  our P-tuning adapters the same way and ignores our extra `hf_softprompt.*` tensors.
- Seq2seq: we write `num_transformer_submodules=1` (one P-row table, for the encoder). PEFT's own
  seq2seq adapters default to 2 and hold 2P rows, but for PROMPT_TUNING and P_TUNING its forward
  and `generate` put only the first P rows on the encoder input and never use the others: we load
  those first P rows, which gives PEFT's outputs.
- What PEFT does not know: `placement="after_first_token"` (PEFT always prepends, so such a prompt
  gives other outputs there), and decoder-only sequence classification, where we pool the last
  real token and PEFT the last position (the two agree when no row is right-padded).
- PEFT refuses `is_trainable=True` for prompt adapters; here it continues training.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn

from .attach import attach_soft_prompt, resolve_trainable_modules
from .config import SoftPromptConfig, TaskType
from .hub import download_files
from .serialization import (
    ADAPTER_BIN_NAME,
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    HEAD_PREFIX,
    PROMPT_KEY,
    check_head_tensors,
    load_head_tensors,
    local_adapter_files,
    prompt_state_dict,
    read_adapter_files,
)
from .tasks import infer_task_type


def load_soft_prompt(
    model: nn.Module,
    repo_id_or_path: str | os.PathLike,
    revision: str | None = None,
    is_trainable: bool = False,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    *,
    local_files_only: bool = False,
    subfolder: str | None = None,
    check_base_model: bool = True,
) -> nn.Module:
    """Put a saved soft prompt (a local directory or a Hub repo) onto `model`, in place.

    Reads adapters written by `save_soft_prompt`, `SoftPromptTrainer` or PEFT (prompt tuning and
    P-tuning): `adapter_config.json` with `adapter_model.safetensors`, or an old
    `adapter_model.bin` read with `torch.load(weights_only=True)`. Before the model is touched,
    the token dimension, task type, base model name and task-head shapes are checked.

    Args:
        model (`PreTrainedModel`): the base model, without a prompt.
        repo_id_or_path (`str` or `os.PathLike`): a local adapter directory, or a Hub repo id.
        revision (`str`, *optional*): branch, tag or commit of the Hub repo.
        is_trainable (`bool`, defaults to `False`): keep the prompt (and the task head) trainable to
            continue training; by default all is frozen.
        token, cache_dir, force_download (*optional*): as in `hf_hub_download`.
        local_files_only (`bool`, defaults to `False`): only the local Hub cache (as `HF_HUB_OFFLINE=1`).
        subfolder (`str`, *optional*): the adapter's folder inside the repo or directory.
        check_base_model (`bool`, defaults to `True`): refuse an adapter trained on a base model of
            another name (checked only when both names are known). `False` skips this check.

    Returns:
        The same model, carrying the prompt.

    Raises:
        ValueError: the adapter does not fit the model, or a file is corrupt.
        FileNotFoundError: neither a local adapter directory nor a Hub repo id.
        HubError: the download failed (missing repo, refused token, unreachable Hub, ...).

    Example:
        ```python
        model = AutoModelForSequenceClassification.from_pretrained("bert-base-uncased")
        model = load_soft_prompt(model, "me/sst2-prompt", revision="main")
        ```
    """
    source = os.fspath(repo_id_or_path)
    local = os.path.join(source, subfolder) if subfolder else source
    if os.path.isdir(local):
        paths = local_adapter_files(local)
    else:
        try:
            validate_repo_id(source)
        except HFValidationError as err:
            raise FileNotFoundError(
                f"{source!r} is neither a local adapter directory nor a Hub repo id ('namespace/name')."
            ) from err
        paths = download_files(
            source, [[ADAPTER_CONFIG_NAME], [ADAPTER_WEIGHTS_NAME, ADAPTER_BIN_NAME]], revision=revision,
            token=token, cache_dir=cache_dir, force_download=force_download,
            local_files_only=local_files_only, subfolder=subfolder,
            note=f"There is no local directory {local!r} either.")
    config, tensors, peft_json = read_adapter_files(*paths)
    check_adapter_fits(model, config, tensors, peft_json, where=source, check_base_model=check_base_model)
    try:
        attach_soft_prompt(model, config, prompt_state_dict(config, tensors), trainable=is_trainable)
    except RuntimeError as err:  # load_state_dict: encoder tensors that do not match the config
        raise ValueError(f"The adapter in {source!r} is inconsistent: its tensors do not match its "
                         f"config ({err}). Save it again.") from err
    load_head_tensors(model, tensors)
    return model


def check_adapter_fits(model: nn.Module, config: SoftPromptConfig, tensors: dict[str, torch.Tensor],
                       peft_json: dict[str, Any], where: str, check_base_model: bool = True) -> None:
    """Raise a `ValueError` naming both values when the adapter does not fit `model`."""
    if not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"load_soft_prompt needs a transformers PreTrainedModel, got {type(model).__name__}.")
    prompt, num = tensors[PROMPT_KEY], config.num_virtual_tokens
    rows = {num, num * int(peft_json.get("num_transformer_submodules") or 1)}  # PEFT seq2seq: 2P
    if prompt.dim() != 2 or prompt.shape[0] not in rows or config.token_dim not in (None, prompt.shape[1]):
        raise ValueError(
            f"The adapter in {where!r} is inconsistent: {PROMPT_KEY} has shape {tuple(prompt.shape)}, "
            f"its config says {num} virtual tokens of width {config.token_dim}. Save it again."
        )
    width = model.get_input_embeddings().weight.shape[1]
    if prompt.shape[1] != width:
        raise ValueError(
            f"The adapter in {where!r} has token_dim={prompt.shape[1]}, but {type(model).__name__} has "
            f"token_dim={width} (its input embedding width). Load the base model it was trained on."
        )
    try:
        task = infer_task_type(model)
    except ValueError:  # a custom class: nothing to compare with
        task = None
    if task is not None and config.task_type not in (None, task, TaskType.FEATURE_EXTRACTION):
        raise ValueError(
            f"The adapter in {where!r} has task_type={config.task_type.value!r}, but "
            f"{type(model).__name__} has task_type={task.value!r}. Load the base model with the "
            "matching head (the AutoModelFor... class of that task)."
        )
    saved_base = config.base_model_name_or_path
    model_base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if check_base_model and saved_base and model_base and not _same_name(saved_base, model_base):
        raise ValueError(
            f"The adapter in {where!r} was trained on base_model_name_or_path={saved_base!r}, but the "
            f"model is {model_base!r}. Load that base model, or pass check_base_model=False if both "
            "names are the same weights."
        )
    check_head_tensors(model, tensors, where)
    _warn_untrained_heads(model, config, tensors, where)


def _warn_untrained_heads(model: nn.Module, config: SoftPromptConfig, tensors: dict[str, torch.Tensor],
                          where: str) -> None:
    saved = [k[len(HEAD_PREFIX):] for k in tensors if k.startswith(HEAD_PREFIX)]
    heads = {id(m) for m in resolve_trainable_modules(model, config)}
    untrained = [n for n, m in model.named_modules()
                 if id(m) in heads and not any(s.startswith(n + ".") for s in saved)]
    if untrained:
        warnings.warn(
            f"The adapter in {where!r} holds no weights for the task head {untrained}: it keeps the base "
            "model's weights (freshly initialised ones give arbitrary predictions).",
            stacklevel=4,  # the caller of load_soft_prompt
        )


def _same_name(a: str, b: str) -> bool:
    a, b = a.rstrip("/\\"), b.rstrip("/\\")
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b))
