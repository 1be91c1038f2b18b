"""`SoftPromptTrainer`: the `Trainer` plus `SoftPromptCallback`, and what a callback cannot do."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Trainer, TrainingArguments
from transformers.trainer_utils import HubStrategy, SaveStrategy
from transformers.utils import PushInProgress

from ..files.model_card import MODEL_CARD_NAME, build_model_card, build_prompt_set_card
from ..files.save import push_adapter_folder
from ..model.bank import DEFAULT_NAME
from ..model.injector import get_injector, require_bank
from ..model.quantization import drop_nominal_gguf_quantizer
from .callback import SoftPromptCallback, put_first
from .checkpoints import get_num_items_in_batch, last_complete_checkpoint, load_best_model, load_from_checkpoint
from .labelled_tail import (
    compute_loss_over_labelled_tail,
    prediction_step_over_labelled_tail,
    runs_trainer_method,
)
from .reference import defer_online_reference, with_base_model_reference
from .setup import PromptConfigs, trainable_counts

logger = logging.getLogger(__name__)


if TYPE_CHECKING:  # the mixin's `self` is a Trainer: let type checkers see its attributes
    _TrainerBase = Trainer
else:
    _TrainerBase = object


class SoftPromptMixin(_TrainerBase):
    """The soft-prompt behaviour of [`SoftPromptTrainer`], for any `Trainer` subclass.

    Put it first among the bases: `class MyTrainer(SoftPromptMixin, SomeTrainer)`. The prompts are
    set up by the same [`SoftPromptCallback`] the stock `Trainer` takes; on top of it the mixin
    resumes from adapter-only checkpoints (every prompt, P-tuning encoder, task head, optimizer,
    scheduler and RNG), reloads the best adapters with `load_best_model_at_end=True`, counts a
    causal LM's target tokens as its loss does (`labels[:, 1:]`, also for models such as GPT-2 that
    declare no `loss_type`), puts the trainable-parameter count in the log history at the start of
    training, and pushes only the adapter files and soft-prompt model cards to the Hub
    (`push_to_hub()` and every `hub_strategy`). A preference trainer given no `ref_model` (TRL's
    `DPOTrainer`) gets `BaseModelReference(model)`: the base model without the prompt, no copy; so
    does an online trainer with a KL term (TRL's `GRPOTrainer`, `RLOOTrainer` with `beta != 0`).

    Args:
        soft_prompt_config (`SoftPromptConfig` or `dict[str, SoftPromptConfig]`, *optional*, keyword
            only): the prompt to add, or several by name (rows choose theirs with a
            `soft_prompt_ids` column). Defaults to 20 random virtual tokens; leave it out to train
            the prompts the model already carries.
        *args, **kwargs: passed to the other base's `__init__`.

    Example:
        ```python
        from trl import SFTTrainer

        class SoftPromptSFTTrainer(SoftPromptMixin, SFTTrainer):
            pass
        ```
    """

    # Read by SoftPromptCallback: this Trainer loads adapter checkpoints and logs the counts itself.
    handles_soft_prompt_checkpoints: ClassVar[bool] = True

    def __init__(self, *args: Any, soft_prompt_config: PromptConfigs | None = None, **kwargs: Any) -> None:
        callbacks = list(kwargs.pop("callbacks", None) or [])
        ours = [i for i, cb in enumerate(callbacks) if _is_soft_prompt_callback(cb)]
        if len(ours) > 1 or (ours and soft_prompt_config is not None):
            raise ValueError(
                f"{type(self).__name__} got more than one prompt: soft_prompt_config="
                f"{soft_prompt_config!r} and {len(ours)} SoftPromptCallback(s) in callbacks. Pass the "
                "config once, either as soft_prompt_config=... or in one SoftPromptCallback."
            )
        if ours:
            cb = callbacks[ours[0]]
            callback = cb() if isinstance(cb, type) else cb
            callbacks[ours[0]] = callback
        else:
            callback = SoftPromptCallback(soft_prompt_config)
            callbacks.append(callback)
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, nn.Module):  # before Trainer.__init__ refuses a nominally quantized model
            drop_nominal_gguf_quantizer(model)
        args, kwargs = with_base_model_reference(super().__init__, args, kwargs)
        reference = defer_online_reference(super().__init__, args, kwargs)
        try:
            super().__init__(*args, **{**kwargs, "callbacks": callbacks})
        finally:
            if reference is not None:
                reference.restore()
        if reference is not None:
            reference.attach(self)
        put_first(callback, self.callback_handler)  # its prompt-health figures reach the report_to loggers

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        # `resume_from_checkpoint=True` picks the highest-numbered checkpoint folder, even one a crash
        # left half written: take the newest complete one instead.
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(_output_dir(self.args))
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint found in output directory ({self.args.output_dir}).")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        # The start of every train() call, with its fresh state: the place to log what trains.
        optimizer = super().create_optimizer(model)
        trained = self.model
        if trained is not None and get_injector(trained) is not None:  # else on_train_begin raises with the fix
            self.log(trainable_counts(trained))
        return optimizer

    def compute_loss(self, model: nn.Module, inputs: dict, *args: Any, **kwargs: Any) -> Any:
        # A trainer may replace the model's forward after our setup (TRL's fused LM head does, in its
        # __init__): wrap it again so every call, evaluation included, carries the prompt.
        injector = None if self.model is None else get_injector(self.model)
        if injector is not None:
            injector.ensure_outermost()
        if runs_trainer_method(self, "compute_loss", through=SoftPromptMixin):  # the LM head over the labelled tail
            return compute_loss_over_labelled_tail(super().compute_loss, self, model, inputs, *args, **kwargs)
        return super().compute_loss(model, inputs, *args, **kwargs)

    def prediction_step(self, model: nn.Module, inputs: dict, prediction_loss_only: bool, *args: Any,
                        **kwargs: Any) -> Any:
        # Trainer.prediction_step calls self.compute_loss: only where that is the model's own loss.
        if all(runs_trainer_method(self, method, through=SoftPromptMixin)
               for method in ("compute_loss", "prediction_step")):
            return prediction_step_over_labelled_tail(super().prediction_step, self, model, inputs,
                                                      prediction_loss_only, *args, **kwargs)
        return super().prediction_step(model, inputs, prediction_loss_only, *args, **kwargs)

    # The Trainer methods soft prompts change, shared with the callback's stock Trainer (checkpoints.py).
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | int | None:
        return get_num_items_in_batch(super()._get_num_items_in_batch, self, batch_samples, device)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_from_checkpoint(super()._load_from_checkpoint, self, resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        load_best_model(super()._load_best_model, self)

    def create_model_card(self, language: str | None = None, license: str | None = None,
                          tags: str | list[str] | None = None, model_name: str | None = None,
                          finetuned_from: str | None = None, tasks: str | list[str] | None = None,
                          dataset_tags: str | list[str] | None = None, dataset: str | list[str] | None = None,
                          dataset_args: str | list[str] | None = None, **kwargs: Any) -> None:
        # The stock card describes a full fine-tune; ours says how to load the adapter. The signature is
        # Trainer's; tasks, dataset_tags and dataset_args have no place on an adapter's card.
        if not self.is_world_process_zero():
            return
        if self.model is None:
            raise ValueError("The Trainer has no model to describe in a model card.")
        bank = require_bank(self.model)
        if DEFAULT_NAME in bank:
            others = {name: bank.configs[name] for name in bank.names() if name != DEFAULT_NAME}
            card = build_model_card(
                bank.configs[DEFAULT_NAME], base_model=finetuned_from, repo_id=self.hub_model_id,
                training_results=self.state.log_history, model_name=model_name,
                tags=[tags] if isinstance(tags, str) else tags or (), datasets=dataset, license=license,
                language=language, other_prompts=others,
            )
        else:
            card = build_prompt_set_card(bank.configs, repo_id=self.hub_model_id)
        output_dir = _output_dir(self.args)
        os.makedirs(output_dir, exist_ok=True)
        card.save(os.path.join(output_dir, MODEL_CARD_NAME))

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None,
                    *, push_tokenizer: bool = False, **kwargs: Any) -> Any:
        """Upload the adapter files and a soft-prompt model card in one commit, and with
        `push_tokenizer=True` the `processing_class`'s files too; never base weights,
        `training_args.bin` or logs. Other arguments as in `Trainer.push_to_hub`."""
        # The stock push uploads all of output_dir (training_args.bin, logs, tokenizer).
        tokenizer = None
        if push_tokenizer:
            tokenizer = self.processing_class
            if tokenizer is None:
                raise ValueError("push_tokenizer=True, but the Trainer has no processing_class to push. "
                                 "Pass processing_class=tokenizer to the Trainer.")
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        tokenizer_files = []
        if tokenizer is not None:  # the files save_model wrote; saved again to learn their names
            written = tokenizer.save_pretrained(_output_dir(self.args))
            tokenizer_files = [os.fspath(f) for f in written if os.path.isfile(f)]
        self.create_model_card(**kwargs)
        self._finish_current_push()
        return push_adapter_folder(
            _output_dir(self.args), _hub_repo_id(self), extra_files=tokenizer_files, token=token,
            commit_message=commit_message,
            revision=revision or self.args.hub_revision, create_repo=False, run_as_future=not blocking,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The stock push copies base-model files and training_args.bin into output_dir and uploads
        # it all (the adapter only when peft is installed): push the checkpoint's adapter and card.
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        busy = self.push_in_progress is not None and not self.push_in_progress.is_done()
        if busy and not self.args.hub_always_push:  # as upstream: skip this one, not queue it
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self.create_model_card()
        progress = (f"step {self.state.global_step}" if self.args.save_strategy == SaveStrategy.STEPS
                    else f"epoch {int(self.state.epoch)}")
        path_in_repo: dict[str, str] = {HubStrategy.CHECKPOINT: "last-checkpoint",
                                        HubStrategy.ALL_CHECKPOINTS: os.path.basename(checkpoint_folder)}
        job = push_adapter_folder(
            checkpoint_folder, _hub_repo_id(self),
            model_card=os.path.join(_output_dir(self.args), MODEL_CARD_NAME),
            checkpoint_path_in_repo=path_in_repo.get(self.args.hub_strategy),
            token=self.args.hub_token, revision=self.args.hub_revision, create_repo=False,
            commit_message=f"Training in progress, {progress}", run_as_future=True,
        )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            # transformers types `push_in_progress` as None (all its __init__ assigns) and PushInProgress's
            # `jobs` as one Future, where it takes a list of them.
            self.push_in_progress = PushInProgress([job])  # type: ignore[assignment, arg-type]
        else:
            self.push_in_progress.jobs.append(job)


class SoftPromptTrainer(SoftPromptMixin, Trainer):
    """A `Trainer` that trains a soft prompt and checkpoints it as an adapter ([`SoftPromptMixin`]).

    Example:
        ```python
        trainer = SoftPromptTrainer(model=model, args=args, train_dataset=ds,
                                    soft_prompt_config=SoftPromptConfig(num_virtual_tokens=8))
        trainer.train()
        trainer.save_model("out")
        ```
    """


class SoftPromptSeq2SeqTrainer(SoftPromptMixin, Seq2SeqTrainer):
    """A `Seq2SeqTrainer` that trains a soft prompt ([`SoftPromptMixin`]): with
    `Seq2SeqTrainingArguments(predict_with_generate=True)`, `evaluate()` and `predict()` return
    the ids that the prompted model's `generate()` produced (`generation_max_length`,
    `generation_num_beams`), as transformers' `run_summarization.py` expects.

    Example:
        ```python
        args = Seq2SeqTrainingArguments("out", predict_with_generate=True, generation_max_length=32)
        trainer = SoftPromptSeq2SeqTrainer(model=t5, args=args, train_dataset=ds, eval_dataset=dev,
                                           compute_metrics=rouge, soft_prompt_config=config)
        ```
    """


def _output_dir(args: TrainingArguments) -> str:
    """`args.output_dir`: typed optional, but `TrainingArguments.__post_init__` always sets it."""
    return cast(str, args.output_dir)


def _hub_repo_id(trainer: Trainer) -> str:
    """`trainer.hub_model_id` once `init_hf_repo` has set it (transformers types it as None, all its
    `__init__` assigns)."""
    return cast(str, trainer.hub_model_id)


def _is_soft_prompt_callback(callback: Any) -> bool:
    if isinstance(callback, type):
        return issubclass(callback, SoftPromptCallback)
    return isinstance(callback, SoftPromptCallback)
