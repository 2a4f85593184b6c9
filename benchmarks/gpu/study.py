"""GRPO vs ShapE-GRPO vs Winner-Takes-All with a real instruct LM (SmolLM2-135M-Instruct) on ``aclsum`` and
``recsys_nl``, several seeds, on one GPU in about ten minutes (``benchmarks/gpu/run_study.sh`` installs what
it needs and runs this).

    python benchmarks/gpu/study.py                               # 3 seeds x 2 tasks x 3 methods x 40 steps
    python benchmarks/gpu/study.py --seeds 0 1 2 3 4 --steps 80 --workers 6
    python benchmarks/gpu/study.py --device cpu --steps 1 --seeds 1 --tasks recsys_nl --methods grpo  # wiring

Protocol (the same for every method; nothing is tuned per method): full fine-tuning of the prepared
checkpoint (bf16 on the GPU), G = 8 completions for 4 prompts per step, completions of at most 64 tokens,
temperature 0.7, lr 1e-5, beta 0, format penalty 0.1; held-out evaluation every ``--eval-every`` steps on
the first ``--eval-prompts`` eval prompts (the same prompts and sampling seed for every run: common random
numbers). Runs are independent processes sharing the GPU (``--workers`` at a time: a 135M model leaves an
H200 mostly idle, so running several at once is what fits the budget). ``--vllm`` generates with vLLM
through TRL (colocate mode) when vLLM is installed.

Writes, like ``benchmarks/convergence.py``: ``<results>/gpu_study.csv`` (columns
``method,game,seed,step,eval_set_utility,eval_candidate_utility``; ``game`` holds the task name),
``gpu_study.png`` (mean curves with 95% t-intervals across seeds) and ``gpu_study_summary.txt`` (final eval
set utility per task and method with its interval, and seconds per step).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/: the CPU study's plot and interval helpers

TASKS = {
    "aclsum": {"num_candidates": 3, "max_source_words": 120},
    "recsys_nl": {
        "num_candidates": 3,
        "num_items": 60,
        "num_genres": 8,
        "history_len": 4,
        "pool_size": 12,
        "background_affinity": 0.3,
    },
}
METHODS = ("grpo", "shapegrpo", "wta")


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One (task, method, seed) training run in its own process; returns its eval curve and step times."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from shapegrpo_core.models import resolve_model
    from shapegrpo_core.tasks import get_task
    from shapegrpo_core.training import train_policy

    torch.set_num_threads(spec["threads"])
    task = get_task(spec["task"], **TASKS[spec["task"]])
    gpu = spec["device"] == "cuda"
    options: dict[str, Any] = {"use_cpu": not gpu, "bf16": gpu}
    if spec["vllm"]:
        options |= {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.08}
    eval_dataset = task.build_dataset("eval", 0).select(range(spec["eval_prompts"]))
    out = Path(spec["out"]) / f"{spec['task']}-{spec['method']}-{spec['seed']}"
    start = time.perf_counter()
    result = train_policy(
        task,
        resolve_model(spec["model"]),
        out,
        method=spec["method"],
        max_steps=spec["steps"],
        seed=spec["seed"],
        num_generations=spec["generations"],
        prompts_per_step=spec["prompts"],
        max_completion_length=spec["max_completion_length"],
        temperature=0.7,
        learning_rate=spec["lr"],
        format_penalty=0.1,
        eval_every=spec["eval_every"],
        eval_dataset=eval_dataset,
        eval_num_prompts=None,
        eval_num_samples=spec["eval_samples"],
        save_strategy="no",
        resume=False,
        **options,
    )
    return {
        **{k: spec[k] for k in ("task", "method", "seed")},
        "curve": result.eval_curve,
        "seconds_per_step": result.seconds_per_step,
        "wall_s": time.perf_counter() - start,
    }


def summarize(results: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    from convergence import mean_ci

    lines = [
        f"SmolLM2-135M-Instruct, full fine-tuning, {args.prompts} prompts x G={args.generations}, "
        f"{args.steps} steps, lr {args.lr:g}, {len(args.seeds)} seeds, device {args.device}"
    ]
    for task in args.tasks:
        lines.append(f"\ntask={task}")
        lines.append(f"  {'method':10} {'step 0':>8} {'final eval set utility [95% CI]':>34} {'s/step':>8}")
        for method in args.methods:
            runs = [r for r in results if r["task"] == task and r["method"] == method]
            first = mean_ci([r["curve"][0]["eval_set_utility"] for r in runs])[0]
            m, lo, hi = mean_ci([r["curve"][-1]["eval_set_utility"] for r in runs])
            sps = sum(r["seconds_per_step"] for r in runs) / len(runs)
            lines.append(f"  {method:10} {first:8.4f} {f'{m:.4f} [{lo:.4f}, {hi:.4f}]':>34} {sps:8.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=["grpo", "shapegrpo", "loo", "wta"]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=2)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--vllm", action="store_true", help="vLLM rollouts through TRL (colocate)")
    parser.add_argument("--workers", type=int, default=6, help="runs at once (processes sharing the GPU)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per run")
    parser.add_argument("--results", type=Path, default=HERE.parent / "results")
    parser.add_argument("--out", type=Path, default=Path("data/gpu_study"))
    args = parser.parse_args()
    args.eval_every = min(args.eval_every, args.steps)

    # Prepare the checkpoint once, before the workers race to do it.
    from shapegrpo_core.models import resolve_model

    model = str(resolve_model(args.model))
    specs = [
        {**vars(args), "model": model, "out": str(args.out), "results": None, "seeds": None,
         "tasks": None, "methods": None, "task": task, "method": method, "seed": seed}
        for seed in args.seeds for task in args.tasks for method in args.methods
    ]  # fmt: skip
    start = time.perf_counter()
    import multiprocessing

    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(run_one, specs))
    args.results.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "method": r["method"],
            "game": r["task"],
            "seed": r["seed"],
            "step": p["step"],
            "eval_set_utility": p["eval_set_utility"],
            "eval_candidate_utility": p["eval_candidate_utility"],
        }
        for r in results
        for p in r["curve"]
    ]
    with (args.results / "gpu_study.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    from convergence import plot

    plot(rows, args.tasks, tuple(args.methods), args.results / "gpu_study.png", args.lr, title="SmolLM2")
    lines = summarize(results, args)
    lines.append(f"\ntotal wall-clock: {(time.perf_counter() - start) / 60:.1f} min ({args.workers} workers)")
    (args.results / "gpu_study_summary.txt").write_text("\n".join(lines) + "\n")
    (args.results / "gpu_study_runs.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "curve"} for r in results], indent=1)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
