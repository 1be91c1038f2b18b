"""The main job under several prompt settings and seeds: the table of what each method gave.

Each setting is a name and the `examples/run_multitask.py` flags it adds to the main job's defaults;
every (setting, seed) runs as its own process with `--text_baselines false` (the text baselines do
not depend on the prompt) into `<out_dir>/<setting>/<seed>/`, skipped when its `results.json` is
already there, so an interrupted sweep resumes. Then one Markdown row per setting: held-out exact
match per task and over all rows, mean ± std over the seeds, the lowest task score on any seed, the
trainable parameters per prompt and the mean training time.

    python benchmarks/sweep_multitask.py --seeds 42 1 2 --parallel 2 --threads 1 \\
        --setting "plain lr 0.03=" --setting "residual=--encoder residual --encoder_hidden_size 8"

A script, not a test: a sweep of six seeds takes hours on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_setting(text: str) -> tuple[str, list[str]]:
    """`"name=--flag value ..."` -> (name, flags)."""
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--setting must read 'name=flags' (flags may be empty), got {text!r}.")
    return name.strip(), shlex.split(flags)


def run_one(name: str, flags: list[str], seed: int, out_dir: Path, threads: int) -> Path:
    """Run the main job for one setting and seed (unless already done); the path of its results.json."""
    run_dir = out_dir / name.replace(" ", "_").replace("/", "_") / str(seed)
    results = run_dir / "results.json"
    if results.exists():
        return results
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(ROOT / "examples" / "run_multitask.py"), "--text_baselines", "false",
               "--score_initial_prompts", "false", "--eval_strategy", "no", "--seed", str(seed),
               "--output_dir", str(run_dir), *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed ({done.returncode}); see {run_dir / 'log.txt'}")
    print(f"{name} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    return results


def mean_std(values: list[float]) -> str:
    """`mean ± std` (sample std; 0 for one value), one decimal."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {std:.1f}"


def table_row(name: str, flags: list[str], results: list[dict]) -> str:
    """One Markdown row: per-task and overall exact match after training, over the seeds."""
    tasks = results[0]["tasks"]
    after = [r["exact_match"]["prompt after"] for r in results]
    cells = [mean_std([100 * a[task] for a in after]) for task in [*tasks, "all"]]
    lowest = 100 * min(a[task] for a in after for task in tasks)
    trainable = results[0].get("trainable_parameters_per_prompt", "")
    seconds = statistics.mean(r["train"]["train_runtime"] for r in results)
    seeds = ", ".join(str(r["seed"]) for r in results)
    return (f"| {name} | `{shlex.join(flags)}` | {seeds} | " + " | ".join(cells)
            + f" | {lowest:.1f} | {trainable} | {seconds:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", action="append", required=True, help="'name=flags of run_multitask.py'")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3, 4, 5])
    parser.add_argument("--out_dir", type=Path, default=ROOT / "output" / "sweep_multitask")
    parser.add_argument("--parallel", type=int, default=1, help="Runs at once (each with --threads threads).")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    settings = [parse_setting(s) for s in args.setting]
    jobs = [(name, flags, seed) for seed in args.seeds for name, flags in settings]
    with ThreadPoolExecutor(args.parallel) as pool:
        paths = list(pool.map(lambda job: run_one(*job, args.out_dir, args.threads), jobs))
    by_setting: dict[str, list[dict]] = {}
    for (name, _, _), path in zip(jobs, paths, strict=True):
        by_setting.setdefault(name, []).append(json.loads(path.read_text()))
    tasks = next(iter(by_setting.values()))[0]["tasks"]
    print(f"| setting | flags | seeds | {' | '.join(tasks)} | all | lowest task, any seed "
          "| trainable per prompt | train s |")
    print("|---|---|---|" + "---:|" * (len(tasks) + 4))
    for name, flags in settings:
        print(table_row(name, flags, by_setting[name]))


if __name__ == "__main__":
    main()
