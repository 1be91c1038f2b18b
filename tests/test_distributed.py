"""Two CPU processes (torchrun, gloo) train one prompt through the Trainer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from hf_softprompt.files.load import read_adapter

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_script.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args: str, nproc: int = 2) -> None:
    """Run `script` in `nproc` CPU processes under torchrun (gloo); fail the test with their output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), script, *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_end_with_one_prompt_and_rank_zero_writes(tmp_path):
    torchrun(SCRIPT, str(tmp_path))

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["world_size"] == 2 and rank0["backend"] == "gloo"
    assert rank0["first_tokens"] != rank1["first_tokens"]  # each rank trains on its own shard
    torch.testing.assert_close(rank0["prompt"], rank1["prompt"], atol=0, rtol=0)
    assert rank0["writes"] == ["checkpoint-2", "checkpoint-4", "final"]
    assert rank1["writes"] == []
    _, tensors = read_adapter(tmp_path / "final")
    torch.testing.assert_close(tensors["prompt_embeddings"], rank0["prompt"], atol=0, rtol=0)
