"""Adapter files in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`, and pushing them.

Export (what inference and PEFT need): `prompt_embeddings`, the (P, D) prompt already through
the P-tuning encoder. Training state (what exact resume needs): the raw embedding table and the
encoder weights under `hf_softprompt.*`, and trained task heads under PEFT's `base_model.*` keys.
PEFT ignores the extra tensors; our own config rides in the safetensors metadata, so the JSON
holds only keys PEFT knows. What matches PEFT and what does not: see loading.py.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import torch
from huggingface_hub import CommitInfo
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .attach import resolve_trainable_modules
from .config import SoftPromptConfig, TaskType
from .hub import push_files
from .inject import PROMPT_MODULE_NAME, get_injector
from .modelcard import MODEL_CARD_NAME, build_model_card

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_BIN_NAME = "adapter_model.bin"  # older PEFT adapters: read with torch.load(weights_only=True)
ADAPTER_FILES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)
PROMPT_KEY = "prompt_embeddings"
STATE_PREFIX = "hf_softprompt."
HEAD_PREFIX = "base_model."
METADATA_CONFIG_KEY = "hf_softprompt_config"


def peft_config_dict(config: SoftPromptConfig, model: nn.Module) -> dict[str, Any]:
    """`config` as PEFT's `PromptTuningConfig` / `PromptEncoderConfig` JSON."""
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_names = [n for n, _ in _trainable_module_items(model, config)]
    out: dict[str, Any] = {
        "auto_mapping": None,
        "base_model_name_or_path": config.base_model_name_or_path,
        "inference_mode": True,
        "modules_to_save": head_names or None,
        "num_attention_heads": getattr(text_config, "num_attention_heads", None),
        "num_layers": getattr(text_config, "num_hidden_layers", None),
        # One prompt table, on the encoder for seq2seq (PEFT would otherwise expect 2P rows).
        "num_transformer_submodules": 1,
        "num_virtual_tokens": config.num_virtual_tokens,
        "revision": None,
        "task_type": config.task_type.value if config.task_type is not TaskType.MASKED_LM else None,
        "token_dim": config.token_dim,
    }
    if config.is_p_tuning:
        out.update(
            peft_type="P_TUNING",
            encoder_reparameterization_type=config.encoder.value.upper(),
            encoder_hidden_size=config.encoder_hidden_size or config.token_dim,
            encoder_num_layers=config.encoder_num_layers,
            encoder_dropout=config.encoder_dropout,
        )
    else:
        out.update(
            peft_type="PROMPT_TUNING",
            prompt_tuning_init=config.init.value.upper(),
            prompt_tuning_init_text=config.init_text,
            tokenizer_name_or_path=config.tokenizer_name_or_path,
            tokenizer_kwargs=config.tokenizer_kwargs,
        )
    return out


