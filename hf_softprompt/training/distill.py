"""`SoftPromptDistillationTrainer`: a soft prompt of a few virtual tokens that stands in for a long
text prompt (context distillation; no labels needed).

The teacher is the frozen model reading the text in front of each row (`teacher.py`); the student
is the same model reading the soft prompt instead of the text. Both read the same row and the
same continuation (the row's `completion`, or the teacher's own, generated once before training),
and the loss is the KL divergence of the student's next-token distributions from the teacher's at
the continuation's tokens, never at the input's.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import datasets
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from ..accessors import input_embeddings, weight_of
from ..config import SoftPromptConfig
from ..model.attach import soft_prompt_names
from ..model.bank import DEFAULT_NAME
from ..model.injector import get_injector
from ..model.quantization import gguf_file_of
from ..model.tasks import is_decoder_only, max_positions
from .columns import ID_COLUMN
from .setup import PromptConfigs, check_prompt_configs
from .teacher import (
    TeacherPrompt,
    TeacherText,
    generate_continuations,
    prefix_cache,
    read_teacher_prompts,
    teacher_logits,
)
from .trainer import SoftPromptMixin

logger = logging.getLogger(__name__)

DEFAULT_VIRTUAL_TOKENS = 16
INPUT_COLUMNS = ("messages", "text")  # a row's input: chat turns, or a text
COMPLETION_COLUMN = "completion"  # optional: the continuation to distill over (else the teacher's)
IGNORE = -100


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 1.0, num_items_in_batch: torch.Tensor | int | None = None
                      ) -> torch.Tensor:
    """KL(teacher ‖ student) of the next-token distributions at every position whose next token is a
    continuation token (`labels[:, 1:] != -100`), times `temperature`² (Hinton et al. 2015), summed
    and divided by `num_items_in_batch` (the Trainer's count over all gradient-accumulation steps)
    or, when None, by this batch's count of such positions. The (B, K, V) logits are those of the
    last K positions of the (B, L) `labels` (K = L: all of them; a call with `logits_to_keep=K`).

    Forward KL, the teacher's distribution first: the student is asked to put probability wherever the
    teacher does (the mode-covering direction of classic distillation), so the whole distribution
    is copied, not only the teacher's top token; the student's own mistakes are not sampled.
    """
    chosen = labels[:, labels.shape[1] - student_logits.shape[1] + 1:] != IGNORE  # next tokens of the kept positions
    student = F.log_softmax(student_logits[:, :-1][chosen].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1][chosen].float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="sum") * temperature**2
    count = num_items_in_batch if num_items_in_batch is not None else chosen.sum().clamp(min=1)
    return kl / count


@dataclass
class DistillationCollator:
    """Pads the rows of a batch on the left: `input_ids` (row and continuation), `labels` (-100 but
    at the continuation), `attention_mask` and each row's `soft_prompt_ids`. On the left, so every
    row ends with its continuation and the LM head runs over the last few positions only."""

    pad_token_id: int

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)

        def padded(key: str, value: int) -> torch.Tensor:
            return torch.tensor([[value] * (width - len(f[key])) + list(f[key]) for f in features])

        return {"input_ids": padded("input_ids", self.pad_token_id), "labels": padded("labels", IGNORE),
                "attention_mask": torch.tensor([[0] * (width - len(f["input_ids"])) + [1] * len(f["input_ids"])
                                                for f in features]),
                ID_COLUMN: torch.tensor([int(f[ID_COLUMN]) for f in features])}


class SoftPromptDistillationTrainer(SoftPromptMixin, Trainer):
    """Trains soft prompts to make a frozen causal LM behave as it does with a long text in front.

    Each training row holds only the user input: a `text`, or chat turns in `messages`; optionally a
    `completion` (a string) to distill over. Rows without one get the teacher's own continuation
    (greedy unless `generation_kwargs` says otherwise, at most `max_new_tokens` tokens), generated
    once, before training. The loss is [`distillation_loss`]: KL(teacher ‖ student) over the
    continuation's tokens, at `temperature`. The teacher is the same model without its prompts
    (`without_soft_prompt`, eval mode): no second copy, and the text's keys/values are computed
    once per batch and shared by its rows (`share_teacher_prefix=False` concatenates the text to
    every row instead: the same numbers, slower).

    The student reads the row's tokens as the teacher does, with its virtual tokens in the place of
    the text: a plain row after `teacher_prompt`, or for a chat teacher the conversation as the chat
    template renders it after the teacher's messages (`chat_after_prompt` gives that text to serve).

    The stock `Trainer` with `SoftPromptCallback` cannot do this: its loss is the model's, while this
    one needs a second (teacher) pass of every batch. Save, load, push and serve the prompts as
    any other soft prompt.

    Args:
        teacher_prompt (`str`, chat messages, or `dict[str, str | messages]`): the text the prompt
            stands in for; chat messages (e.g. one system message) are rendered by the tokenizer's
            chat template; a mapping distills several prompts at once, one per name, and then each
            row names its prompt in a `soft_prompt_ids` column (a position in the mapping, or a name).
        soft_prompt_config (`SoftPromptConfig` or `dict[str, SoftPromptConfig]`, *optional*): the
            prompts' settings. Defaults to 16 virtual tokens initialised from the teacher text's
            first tokens (`init="text"`).
        max_new_tokens (`int`, defaults to 32): longest continuation the teacher generates.
        generation_kwargs (`dict`, *optional*): other `generate()` settings of the teacher's
            continuations, e.g. `{"do_sample": True, "top_p": 0.9}`.
        temperature (`float`, defaults to 1.0): softens both distributions in the loss.
        share_teacher_prefix (`bool`, defaults to True): compute the teacher text once per batch.
        model, args, processing_class (the tokenizer, required), train_dataset, eval_dataset, **kwargs:
            as for `Trainer`.

    Example:
        ```python
        trainer = SoftPromptDistillationTrainer(
            model=model, args=TrainingArguments("out", learning_rate=3e-2), processing_class=tokenizer,
            teacher_prompt=long_instructions, train_dataset=Dataset.from_dict({"text": user_inputs}))
        trainer.train()
        trainer.save_model()  # the adapter: load it with load_soft_prompt(model, "out")
        ```
    """

    def __init__(self, model: nn.Module | None = None, args: Any = None, *,
                 teacher_prompt: TeacherText | Mapping[str, TeacherText],
                 soft_prompt_config: PromptConfigs | None = None, max_new_tokens: int = 32,
                 generation_kwargs: Mapping[str, Any] | None = None, temperature: float = 1.0,
                 share_teacher_prefix: bool = True, **kwargs: Any) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        if model is None or not is_decoder_only(model) or not getattr(model, "can_generate", lambda: False)():
            raise ValueError(f"SoftPromptDistillationTrainer distills into a decoder-only causal LM "
                             f"(AutoModelForCausalLM), got {type(model).__name__}.")
        tokenizer: Any = kwargs.get("processing_class")
        self.teachers = read_teacher_prompts(teacher_prompt, tokenizer, DEFAULT_NAME)
        self.positions = max_positions(model.config)
        for teacher in self.teachers.values():
            _check_fits(teacher, self.positions, 1)
        configs = _prompt_configs(soft_prompt_config, self.teachers, model, tokenizer)
        self.temperature, self.share_teacher_prefix = temperature, share_teacher_prefix
        self._text_caches: dict[tuple[str, torch.device, torch.dtype], Any] = {}  # (name, device, dtype) -> cache
        self._takes_logits_to_keep: bool | None = None
        self.max_new_tokens, self.generation_kwargs = max_new_tokens, dict(generation_kwargs or {})
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kwargs.setdefault("data_collator", DistillationCollator(int(pad if pad is not None else 0)))
        super().__init__(model, args, soft_prompt_config=configs, **kwargs)
        self.prompt_ids = {name: soft_prompt_names(self.student).index(name) for name in self.teachers}
        if self.train_dataset is not None:
            self.train_dataset = self.distillation_rows(self.train_dataset, "training dataset")
        if isinstance(self.eval_dataset, Mapping):
            self.eval_dataset = {key: self.distillation_rows(ds, f"eval dataset {key!r}")
                                 for key, ds in self.eval_dataset.items()}
        elif self.eval_dataset is not None:
            self.eval_dataset = self.distillation_rows(self.eval_dataset, "eval dataset")

    @property
    def student(self) -> nn.Module:
        """The prompted model (`self.model`, set by `Trainer.__init__`): the student, and without its
        prompts the teacher."""
        return cast(nn.Module, self.model)

    def distillation_rows(self, dataset: Any, what: str) -> datasets.Dataset:
        """`dataset`'s rows as the training reads them: `input_ids` (the row's tokens, then the
        continuation's), `labels` (the continuation's tokens, -100 elsewhere) and `soft_prompt_ids`."""
        columns = list(getattr(dataset, "column_names", None) or ())
        column = next((c for c in INPUT_COLUMNS if c in columns), None)
        if column is None:
            raise ValueError(f"The {what} has columns {columns}, but distillation reads each row's input from a "
                             f"'text' column (or 'messages' for chat turns). Rename the input column, e.g. "
                             f"dataset.rename_column('prompt', 'text').")
        tokenizer: Any = self.processing_class
        teachers = [self._teacher_of(row, index, what) for index, row in enumerate(dataset)]
        inputs = [t.row_ids(tokenizer, row, column) for t, row in zip(teachers, dataset, strict=True)]
        completions: list[list[int] | None] = [
            list(tokenizer(row[COMPLETION_COLUMN], add_special_tokens=False)["input_ids"])
            if isinstance(row.get(COMPLETION_COLUMN), str) else None for row in dataset]
        for index, (teacher, ids, done) in enumerate(zip(teachers, inputs, completions, strict=True)):
            room = len(done) if done is not None else self.max_new_tokens
            _check_fits(teacher, self.positions, len(ids) + room, f"Row {index} of the {what} (input and continuation)")
        for teacher in self.teachers.values():  # the teacher's continuations, once, for the rows without one
            todo = [i for i, t in enumerate(teachers) if t is teacher and completions[i] is None]
            if todo:
                made = generate_continuations(
                    self.student, tokenizer, teacher.prefix_ids, [inputs[i] for i in todo],
                    batch_size=self.args.per_device_eval_batch_size, max_new_tokens=self.max_new_tokens,
                    generation_kwargs=self.generation_kwargs, desc=f"teacher continuations ({teacher.name}, {what})",
                    progress=not self.args.disable_tqdm)
                for i, generated in zip(todo, made, strict=True):
                    completions[i] = generated
        rows: dict[str, list[Any]] = {"input_ids": [], "labels": [], ID_COLUMN: []}
        for teacher, ids, continuation in zip(teachers, inputs, completions, strict=True):
            assert continuation is not None
            rows["input_ids"].append(ids + continuation)
            rows["labels"].append([IGNORE] * len(ids) + continuation)
            rows[ID_COLUMN].append(self.prompt_ids[teacher.name])
        return datasets.Dataset.from_dict(rows)

    def _teacher_of(self, row: Mapping[str, Any], index: int, what: str) -> TeacherPrompt:
        """The teacher of one row: the only one, or the one its `soft_prompt_ids` names."""
        names = list(self.teachers)
        value = row.get(ID_COLUMN)
        if value is None:
            if len(names) == 1:
                return self.teachers[names[0]]
            raise ValueError(f"Row {index} of the {what} names no prompt, but {len(names)} are distilled ({names}): "
                             f"give every row a {ID_COLUMN!r} column entry, a position in that list or a name.")
        if isinstance(value, str) and value in self.teachers:
            return self.teachers[value]
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
            return self.teachers[names[value]]
        raise ValueError(f"Row {index} of the {what} has {ID_COLUMN}={value!r}: expected a position in {names} "
                         f"(0 to {len(names) - 1}) or one of those names.")

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """[`distillation_loss`] of the prompted model's logits (the student) against the teacher's."""
        injector = None if self.model is None else get_injector(self.model)
        if injector is not None:
            injector.ensure_outermost()
        labels = inputs["labels"]
        keep = self._logits_to_keep(labels)
        outputs = model(**{key: value for key, value in inputs.items() if key != "labels"}, **keep)
        teacher = self.teacher_logits(inputs["input_ids"], inputs["attention_mask"], inputs[ID_COLUMN], **keep)
        # The Trainer divides by the accumulation steps itself unless the model takes loss kwargs.
        per_item = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss = distillation_loss(outputs.logits, teacher, labels, self.temperature, per_item)
        if self.args.average_tokens_across_devices and per_item is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss: the count spans devices
        return (loss, outputs) if return_outputs else loss

    def _logits_to_keep(self, labels: torch.Tensor) -> dict[str, int]:
        """`{"logits_to_keep": K}`: the last K positions predict every continuation token (rows are
        padded on the left, so each ends with its continuation); {} where the model takes no such
        argument or K would be every position."""
        if self._takes_logits_to_keep is None:
            self._takes_logits_to_keep = "logits_to_keep" in inspect.signature(self.student.forward).parameters
        targets = (labels != IGNORE).long()
        first = int((targets.cumsum(1) == 0).sum(1).min())  # leftmost continuation token of the batch
        keep = labels.shape[1] - first + 1  # the position before it predicts it
        return {"logits_to_keep": keep} if self._takes_logits_to_keep and keep < labels.shape[1] else {}

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._text_caches.clear()  # the teacher text's keys/values, computed anew once per run
        return super().train(*args, **kwargs)

    def teacher_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       prompt_ids: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """(B, L, V) logits of the teacher (the last `logits_to_keep` positions when > 0): each row
        read after its own prompt's teacher text, whose keys/values are computed once per run."""
        by_id = {index: self.teachers[name] for name, index in self.prompt_ids.items()}
        ids = prompt_ids.view(-1).tolist()
        out: torch.Tensor | None = None
        for index in sorted(set(ids)):
            rows = torch.tensor([i for i, each in enumerate(ids) if each == index], device=input_ids.device)
            prefix = torch.tensor(by_id[index].prefix_ids, dtype=torch.long)
            cache = None
            if self.share_teacher_prefix:
                weight = weight_of(input_embeddings(self.student))
                key = (by_id[index].name, weight.device, weight.dtype)
                if key not in self._text_caches:
                    self._text_caches[key] = prefix_cache(self.student, prefix.to(weight.device))
                cache = self._text_caches[key]
            logits = teacher_logits(self.student, prefix, input_ids[rows], attention_mask[rows], cache=cache,
                                    share_prefix=self.share_teacher_prefix, logits_to_keep=logits_to_keep)
            if out is None:
                out = logits.new_empty(input_ids.shape[0], *logits.shape[1:])
            out[rows] = logits
        assert out is not None
        return out


