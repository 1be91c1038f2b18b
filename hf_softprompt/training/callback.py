"""`SoftPromptCallback`: soft-prompt tuning with the stock `transformers.Trainer`.

The callback puts the prompt on the Trainer's model at `on_init_end`, before `train()` builds
the optimizer from the parameters that require grad, and makes the model's `save_pretrained`
write the adapter. Everything else (forward, loss, `evaluate`, `predict`, `generate`) is the
injection of `model/injector.py`, which needs no help from the Trainer.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler

from ..accessors import input_embeddings
from ..model.describe import describe_soft_prompt, format_nearest_tokens
from ..model.injector import get_injector
from .checkpoints import adopt_trainer_hooks
from .columns import check_prompt_id_column, choice_column
from .guard import PromptGradientGuard
from .health import PromptHealth
from .setup import (
    PromptConfigs,
    check_prompt_configs,
    describe_trainable,
    prepare_model,
    warn_if_prompt_rate_is_too_low,
)

logger = logging.getLogger(__name__)


class SoftPromptCallback(TrainerCallback):
    """Trains a soft prompt with the stock `Trainer`: pass it (or its class) in `callbacks`.

    At the end of `Trainer.__init__` the callback adds a prompt built from `config` to the model,
    which freezes every base parameter, so `train()` builds its optimizer over the prompt alone
    (plus the task head of classifiers, or `config.trainable_modules`). A model that already
    carries a prompt (`add_soft_prompt`, or an adapter loaded with `is_trainable=True`) is used as
    it is. From then on the model's `save_pretrained`, and so `trainer.save_model(dir)` and every
    `checkpoint-N`, writes the adapter (`adapter_config.json` and `adapter_model.safetensors`)
    instead of the base weights.

    Several prompts train together from a mapping `{name: config}`: each row of a batch uses the
    prompt its `soft_prompt_ids` column names (its position in `soft_prompt_names(model)`, i.e. the
    mapping's order; -1 for none), and only that prompt (and its task head) gets the row's gradient.

    The loss is the mean over the caller's target tokens, as without a prompt, so the Trainer's
    own count of target tokens (gradient accumulation, DDP) is right as it is.

    Checkpoints: the callback gives the Trainer it belongs to the adapter-checkpoint loaders of
    [`SoftPromptTrainer`], so `trainer.train(resume_from_checkpoint=...)` resumes exactly (prompts,
    encoders, heads, optimizer, scheduler, RNG) and `load_best_model_at_end=True` reloads the best
    adapters, with the stock `Trainer` too. What only `SoftPromptTrainer` does: the
    trainable-parameter count in the log history (the callback prints it once at the start, and
    logs it at INFO), `resume_from_checkpoint=True` skipping a checkpoint a crash left half
    written, and pushes of the adapter alone. The callback also gives the Trainer the target-token
    count of [`SoftPromptTrainer`] (`labels[:, 1:]` for causal LMs, also GPT-2's).

    Prompt health: every `logging_steps` the training logs (and so every `report_to` logger) get,
    per prompt, `soft_prompt/<name>/grad_norm`, `.../norm_ratio` (its mean token norm over the
    vocabulary's) and `.../cosine_to_init` (see `hf_softprompt.training.health`); at each evaluation the
    vocabulary tokens nearest to each virtual token are logged as text (INFO, logger
    `hf_softprompt.training.callback`) and kept in `callback.nearest_tokens`.

    Args:
        config (`SoftPromptConfig` or `dict[str, SoftPromptConfig]`, *optional*): the prompt to add
            (named `"default"`), or several by name. Defaults to `SoftPromptConfig()` (20 randomly
            initialised virtual tokens). Leave it out to train the prompts the model already carries.
        log_prompt_health (`bool`, defaults to True): add the prompt-health figures to the logs.

    Example:
        ```python
        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          callbacks=[SoftPromptCallback(SoftPromptConfig(num_virtual_tokens=8))])
        trainer.train()
        trainer.save_model("out")  # out/adapter_config.json, out/adapter_model.safetensors
        ```
    """

    def __init__(self, config: PromptConfigs | None = None, log_prompt_health: bool = True) -> None:
        self.config = check_prompt_configs(config)
        self.log_prompt_health = log_prompt_health
        self.health = PromptHealth()
        self.guard = PromptGradientGuard()  # stops training at a prompt with no or a non-finite gradient
        self.nearest_tokens: dict[str, str] = {}  # prompt name -> table, from the last evaluation
        # False in a SoftPromptTrainer, which puts the trainable-parameter count in its logs.
        self.prints_counts = True
        self.training_column: str | None = None  # the training data's prompt-choice column, if any

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        model: nn.Module | None = None, **kwargs: Any,
    ) -> None:
        if getattr(args, "use_vllm", False):
            # TRL's online trainers generate with vLLM after syncing the model's weights into it; a
            # prompt is no weight of the model, so vLLM would generate without it.
            raise ValueError(
                f"{type(args).__name__}(use_vllm=True) is not supported with a soft prompt: TRL copies the model's "
                "weights into vLLM for generation, and the prompt is not one of them, so completions would be "
                "sampled without it. Use use_vllm=False (generation through the prompted model's generate())."
            )
        # Now, not at on_train_begin: by then `train()` has built the optimizer without the prompt.
        trainer = calling_trainer(self)
        # The column choosing each row's prompt, as the trainer holds the data now (TRL's processed
        # dataset still has it; the dataloader may drop it later, which training calls then refuse).
        self.training_column = choice_column(getattr(trainer, "train_dataset", None))
        soft_prompt_trainer = getattr(trainer, "handles_soft_prompt_checkpoints", False)
        self.prints_counts = not soft_prompt_trainer
        if trainer is not None and not soft_prompt_trainer:
            # The stock Trainer loads checkpoints as base-model weights, before any callback event,
            # and miscounts GPT-2's targets: give it SoftPromptMixin's methods for both.
            adopt_trainer_hooks(trainer)
            put_first(self, trainer.callback_handler)  # SoftPromptTrainer puts us first itself
        elif trainer is None:
            # No Trainer found to teach: refuse now what would fail later.
            wanted = [n for n in ("load_best_model_at_end", "resume_from_checkpoint") if getattr(args, n)]
            if wanted:
                raise ValueError(
                    f"{wanted[0]}={getattr(args, wanted[0])!r} needs SoftPromptTrainer: the stock Trainer "
                    "loads a checkpoint as base-model weights, and soft-prompt checkpoints hold only "
                    "the adapter. Use SoftPromptTrainer(..., soft_prompt_config=...), which takes the same "
                    "arguments as Trainer; to only continue from a saved prompt, load it with "
                    "load_soft_prompt(model, checkpoint_dir, is_trainable=True) before building the Trainer, "
                    "and pass SoftPromptCallback() without a config (it then trains the loaded prompt)."
                )
        prepare_model(model, self.config)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        model: nn.Module | None = None, **kwargs: Any,
    ) -> None:
        if model is None or (injector := get_injector(model)) is None:
            # `model_init` builds a new model inside `train()`, after on_init_end.
            raise ValueError(
                f"The {type(model).__name__} being trained carries no soft prompt: with model_init, "
                "the Trainer builds a new model inside train(). Call add_soft_prompt(model, config) "
                "at the end of your model_init function."
            )
        injector.ensure_outermost()  # over a forward the trainer replaced since (TRL)
        dataset = getattr(kwargs.get("train_dataloader"), "dataset", None)
        check_prompt_id_column(dataset, injector.bank.names())
        injector.training_column = choice_column(dataset) or self.training_column
        if state.is_world_process_zero:
            summary = describe_trainable(model)
            logger.info(summary)
            if self.prints_counts:
                # A callback cannot reach the stock Trainer's logs: print the count once, as PEFT's
                # print_trainable_parameters() does (SoftPromptTrainer puts it in the logs instead).
                print(summary)
        if state.is_world_process_zero and not state.global_step:  # once, at the start (not on resume)
            warn_if_prompt_rate_is_too_low(kwargs.get("optimizer"), model)
        if self.log_prompt_health:
            self.health.start(injector.bank)
        self.guard.start(injector.bank)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        model: nn.Module | None = None, **kwargs: Any,
    ) -> None:
        self.guard.check(state.global_step + 1)  # before the optimizer applies a NaN
        # The last event with the step's gradients (already clipped: what the optimizer applies).
        if self.log_prompt_health and model is not None and (injector := get_injector(model)) is not None:
            self.health.record_gradients(injector.bank)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module | None = None, **kwargs: Any) -> None:
        self.guard.stop()
        if model is not None and (injector := get_injector(model)) is not None:
            injector.training_column = None

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        model: nn.Module | None = None, logs: dict[str, float] | None = None, **kwargs: Any,
    ) -> None:
        # Training logs only (they carry "loss"; evaluation logs carry "eval_loss"). We run before the
        # report_to loggers (see put_first), so what we add reaches them; the log history got its
        # copy of `logs` before this event, so it is updated too.
        if (not self.log_prompt_health or logs is None or "loss" not in logs or model is None
                or (injector := get_injector(model)) is None):
            return
        figures = self.health.metrics(injector.bank, input_embeddings(model))
        logs.update(figures)
        if state.log_history and state.log_history[-1].get("step") == state.global_step \
                and "loss" in state.log_history[-1]:
            state.log_history[-1].update(figures)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        model: nn.Module | None = None, processing_class: Any = None, **kwargs: Any,
    ) -> None:
        tokenizer = processing_class if hasattr(processing_class, "convert_ids_to_tokens") else \
            getattr(processing_class, "tokenizer", None)
        if not self.log_prompt_health or tokenizer is None or model is None \
                or (injector := get_injector(model)) is None or not state.is_world_process_zero:
            return
        for name in injector.bank:
            table = format_nearest_tokens(describe_soft_prompt(model, tokenizer, k=5, name=name))
            self.nearest_tokens[name] = table
            logger.info("Step %d, prompt %r: nearest vocabulary tokens\n%s", state.global_step, name, table)


def calling_trainer(callback: TrainerCallback) -> Trainer | None:
    """The `Trainer` whose event is being dispatched to `callback`, or None when called some other way.

    A callback is not told which Trainer holds it, and `on_init_end` (the last moment before the
    optimizer is built) is the only place the stock Trainer can be taught to load adapter
    checkpoints. This is the one place the package reads the call stack: it relies on
    `Trainer.__init__` dispatching `on_init_end` through its `callback_handler` a few frames up
    (tests/test_trainer.py::test_the_callback_finds_its_trainer fails first if that changes).
    """
    frame = inspect.currentframe()
    for _ in range(8):  # Trainer.__init__ is three or four frames up from on_init_end
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        handler = getattr(owner, "callback_handler", None)
        if isinstance(owner, Trainer) and isinstance(handler, CallbackHandler) and callback in handler.callbacks:
            return owner
        frame = frame.f_back
    return None


def put_first(callback: TrainerCallback, handler: CallbackHandler | None) -> None:
    """Move `callback` to the front of `handler`'s callbacks, so the figures its `on_log` adds reach
    the `report_to` loggers (the Trainer puts user callbacks after them). Safe during `call_event`'s
    loop: the callbacks after ours keep their places relative to the loop."""
    if handler is not None and callback in handler.callbacks:
        handler.callbacks.remove(callback)
        handler.callbacks.insert(0, callback)
