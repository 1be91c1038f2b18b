"""Run by test_distributed.py under torchrun: two CPU processes (gloo) train one soft prompt
through `SoftPromptTrainer`; each rank writes what it ended with to `<out>/rank<N>.pt`."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import TrainingArguments

sys.path.insert(0, os.path.dirname(__file__))
from models import make_model  # noqa: E402

import hf_softprompt.files.save as save_module  # noqa: E402
from hf_softprompt import SoftPromptConfig, SoftPromptTrainer  # noqa: E402


def main(out: str) -> None:
    rank = int(os.environ["RANK"])
    writes: list[str] = []
    save = save_module.save_soft_prompt

    def recording_save(model, directory, **kwargs):  # which rank writes adapter files, and where
        writes.append(os.path.relpath(directory, out))
        return save(model, directory, **kwargs)

    save_module.save_soft_prompt = recording_save

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (16, 6), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = 7
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": labels.tolist()})
    args = TrainingArguments(
        output_dir=out, use_cpu=True, ddp_backend="gloo", per_device_train_batch_size=4, max_steps=4,
        save_steps=2, learning_rate=0.1, report_to="none", disable_tqdm=True, logging_steps=1,
        ddp_find_unused_parameters=False,  # every trainable parameter gets a gradient
    )
    model = make_model("llama", "causal_lm", initializer_range=0.2)
    trainer = SoftPromptTrainer(model=model, args=args, train_dataset=data,
                                soft_prompt_config=SoftPromptConfig(num_virtual_tokens=4))
    trainer.train()
    trainer.save_model(os.path.join(out, "final"))
    batches = [batch["input_ids"][:, 0].tolist() for batch in trainer.get_train_dataloader()]
    torch.save({
        "prompt": model.soft_prompts["default"].embedding.weight.detach().clone(),
        "writes": writes,
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "first_tokens": batches,
    }, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