def config_from_peft_dict(data: dict[str, Any]) -> SoftPromptConfig:
    """A `SoftPromptConfig` from a PEFT `adapter_config.json` (for adapters PEFT saved)."""
    peft_type = data.get("peft_type")
    if peft_type not in ("PROMPT_TUNING", "P_TUNING"):
        raise ValueError(
            f"adapter_config.json has peft_type={peft_type!r}; only PROMPT_TUNING and P_TUNING "
            "adapters are soft prompts."
        )
    # No encoder even for P_TUNING: PEFT saves only the encoder's output, which is the prompt.
    return SoftPromptConfig(
        num_virtual_tokens=int(data["num_virtual_tokens"]),
        task_type=data.get("task_type"),
        token_dim=data.get("token_dim"),
        base_model_name_or_path=data.get("base_model_name_or_path"),
    )


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the adapter files hold: export, training state and trained heads."""
    injector = _require_prompt(model)
    prompt = getattr(model, PROMPT_MODULE_NAME)
    with torch.no_grad():
        tensors = {PROMPT_KEY: prompt().detach().float().cpu().contiguous()}
    if injector.config.is_p_tuning:
        for name, value in prompt.state_dict().items():
            tensors[STATE_PREFIX + name] = value.detach().cpu().contiguous()
    for name, module in _trainable_module_items(model, injector.config):
        for param_name, value in module.state_dict().items():
            tensors[f"{HEAD_PREFIX}{name}.{param_name}"] = value.detach().cpu().contiguous()
    return tensors


def save_soft_prompt(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    push_to_hub: bool = False,
    repo_id: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tokenizer: Any | None = None,
) -> list[str]:
    """Write the adapter of a soft-prompted model into `save_directory`, and optionally push it.

    Each file is written to a temporary name and renamed into place, so a crash never leaves a
    half-written adapter where the last good one was.

    Args:
        model (`PreTrainedModel`): a model carrying a soft prompt.
        save_directory (`str` or `os.PathLike`): where `adapter_config.json` and
            `adapter_model.safetensors` go (created if missing).
        push_to_hub (`bool`, defaults to `False`): also upload the adapter files, a model card
            (README.md) and the tokenizer files, if given, to `repo_id` in one commit. Nothing else in
            `save_directory` is uploaded, and never the base model's weights.
        repo_id (`str`, *optional*): the Hub repo; defaults to the name of `save_directory`.
            Created if missing (`private` applies then).
        token, private, commit_message, revision, create_pr: passed to the Hub upload.
        tokenizer (*optional*): a tokenizer saved next to the adapter (and pushed with it).

    Returns:
        The paths written locally.

    Raises:
        HubError: the push failed (the message names the repo and what to check); the local files
            are complete, and calling again retries the push.

    Example:
        ```python
        save_soft_prompt(model, "out/adapter", push_to_hub=True, repo_id="me/sst2-prompt")
        ```
    """
    injector = _require_prompt(model)
    os.makedirs(save_directory, exist_ok=True)
    config_json = json.dumps(peft_config_dict(injector.config, model), indent=2, sort_keys=True) + "\n"
    metadata = {"format": "pt", METADATA_CONFIG_KEY: injector.config.to_json_string()}
    weights_path = os.path.join(save_directory, ADAPTER_WEIGHTS_NAME)
    config_path = os.path.join(save_directory, ADAPTER_CONFIG_NAME)
    tensors = adapter_state_dict(model)
    _write_atomically({
        weights_path: lambda tmp: save_file(tensors, tmp, metadata=metadata),
        config_path: lambda tmp: _write_text(tmp, config_json),
    })
    written = [config_path, weights_path]
    if tokenizer is not None:
        written += [os.fspath(f) for f in tokenizer.save_pretrained(save_directory)]
    if push_to_hub:
        repo_id = repo_id or os.path.basename(os.path.normpath(os.path.abspath(save_directory)))
        card = build_model_card(injector.config, repo_id=repo_id)
        files: dict[str, str | bytes] = {os.path.basename(p): p for p in written if os.path.isfile(p)}
        files[MODEL_CARD_NAME] = str(card).encode("utf-8")
        push_files(files, repo_id, token=token, revision=revision, private=private, create_pr=create_pr,
                   commit_message=commit_message or "Upload soft prompt")
    return written


def push_adapter_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    model_card: str | os.PathLike | None = None,
    extra_files: Sequence[str | os.PathLike] = (),
    checkpoint_path_in_repo: str | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    create_pr: bool = False,
    create_repo: bool = True,
    run_as_future: bool = False,
) -> CommitInfo | Future:
    """Upload the adapter files of `folder` and a model card to `repo_id` in one commit, nothing else.

    For `SoftPromptTrainer`: a Trainer's output directory also holds `training_args.bin`, logs,
    tokenizer and checkpoint folders, none of which are pushed.

    Args:
        folder: a directory holding `adapter_config.json` and `adapter_model.safetensors`.
        repo_id (`str`): the Hub repo.
        model_card (*optional*): path of the README.md to push; defaults to `folder/README.md` when
            it exists (no card is pushed otherwise).
        extra_files (*optional*): more local files (e.g. the tokenizer's) pushed to the repo root
            under their own names.
        checkpoint_path_in_repo (`str`, *optional*): also put the adapter files under this folder of
            the repo (the Trainer's `last-checkpoint/` or `checkpoint-N/`).
        create_repo (`bool`, defaults to `True`): create the repo if missing.
        run_as_future (`bool`, defaults to `False`): push in a background thread; returns a `Future`.
        token, revision, commit_message, private, create_pr: passed to the Hub upload.

    Raises:
        FileNotFoundError: `folder` lacks an adapter file.
        HubError: the push failed (raised from the `Future` with `run_as_future=True`).
    """
    folder = os.fspath(folder)
    files: dict[str, str | bytes] = {}
    for name in ADAPTER_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {name} in {folder!r} to push: save the adapter there first "
                                    "(save_soft_prompt or trainer.save_model).")
        files[name] = path
        if checkpoint_path_in_repo:
            files[f"{checkpoint_path_in_repo.strip('/')}/{name}"] = path
    files.update({os.path.basename(os.fspath(path)): os.fspath(path) for path in extra_files})
    card = os.fspath(model_card) if model_card is not None else os.path.join(folder, MODEL_CARD_NAME)
    if os.path.isfile(card):
        files[MODEL_CARD_NAME] = card
    return push_files(files, repo_id, token=token, revision=revision, private=private, create_pr=create_pr,
                      commit_message=commit_message, create_repo=create_repo, run_as_future=run_as_future)


def read_adapter(directory: str | os.PathLike) -> tuple[SoftPromptConfig, dict[str, torch.Tensor]]:
    """Read and check the adapter files in a local directory: (config, tensors)."""
    config, tensors, _ = read_adapter_files(*local_adapter_files(os.fspath(directory)))
    return config, tensors


def load_soft_prompt_weights(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load saved adapter weights into the prompt (and heads) already on `model`, for resume."""
    injector = _require_prompt(model)
    config, tensors = read_adapter(directory)
    _check_compatible(injector.config, config, directory)
    check_head_tensors(model, tensors, directory)
    prompt = getattr(model, PROMPT_MODULE_NAME)
    prompt.load_state_dict(prompt_state_dict(config, tensors))
    load_head_tensors(model, tensors)
    return model


def local_adapter_files(directory: str) -> tuple[str, str]:
    """(config path, weights path) of a local adapter directory; safetensors preferred over .bin."""
    config_path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    weights = [os.path.join(directory, n) for n in (ADAPTER_WEIGHTS_NAME, ADAPTER_BIN_NAME)]
    weights = [p for p in weights if os.path.isfile(p)]
    if not os.path.isfile(config_path) or not weights:
        missing = ADAPTER_CONFIG_NAME if not os.path.isfile(config_path) else ADAPTER_WEIGHTS_NAME
        raise FileNotFoundError(
            f"No {missing} in {directory!r}. A soft-prompt adapter directory holds "
            f"{' and '.join(ADAPTER_FILES)} (written by save_soft_prompt or PEFT)."
        )
    return config_path, weights[0]


def read_adapter_files(
    config_path: str, weights_path: str
) -> tuple[SoftPromptConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Parse one adapter: (config, tensors, the adapter_config.json dict)."""
    try:
        with open(config_path, encoding="utf-8") as f:
            peft_json = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path!r} is not valid JSON ({err}). The file is corrupt: save the "
                         "adapter again.") from err
    metadata, tensors = _read_weights(weights_path)
    if METADATA_CONFIG_KEY in metadata:
        try:
            config = SoftPromptConfig.from_dict(json.loads(metadata[METADATA_CONFIG_KEY]))
        except json.JSONDecodeError as err:
            raise ValueError(f"The hf-softprompt config in {weights_path!r} is not valid JSON ({err}). "
                             "Save the adapter again.") from err
    else:
        config = config_from_peft_dict(peft_json)
    if PROMPT_KEY not in tensors:
        raise ValueError(f"{weights_path!r} holds no {PROMPT_KEY!r} tensor; it is not a prompt adapter.")
    return config, tensors, peft_json


def _read_weights(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file, or of a .bin through torch.load(weights_only=True)."""
    if not path.endswith(".bin"):
        try:
            with safe_open(path, framework="pt") as f:
                return f.metadata() or {}, {key: f.get_tensor(key) for key in f.keys()}
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueError(
                f"{path!r} is not a readable safetensors file ({err}). The file is corrupt or "
                "truncated: save (or download, with force_download=True) the adapter again."
            ) from err
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses any pickled object that is not a tensor
        raise ValueError(
            f"{path!r} could not be read with torch.load(weights_only=True) ({type(err).__name__}). "
            "Pickled code is never run: convert the adapter to safetensors with a trusted tool."
        ) from err
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"{path!r} holds a {type(tensors).__name__}, not a dict of tensors.")
    return {}, tensors


def prompt_state_dict(config: SoftPromptConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {k[len(STATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
    if not state:
        # Export only (prompt tuning, or a P-tuning adapter PEFT saved): the table is the prompt.
        # PEFT's seq2seq tables have 2P rows; the first P are the encoder prompt, as in its forward.
        state = {"embedding.weight": tensors[PROMPT_KEY][: config.num_virtual_tokens]}
    return state


def head_targets(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """For each `base_model.<module>.<param>` key (a trained task head): the model's tensor, or None."""
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor | None] = {}
    for key in tensors:
        if key.startswith(HEAD_PREFIX):
            module_name, _, param = key[len(HEAD_PREFIX):].rpartition(".")
            module = modules.get(module_name)
            own = {} if module is None else {**dict(module.named_parameters(recurse=False)),
                                             **dict(module.named_buffers(recurse=False))}
            out[key] = own.get(param)
    return out


def check_head_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: Any) -> None:
    """Raise a `ValueError` unless every task-head tensor of the adapter fits a tensor of `model`."""
    for key, target in head_targets(model, tensors).items():
        name = key[len(HEAD_PREFIX):]
        if target is None:
            raise ValueError(f"The adapter in {os.fspath(where)!r} holds {key!r}, but {type(model).__name__} "
                             f"has no parameter {name!r}. Load the base model it was trained on.")
        if target.shape != tensors[key].shape:
            raise ValueError(
                f"The adapter in {os.fspath(where)!r} has {name} of shape {tuple(tensors[key].shape)}, but "
                f"the model's is {tuple(target.shape)}. Load the base model with the same head (e.g. the "
                "same num_labels)."
            )


def load_head_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the adapter's task-head tensors into the model (after `check_head_tensors`)."""
    with torch.no_grad():
        for key, target in head_targets(model, tensors).items():
            target.copy_(tensors[key])


# -------------------------------------------------------------------- helpers


def _trainable_module_items(model: nn.Module, config: SoftPromptConfig) -> list[tuple[str, nn.Module]]:
    modules = {id(m) for m in resolve_trainable_modules(model, config)}
    return [(n, m) for n, m in model.named_modules() if id(m) in modules]


def _check_compatible(expected: SoftPromptConfig, saved: SoftPromptConfig, where: Any) -> None:
    for field in ("num_virtual_tokens", "token_dim", "task_type", "encoder"):
        a, b = getattr(expected, field), getattr(saved, field)
        if b is not None and a != b:
            raise ValueError(
                f"The adapter in {os.fspath(where)!r} has {field}={getattr(b, 'value', b)!r}, but the "
                f"model's prompt has {field}={getattr(a, 'value', a)!r}."
            )


def _require_prompt(model: nn.Module):
    injector = get_injector(model)
    if injector is None:
        raise ValueError(f"{type(model).__name__} carries no soft prompt; call add_soft_prompt first.")
    return injector


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _write_atomically(writers: dict[str, Any]) -> None:
    """For each `{path: write}`, `write(tmp_path)` to a temporary file next to `path` and fsync it;
    only when every file is complete, rename each over its path. A failure (or a crash) while
    writing leaves the previous files as they were, and no temporary file behind."""
    temporary: dict[str, str] = {}
    try:
        for path, write in writers.items():
            directory = os.path.dirname(os.path.abspath(path))
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
            os.close(fd)
            temporary[path] = tmp
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for path, tmp in temporary.items():
            os.replace(tmp, path)
    finally:
        for tmp in temporary.values():
            if os.path.exists(tmp):
                os.remove(tmp)
