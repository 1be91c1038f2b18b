"""Fixtures for the tests against a real vLLM engine (CPU): a tiny Llama and its tokenizer saved to
disk, three trained-looking prompts saved with save_soft_prompt, and vLLM's CPU settings.

Run in the vLLM virtual environment (docs/serving.md): `python -m pytest -q tests_vllm`.
"""

from __future__ import annotations

import os

import pytest

# Set before vLLM is imported: a 1 GiB KV cache, the engine in this process (readable errors).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tiny import build_prompts, build_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny-llama"))
    build_tiny_llama(path)
    return path


@pytest.fixture(scope="session")
def prompts_dir(model_dir, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("prompts"))
    build_prompts(model_dir, path)
    return path
