"""Seconds per ShapE-GRPO training step of the real model (SmolLM2-135M-Instruct) on CPU, split into
generation, scoring + credit, and the backward pass, with LoRA and with full fine-tuning.

    python benchmarks/real_model_step.py                      # aclsum and recsys_nl, LoRA and full, 3 steps
    python benchmarks/real_model_step.py --tasks aclsum --steps 2 --threads 2

Each configuration trains ``--steps`` optimizer steps of ``--prompts`` prompts x G = ``--generations``
completions of at most ``--max-completion-length`` tokens, one thread by default, from the prepared checkpoint
(``shapegrpo-prepare-model``; prepared here on first use). The split is measured inside the trainer:

* generation: TRL's ``generate`` call (wall time of ``ShapEGRPOTrainer._generate_single_turn``);
* scoring + credit: the reward call (parse + game) and the credit hook (``shapegrpo/credit_seconds``);
* backward: everything else of TRL's ``step_time`` (forward of the policy on prompt + completion, backward,
  AdamW).

Numbers are per step, mean over the steps after the first (the first pays one-off allocations; with one step
it is reported as is). CPU time is the process's; on a shared machine wall time moves with the load.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def measure(task_name: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from shapegrpo_core.models import resolve_model
    from shapegrpo_core.tasks import get_task
    from shapegrpo_core.trainer import ShapEGRPOTrainer
    from shapegrpo_core.training import train_policy

    options = {
        "aclsum": {"max_source_words": args.source_words},
        "recsys_nl": {"background_affinity": 0.3, "num_train_users": 64, "num_eval_users": 8},
    }[task_name]
    task = get_task(task_name, **options)
    base = resolve_model(args.model)
    timings: dict[str, list[float]] = {"generate": [], "reward": []}

    original_generate = ShapEGRPOTrainer._generate_single_turn
    original_reward = type(task).games

    def timed_generate(self: Any, *a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        try:
            return original_generate(self, *a, **k)
        finally:
            timings["generate"].append(time.perf_counter() - start)

    def timed_games(self: Any, *a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        try:
            return original_reward(self, *a, **k)
        finally:
            timings["reward"].append(time.perf_counter() - start)

    ShapEGRPOTrainer._generate_single_turn = timed_generate  # type: ignore[method-assign]
    type(task).games = timed_games  # type: ignore[method-assign]
    torch.set_num_threads(args.threads)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as out:
            result = train_policy(
                task,
                base,
                out,
                method="shapegrpo",
                max_steps=args.steps,
                num_generations=args.generations,
                prompts_per_step=args.prompts,
                max_completion_length=args.max_completion_length,
                temperature=args.temperature,
                learning_rate=1e-4 if mode == "lora" else 1e-5,
                lora={"r": 8, "alpha": 16} if mode == "lora" else None,
                save_strategy="no",
                seed=0,
            )
    finally:
        ShapEGRPOTrainer._generate_single_turn = original_generate  # type: ignore[method-assign]
        type(task).games = original_reward  # type: ignore[method-assign]
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    steps = [h for h in result.history if "step_time" in h]
    keep = slice(1, None) if len(steps) > 1 else slice(None)
    step = [h["step_time"] for h in steps][keep]
    gen = timings["generate"][keep]
    credit = [h.get("shapegrpo/credit_seconds", 0.0) for h in steps][keep]
    reward = timings["reward"][keep]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    scoring = mean(reward) + mean(credit)
    return {
        "task": task_name,
        "mode": mode,
        "step_s": mean(step),
        "generation_s": mean(gen),
        "scoring_credit_s": scoring,
        "backward_s": mean(step) - mean(gen) - scoring,
        "run_wall_s": wall,
        "run_cpu_s": cpu,
        "reward_std": mean([h.get("reward_std", float("nan")) for h in steps]),
        "completion_len": mean([h.get("completions/mean_length", float("nan")) for h in steps]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tasks", nargs="+", default=["aclsum", "recsys_nl"])
    parser.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--source-words", type=int, default=80)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    rows = [measure(t, m, args) for t in args.tasks for m in args.modes]
    print(
        f"SmolLM2-135M-Instruct, {args.prompts} prompts x G={args.generations} completions of <= "
        f"{args.max_completion_length} tokens, {args.threads} thread(s), mean of steps 2..{args.steps}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    header = (
        f"{'task':10} {'mode':5} {'s/step':>7} {'generation':>11} {'scoring+credit':>15} {'backward':>9} "
        f"{'run wall':>9} {'run cpu':>8} {'reward std':>10} {'compl len':>9}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['task']:10} {r['mode']:5} {r['step_s']:7.2f} {r['generation_s']:11.2f} "
            f"{r['scoring_credit_s']:15.3f} {r['backward_s']:9.2f} {r['run_wall_s']:9.1f} "
            f"{r['run_cpu_s']:8.1f} {r['reward_std']:10.3f} {r['completion_len']:9.1f}"
        )


if __name__ == "__main__":
    main()
