"""The Trainer integration: `SoftPromptCallback` with the stock Trainer, and `SoftPromptTrainer`."""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import logging
import os
import re
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from models import VOCAB, make_model
from reference import reference_outputs
from safetensors import safe_open
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

from hf_softprompt import (
    SoftPromptCallback,
    SoftPromptConfig,
    SoftPromptMixin,
    SoftPromptTrainer,
    add_soft_prompt,
    load_soft_prompt,
    remove_soft_prompt,
    save_soft_prompt,
)
from hf_softprompt.files.load import read_adapter
from hf_softprompt.files.save import adapter_state_dict
from hf_softprompt.model.injector import get_injector
from hf_softprompt.training.callback import calling_trainer
from hf_softprompt.training.checkpoints import load_from_checkpoint
from hf_softprompt.training.setup import prepare_model

P = 4
PROMPT = SoftPromptConfig(num_virtual_tokens=P)
TARGET = 7  # the learnable task: every example's target is token/class 7 (or 1, 2 for classifiers)
ADAPTER = {"adapter_config.json", "adapter_model.safetensors", "README.md"}  # README.md: the model card
CHECKPOINT = ADAPTER | {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                        "trainer_state.json"}


# ---------------------------------------------------------------------------------- helpers
@functools.cache
def _base(family: str, task: str):
    # Ten times the default init scale: the default tiny model barely reacts to its input, so a
    # prompt could not move its loss in a few steps.
    scale = {"bart": {"init_std": 0.2}, "t5": {}}.get(family, {"initializer_range": 0.2})
    return make_model(family, task, **scale)


def tiny(family: str, task: str):
    return copy.deepcopy(_base(family, task))