def _check_fits(teacher: TeacherPrompt, positions: int | None, rest: int, row: str | None = None) -> None:
    """Refuse a teacher text, plus `rest` tokens after it (`row`: whose, None for the text alone),
    longer than the model's positions."""
    if positions is None or len(teacher.prefix_ids) + rest <= positions:
        return
    if row is None:
        raise ValueError(
            f"The teacher text of prompt {teacher.name!r} is {len(teacher.prefix_ids)} tokens, but the model has "
            f"{positions} positions and a row needs at least one more. Shorten the teacher prompt."
        )
    raise ValueError(
        f"{row} does not fit after the teacher text of prompt {teacher.name!r}: {len(teacher.prefix_ids)} + "
        f"{rest} tokens, but the model has {positions} positions. Shorten the teacher prompt or the row "
        "(or max_new_tokens)."
    )


def _prompt_configs(config: PromptConfigs | None, teachers: Mapping[str, TeacherPrompt], model: nn.Module,
                    tokenizer: Any) -> dict[str, SoftPromptConfig]:
    """`{name: config}` for the teachers: the given ones (a single config serves every teacher), or
    16 tokens initialised from each teacher text."""
    given = check_prompt_configs(config)
    if given is None:
        source = getattr(tokenizer, "name_or_path", "") or ""
        if not os.path.isdir(source):
            logger.warning("The tokenizer was not loaded from a folder (name_or_path=%r), so the prompts cannot "
                           "start from the teacher text: they start random. Pass soft_prompt_config=... to choose.",
                           source)
            return {name: SoftPromptConfig(num_virtual_tokens=DEFAULT_VIRTUAL_TOKENS) for name in teachers}
        gguf = gguf_file_of(model)
        return {name: SoftPromptConfig(num_virtual_tokens=DEFAULT_VIRTUAL_TOKENS, init="text",
                                       init_text=teacher.init_text, tokenizer_name_or_path=source,
                                       tokenizer_kwargs={"gguf_file": gguf} if gguf else None)
                for name, teacher in teachers.items()}
    if list(given) == [DEFAULT_NAME] and list(teachers) != [DEFAULT_NAME]:
        return {name: replace(given[DEFAULT_NAME]) for name in teachers}
    if set(given) != set(teachers):
        raise ValueError(f"soft_prompt_config names the prompts {sorted(given)}, but teacher_prompt names "
                         f"{sorted(teachers)}: give one config, or one per teacher prompt name.")
    return {name: given[name] for name in teachers}