def dataset(task: str, n: int = 16, length: int = 6, seed: int = 0, ragged: bool = False) -> Dataset:
    """A task the prompt can learn: the target depends only on the task, never on the input."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    if task == "causal_lm":
        if ragged:  # real targets everywhere, labels[:, 0] included, a different count per row
            labels = ids.masked_fill(torch.rand(ids.shape, generator=g) < 0.4, -100)
        else:
            ids[:, -1] = TARGET
            labels = torch.full_like(ids, -100)
            labels[:, -1] = TARGET
    elif task == "seq2seq_lm":
        labels = torch.tensor([[TARGET, 2]] * n)
    elif task == "seq_cls":
        labels = torch.ones(n, dtype=torch.long)
    elif task == "token_cls":
        labels = torch.full_like(ids, 2)
    else:
        raise ValueError(task)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                              "labels": labels.tolist()})


def batch_of(data: Dataset) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(data[k]) for k in data.column_names}


def training_args(tmp_path, **overrides) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, learning_rate=0.1,
        save_strategy="no", logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )
    return TrainingArguments(**{**defaults, **overrides})


def subclass_trainer(model, args, data=None, config=PROMPT, **kwargs) -> SoftPromptTrainer:
    return SoftPromptTrainer(model=model, args=args, train_dataset=data, soft_prompt_config=config, **kwargs)


def callback_trainer(model, args, data=None, config=PROMPT, **kwargs) -> Trainer:
    callback = SoftPromptCallback(config)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=[callback], **kwargs)


PATHS = {"callback": callback_trainer, "subclass": subclass_trainer}


def base_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("soft_prompts.")}


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def exported_prompt(directory) -> torch.Tensor:
    return read_adapter(directory)[1]["prompt_embeddings"]


# ------------------------------------------------------------------- training and freezing
@pytest.mark.parametrize("family,task", [("llama", "causal_lm"), ("t5", "seq2seq_lm"), ("bert", "seq_cls"),
                                         ("bert", "token_cls")])
def test_prompt_learns_task_and_base_stays_bit_identical(tmp_path, family, task):
    model = tiny(family, task)
    before = base_state(model)
    trainer = subclass_trainer(model, training_args(tmp_path, max_steps=24), dataset(task))
    start = model.soft_prompts["default"].embedding.weight.detach().clone()
    heads = get_injector(model).bank.head_modules("default")  # the prompt's own copies of the head
    head_start = {k: v.clone() for h in heads.values() for k, v in h.state_dict().items()}
    trainable = {id(p) for p in itertools.chain(model.soft_prompts["default"].parameters(),
                                                *(h.parameters() for h in heads.values()))}
    trainer.train()

    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == trainable  # the prompt (and its task head of classifiers), nothing else
    assert bool(heads) == (task in ("seq_cls", "token_cls"))
    history = losses(trainer)
    assert sum(history[-4:]) / 4 < 0.85 * sum(history[:4]) / 4, history
    assert not torch.equal(model.soft_prompts["default"].embedding.weight, start)
    after = base_state(model)
    for key, value in before.items():  # every base weight, the base head included
        assert torch.equal(after[key], value), key
    head_after = {k: v for h in heads.values() for k, v in h.state_dict().items()}
    assert all(not torch.equal(head_after[k], head_start[k]) for k in head_start if k.endswith("weight"))


def test_callback_class_instance_and_subclass_train_the_same_prompt(tmp_path):
    data = dataset("causal_lm")
    runs = {
        "class": lambda m, a: Trainer(model=m, args=a, train_dataset=data, callbacks=[SoftPromptCallback]),
        "instance": lambda m, a: Trainer(model=m, args=a, train_dataset=data,
                                         callbacks=[SoftPromptCallback(SoftPromptConfig())]),
        "subclass": lambda m, a: SoftPromptTrainer(model=m, args=a, train_dataset=data),
    }
    prompts = {}
    for name, build in runs.items():
        model = tiny("llama", "causal_lm")
        build(model, training_args(tmp_path / name)).train()
        assert model.soft_prompts["default"].num_virtual_tokens == 20  # the default config
        prompts[name] = model.soft_prompts["default"].embedding.weight.detach()
    torch.testing.assert_close(prompts["class"], prompts["instance"], atol=0, rtol=0)
    torch.testing.assert_close(prompts["class"], prompts["subclass"], atol=0, rtol=0)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("source", ["add_soft_prompt", "loaded_adapter"])
def test_model_that_carries_a_prompt_is_used_as_it_is(tmp_path, path, source):
    model = add_soft_prompt(tiny("llama", "causal_lm"), SoftPromptConfig(num_virtual_tokens=3))
    if source == "loaded_adapter":
        with torch.no_grad():
            model.soft_prompts["default"].embedding.weight.normal_()
        save_soft_prompt(model, tmp_path / "adapter")
        model = load_soft_prompt(tiny("llama", "causal_lm"), tmp_path / "adapter", is_trainable=True)
    prompt, injector = model.soft_prompts["default"], get_injector(model)
    start = prompt().detach().clone()
    hooks = len(model._forward_pre_hooks)
    args, data = training_args(tmp_path, max_steps=1, optim="sgd", learning_rate=1e-9), dataset("causal_lm")
    trainer = (Trainer(model=model, args=args, train_dataset=data, callbacks=[SoftPromptCallback])
               if path == "callback" else SoftPromptTrainer(model=model, args=args, train_dataset=data))
    trainer.train()
    assert model.soft_prompts["default"] is prompt and get_injector(model) is injector
    assert len(model._forward_pre_hooks) == hooks  # not wrapped twice
    torch.testing.assert_close(model.soft_prompts["default"]().detach(), start, atol=1e-6, rtol=0)  # trained from it


def test_adapter_loaded_for_inference_evaluates_and_warns(tmp_path, caplog):
    save_soft_prompt(add_soft_prompt(tiny("llama", "causal_lm"), SoftPromptConfig(num_virtual_tokens=3)),
                     tmp_path / "adapter")
    model = load_soft_prompt(tiny("llama", "causal_lm"), tmp_path / "adapter")
    with caplog.at_level(logging.WARNING, logger="hf_softprompt"):
        trainer = callback_trainer(model, training_args(tmp_path), config=None)
    assert "no trainable parameters (an adapter loaded for inference)" in caplog.text
    assert "eval_loss" in trainer.evaluate(dataset("causal_lm"))


# ------------------------------------------------------------------------ saved files
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("encoder", [None, "mlp"])
def test_checkpoints_and_saved_model_hold_only_the_adapter(tmp_path, path, encoder):
    model = tiny("llama", "causal_lm")
    config = SoftPromptConfig(num_virtual_tokens=P, encoder=encoder)
    trainer = PATHS[path](model, training_args(tmp_path, max_steps=2, save_steps=2, save_strategy="steps"),
                          dataset("causal_lm"), config)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    model.save_pretrained(tmp_path / "direct")

    out = tmp_path / "out"
    assert set(os.listdir(out)) == {"checkpoint-2"}
    assert set(os.listdir(out / "checkpoint-2")) == CHECKPOINT
    assert set(os.listdir(tmp_path / "final")) == ADAPTER | {"training_args.bin"}
    assert set(os.listdir(tmp_path / "direct")) == ADAPTER
    with safe_open(str(tmp_path / "final" / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    expected = {"prompt_embeddings"} | ({f"hf_softprompt.{k}" for k in model.soft_prompts["default"].state_dict()}
                                        if encoder else set())
    assert keys == expected  # never a base weight
    torch.testing.assert_close(exported_prompt(tmp_path / "final"), model.soft_prompts["default"]().detach(),
                               atol=0, rtol=0)


def test_save_pretrained_is_the_model_s_own_again_after_remove_soft_prompt(tmp_path):
    model = tiny("gpt2", "causal_lm")
    callback_trainer(model, training_args(tmp_path))
    with pytest.raises(ValueError, match=r"push_to_hub=True\) is not supported .* save_soft_prompt\("):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    remove_soft_prompt(model)
    model.save_pretrained(tmp_path / "plain")
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "plain"))


@pytest.mark.parametrize("how", ["add_soft_prompt", "load_soft_prompt", "callback", "subclass"])
def test_save_pretrained_writes_the_adapter_whichever_way_the_prompt_came(tmp_path, how):
    model = tiny("gpt2", "causal_lm")
    if how == "add_soft_prompt":
        add_soft_prompt(model, PROMPT)
    elif how == "load_soft_prompt":
        source = add_soft_prompt(tiny("gpt2", "causal_lm"), PROMPT)
        save_soft_prompt(source, tmp_path / "saved")
        load_soft_prompt(model, tmp_path / "saved")
    else:
        PATHS[how](model, training_args(tmp_path))
    model.save_pretrained(tmp_path / "out")
    assert set(os.listdir(tmp_path / "out")) == ADAPTER  # never the base weights
    torch.testing.assert_close(exported_prompt(tmp_path / "out"), model.soft_prompts["default"]().detach(),
                               atol=0, rtol=0)


@pytest.mark.parametrize("path", ["callback", "subclass"])
def test_the_callback_finds_its_trainer(tmp_path, path):
    """`calling_trainer` reads the call stack of `Trainer.__init__`: this fails first when
    transformers changes how `on_init_end` is dispatched."""
    found = []

    class Spy(SoftPromptCallback):
        def on_init_end(self, args, state, control, **kwargs):
            found.append(calling_trainer(self))
            return super().on_init_end(args, state, control, **kwargs)

    model = tiny("gpt2", "causal_lm")
    args = training_args(tmp_path)
    if path == "callback":
        trainer = Trainer(model=model, args=args, callbacks=[Spy(PROMPT)])
        hooked = trainer.__dict__["_load_from_checkpoint"]  # the stock Trainer taught our loader
        assert isinstance(hooked, functools.partial) and hooked.func is load_from_checkpoint
    else:
        trainer = SoftPromptTrainer(model=model, args=args, callbacks=[Spy(PROMPT)])
        assert "_load_from_checkpoint" not in trainer.__dict__  # the subclass's own override serves
    assert found == [trainer]


# --------------------------------------------------------------------------- resume
@pytest.mark.parametrize("family,task,encoder,resume,path", [
    ("llama", "causal_lm", None, "path", "subclass"),
    ("llama", "causal_lm", "mlp", "last", "subclass"),
    ("llama", "causal_lm", "residual", "path", "subclass"),
    ("bert", "seq_cls", "lstm", "path", "subclass"),  # LSTM encoder and a trained head
    ("llama", "causal_lm", "mlp", "last", "callback"),  # the stock Trainer
    ("bert", "seq_cls", "lstm", "path", "callback"),
])
def test_resume_from_adapter_checkpoint_is_exact(tmp_path, family, task, encoder, resume, path):
    data, config = dataset(task), SoftPromptConfig(num_virtual_tokens=P, encoder=encoder)
    # 6 steps of 4 rows over 16: the resumed run starts mid-epoch and crosses an epoch boundary.
    args = dict(max_steps=6, save_steps=3, save_strategy="steps")
    full = tiny(family, task)
    subclass_trainer(full, training_args(tmp_path / "full", **args), data, config).train()

    model = tiny(family, task)
    trainer = PATHS[path](model, training_args(tmp_path / "resumed", **args), data, config)
    with torch.no_grad():  # the resumed prompt must come from the checkpoint, not from the seed
        for param in model.soft_prompts["default"].parameters():
            param.zero_()
    checkpoint = tmp_path / "full" / "out" / "checkpoint-3"
    if resume == "last":
        shutil.copytree(checkpoint, tmp_path / "resumed" / "out" / "checkpoint-3")
    trainer.train(resume_from_checkpoint=True if resume == "last" else str(checkpoint))

    assert trainer.state.global_step == 6
    ours, reference = adapter_state_dict(model), adapter_state_dict(full)
    assert ours.keys() == reference.keys()
    for key in reference:  # bit-exact
        torch.testing.assert_close(ours[key], reference[key], atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("path", ["subclass", "callback"])
def test_load_best_model_at_end_reloads_the_best_adapter(tmp_path, path):
    scores = iter([1.0, 3.0, 2.0])  # best at the second evaluation (step 4)
    args = training_args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                         save_steps=2, load_best_model_at_end=True, metric_for_best_model="score",
                         greater_is_better=True)
    data = dataset("causal_lm")
    model = tiny("llama", "causal_lm")
    trainer = PATHS[path](model, args, data, eval_dataset=data, compute_metrics=lambda _: {"score": next(scores)})
    trainer.train()

    out = tmp_path / "out"
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-4")
    assert not torch.equal(exported_prompt(out / "checkpoint-4"), exported_prompt(out / "checkpoint-6"))
    torch.testing.assert_close(model.soft_prompts["default"]().detach(), exported_prompt(out / "checkpoint-4"),
                               atol=0, rtol=0)


def test_a_callback_outside_a_trainer_refuses_checkpoint_loading(tmp_path):
    # Called by hand, the callback has no Trainer to give the adapter loaders to: it refuses what
    # the Trainer would then fail at, with the fix.
    args = training_args(tmp_path, load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps")
    fix = r"load_best_model_at_end=True needs SoftPromptTrainer.*load_soft_prompt\(model, checkpoint_dir, is_trainable"
    with pytest.raises(ValueError, match=fix):
        SoftPromptCallback(PROMPT).on_init_end(args, TrainerState(), TrainerControl(), model=tiny("llama", "causal_lm"))


# ------------------------------------------------------------------- loss normalisation
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_num_items_in_batch_counts_the_caller_s_targets(tmp_path, family):
    # The prompt changes the context, not the targets: a causal LM predicts labels[:, 1:], as without one.
    batch = batch_of(dataset("causal_lm", n=8, ragged=True))
    assert bool((batch["labels"][:, 0] != -100).any())
    expected = int((batch["labels"][:, 1:] != -100).sum())
    trainer = subclass_trainer(tiny(family, "causal_lm"), training_args(tmp_path))
    assert int(trainer._get_num_items_in_batch([batch], torch.device("cpu"))) == expected
    # The stock Trainer with the callback counts the same. Without a prompt it counts right for Llama,
    # whose loss_type says the loss shifts labels; GPT-2 has none, so a bare Trainer includes labels[:, 0].
    stock = callback_trainer(tiny(family, "causal_lm"), training_args(tmp_path))
    assert int(stock._get_num_items_in_batch([batch], torch.device("cpu"))) == expected
    bare = Trainer(model=tiny(family, "causal_lm"), args=training_args(tmp_path))
    assert int(bare._get_num_items_in_batch([batch], torch.device("cpu"))) == (
        expected if family == "llama" else int((batch["labels"] != -100).sum()))


@pytest.mark.parametrize("family,path", [("llama", "subclass"), ("gpt2", "subclass"), ("llama", "callback"),
                                         ("gpt2", "callback")])
def test_gradient_accumulation_equals_one_batch_and_the_token_mean(tmp_path, family, path):
    data = dataset("causal_lm", n=8, ragged=True)
    sgd = dict(max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0)
    results = {}
    for name, (batch_size, accumulation) in {"8x1": (8, 1), "4x2": (4, 2)}.items():
        model = tiny(family, "causal_lm")
        args = training_args(tmp_path / name, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, **sgd)
        trainer = PATHS[path](model, args, data)
        if name == "8x1":  # reference: the model's own mean over every real target of the 8 rows
            reference = copy.deepcopy(model)
            reference(**batch_of(data)).loss.backward()
            weight = reference.soft_prompts["default"].embedding.weight
            results["reference"] = (weight - weight.grad).detach()
        trainer.train()
        results[name] = model.soft_prompts["default"].embedding.weight.detach()
    torch.testing.assert_close(results["8x1"], results["reference"], atol=1e-5, rtol=0)
    torch.testing.assert_close(results["4x2"], results["reference"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,task", [("llama", "causal_lm"), ("bert", "seq_cls")])
def test_label_smoothing_smooths_aligned_logits(tmp_path, family, task):
    eps = 0.1
    data = dataset(task, n=8, ragged=True) if task == "causal_lm" else dataset(task, n=8)
    model = tiny(family, task)
    trainer = subclass_trainer(model, training_args(tmp_path, label_smoothing_factor=eps), data)
    batch = batch_of(data)
    loss = trainer.compute_loss(model, dict(batch))

    logits = reference_outputs(_base(family, task), model.soft_prompts["default"]().detach(), batch, task)["logits"]
    labels = batch["labels"]
    if task == "causal_lm":  # the Trainer shifts: labels[:, 0] has no logit in the caller's view
        logits, labels = logits[:, :-1], labels[:, 1:]
        count = int((labels != -100).sum())
        assert int(trainer._get_num_items_in_batch([batch], torch.device("cpu"))) == count
    expected = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), label_smoothing=eps)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(losses(trainer))))


# ---------------------------------------------------------------- evaluate and predict
@pytest.mark.parametrize("family,task", [("llama", "causal_lm"), ("bert", "seq_cls"), ("bert", "token_cls")])
def test_evaluate_and_predict_see_logits_aligned_with_labels(tmp_path, family, task):
    data = dataset(task, n=10)
    seen = []

    def compute_metrics(prediction):
        seen.append((prediction.predictions.shape, prediction.label_ids.shape))
        return {"n": float(len(prediction.label_ids))}

    model = tiny(family, task)
    args = training_args(tmp_path, per_device_eval_batch_size=4, eval_accumulation_steps=1)
    trainer = subclass_trainer(model, args, data, compute_metrics=compute_metrics)
    metrics = trainer.evaluate(data)
    output = trainer.predict(data)

    labels = torch.tensor(data["labels"])
    num_labels = VOCAB if task == "causal_lm" else 3
    shape = (*labels.shape, num_labels)
    assert seen == [(shape, tuple(labels.shape))] * 2
    assert metrics["eval_n"] == 10 and "eval_loss" in metrics
    with torch.no_grad():
        direct = model(**batch_of(data)).logits
    torch.testing.assert_close(torch.as_tensor(output.predictions), direct, atol=1e-5, rtol=0)

    loss_only = subclass_trainer(tiny(family, task), training_args(tmp_path, prediction_loss_only=True),
                                 data, compute_metrics=compute_metrics)
    output = loss_only.predict(data)
    assert output.predictions is None and output.label_ids is None
    assert "test_loss" in output.metrics and len(seen) == 2


# --------------------------------------------------------------------- training options
@pytest.mark.parametrize("options", [
    pytest.param({"activation_checkpointing": True}, marks=pytest.mark.skipif(
        "activation_checkpointing" not in inspect.signature(TrainingArguments).parameters,
        reason="transformers < 5.20 spells it gradient_checkpointing (the next case)")),
    {"gradient_checkpointing": True},  # the deprecated spelling
    {"bf16": True},
], ids=["activation_checkpointing", "gradient_checkpointing", "bf16"])
@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")
def test_training_options_keep_training_the_prompt(tmp_path, options):
    model = tiny("llama", "causal_lm")
    before = base_state(model)
    trainer = subclass_trainer(model, training_args(tmp_path, **options), dataset("causal_lm"))
    start = model.soft_prompts["default"].embedding.weight.detach().clone()
    trainer.train()
    assert all(torch.isfinite(torch.tensor(losses(trainer))))
    assert not torch.equal(model.soft_prompts["default"].embedding.weight, start)
    assert all(torch.equal(v, before[k]) for k, v in base_state(model).items())
    assert model.soft_prompts["default"].embedding.weight.dtype == torch.float32


@pytest.mark.slow
def test_torch_compile_trains_the_prompt_as_eager_does(tmp_path):
    # aot_eager: Dynamo and AOTAutograd trace our hooks as inductor would, without its C++ build
    # (the default backend takes minutes on 2 CPU cores and generates code we do not touch).
    runs = {}
    for name, options in {"eager": {}, "compiled": {"torch_compile": True,
                                                    "torch_compile_backend": "aot_eager"}}.items():
        model = tiny("llama", "causal_lm")
        trainer = subclass_trainer(model, training_args(tmp_path / name, max_steps=2, **options),
                                   dataset("causal_lm"))
        trainer.train()
        runs[name] = (losses(trainer), model.soft_prompts["default"].embedding.weight.detach())
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
    assert runs["compiled"][0] == pytest.approx(runs["eager"][0], abs=1e-5)
    torch.testing.assert_close(runs["compiled"][1], runs["eager"][1], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- logging
@pytest.mark.parametrize("path", list(PATHS))
def test_trainable_count_is_logged_once_at_the_start(tmp_path, path, caplog, capsys):
    model = tiny("llama", "causal_lm")
    trainer = PATHS[path](model, training_args(tmp_path), dataset("causal_lm"))
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="hf_softprompt"):
        trainer.train()
    printed = [line for line in capsys.readouterr().out.splitlines() if "soft prompt:" in line]
    trainable = P * model.config.hidden_size
    messages = [r.getMessage() for r in caplog.records if "soft prompt:" in r.getMessage()]
    assert len(messages) == 1
    assert re.fullmatch(rf"soft prompt: {P} virtual tokens, {trainable:,} trainable parameters \([0-9.]+ %\)",
                        messages[0])
    entries = [h for h in trainer.state.log_history if "trainable_params" in h]
    if path == "callback":  # only the subclass can call Trainer.log: the callback prints the line
        assert entries == [] and printed == messages
    else:
        assert printed == []  # shown by the Trainer's own log output instead
        assert trainer.state.log_history[0] is entries[0] and len(entries) == 1
        total = sum(p.numel() for p in model.parameters())
        assert entries[0]["trainable_params"] == trainable
        assert entries[0]["soft_prompt_virtual_tokens"] == P
        assert entries[0]["trainable_percent"] == pytest.approx(100 * trainable / total)


# ------------------------------------------------------------------- errors and hooks
def test_errors_name_the_problem_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match="SoftPromptCallback got no model from the Trainer"):
        prepare_model(None, None)
    with pytest.raises(TypeError, match=r"Expected a SoftPromptConfig \(or PEFT's PromptTuningConfig / "
                                        r"PromptEncoderConfig\), a non-empty dict of them by prompt "
                                        r"name, or None; got \{'num_virtual_tokens': 8\}"):
        SoftPromptCallback({"num_virtual_tokens": 8})
    prompted = add_soft_prompt(tiny("llama", "causal_lm"), SoftPromptConfig(num_virtual_tokens=3))
    with pytest.raises(ValueError, match=r"already carries soft prompts \['default'\].*remove_soft_prompt"):
        callback_trainer(prompted, training_args(tmp_path))
    with pytest.raises(ValueError, match="more than one prompt"):
        SoftPromptTrainer(model=tiny("llama", "causal_lm"), args=training_args(tmp_path),
                          soft_prompt_config=SoftPromptConfig(), callbacks=[SoftPromptCallback])


def test_model_init_without_a_prompt_fails_before_training(tmp_path):
    trainer = Trainer(model_init=lambda: tiny("llama", "causal_lm"), args=training_args(tmp_path),
                      train_dataset=dataset("causal_lm"), callbacks=[SoftPromptCallback])
    with pytest.raises(ValueError, match="carries no soft prompt: with model_init.*add_soft_prompt"):
        trainer.train()


@pytest.mark.parametrize("name,params", [
    ("_save", ["self", "output_dir", "state_dict"]),  # calls model.save_pretrained: our adapter save
    ("_load_from_checkpoint", ["self", "resume_from_checkpoint", "model"]),
    ("_load_best_model", ["self"]),
    ("_get_num_items_in_batch", ["self", "batch_samples", "device"]),
    ("_push_from_checkpoint", ["self", "checkpoint_folder"]),  # hub_strategy pushes (test_hub.py)
    ("_finish_current_push", ["self"]),  # called by our push_to_hub, as upstream's does
])
def test_private_trainer_hooks_we_rely_on_exist(name, params):
    # Each is also exercised above; this names the upstream rename when one happens.
    assert list(inspect.signature(getattr(Trainer, name)).parameters) == params
    assert name in ("_save", "_finish_current_push") or name in vars(SoftPromptMixin)


# --------------------------------------------------------------------------- learning rate
@pytest.mark.parametrize("path", ["subclass", "callback"])
@pytest.mark.parametrize("lr,warns", [(5e-5, True), (3e-2, False)])
def test_a_learning_rate_too_low_for_a_prompt_is_named_at_the_start(tmp_path, path, lr, warns):
    model, data = tiny("llama", "causal_lm"), dataset("causal_lm")
    config = SoftPromptConfig(num_virtual_tokens=P)
    args = training_args(tmp_path, max_steps=1, learning_rate=lr)
    if path == "subclass":
        trainer = SoftPromptTrainer(model=model, args=args, train_dataset=data, soft_prompt_config=config)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[SoftPromptCallback(config)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught if "train at learning_rate" in str(w.message)]
    if warns:
        assert len(messages) == 1 and "learning_rate=5e-05" in messages[0]
        assert "TrainingArguments(learning_rate=0.1)" in messages[0]
    else:
        assert messages == []
