"""Convergence of GRPO vs ShapE-GRPO vs the leave-one-out ablation on the recsys task, measured in one run.

    python benchmarks/convergence.py          # default: 5 seeds x 2 games x 3 methods x 200 steps, ~25 min
    python benchmarks/convergence.py --seeds 10 --steps 400 --eval-prompts 68   # scale up
    python benchmarks/convergence.py --seeds 2 --steps 40 --lr 1e-3            # quick look, no sweep

Protocol (the same for every method; nothing is tuned per method):

1. One SFT warm start (format only: K distinct items, no preferences) of a small word-level Llama
   (hidden 64, 2 layers) on the recsys world (seed 0). Both games use the same world, hence the same
   demonstrations and the same warm start.
2. Shared hyperparameters are tuned once, on GRPO only: a learning-rate sweep (``--lrs``) at the full step
   budget on both games with a tuning seed that is not one of the reported seeds, scored on held-out users
   that are *not* the reporting eval users (eval split rows ``[eval_prompts, eval_prompts + tune_prompts)``).
   The score is the mean over games of the mean eval set utility over the last three evaluations. The winner
   is then fixed for all methods.
3. For each game (best_of_set, coverage), seed and method (grpo = uniform credit / lam 0, shapegrpo = Shapley
   credit / lam 1, loo = leave-one-out credit / lam 1): ``train_policy`` from the warm start with the same
   settings, evaluating every ``--eval-every`` steps on the first ``--eval-prompts`` eval users
   (``--eval-samples`` samples each, eval seed 0 for every run: common random numbers). Runs are interleaved
   (game, seed, then method) so that load drift on a shared machine hits every method alike.

Outputs ``benchmarks/results/convergence.csv`` (columns
``method,game,seed,step,eval_set_utility,eval_candidate_utility``), ``convergence.png`` (mean learning curves
with 95% t-intervals across seeds) and ``convergence_summary.txt`` (the printed summary). Printed per game and
method: eval steps to reach 90% of GRPO's final eval set utility (and, because the warm start may already
start near that level, also 90% of GRPO's *gain* over step 0), both as a ratio to GRPO's; final eval set
utility with a 95% interval across seeds; per-step time as a ratio to GRPO's (wall clock, and process CPU
time; held-out evaluation excluded).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from shapegrpo_core.policy import warm_start  # noqa: E402
from shapegrpo_core.tasks.recsys import RecsysTask  # noqa: E402
from shapegrpo_core.training import train_policy  # noqa: E402

RESULTS = Path(__file__).parent / "results"
METHODS = ("grpo", "shapegrpo", "loo")  # the committed study's methods; --methods adds wta
GAMES = ("best_of_set", "coverage")
TUNING_SEED = 1000
# Two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30 (beyond: 1.96 is within 2%).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]  # fmt: skip
WARM_START = {
    "num_demos": 3000,
    "epochs": 2.0,
    "batch_size": 32,
    "learning_rate": 3e-3,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 2,
    "seed": 0,
}


class StepTimer(TrainerCallback):
    """Wall and process-CPU seconds of each optimizer step (generation, scoring, credit, backward).

    Registered before the held-out evaluation callback, whose on_step_end runs after this one's, so evaluation
    time is not counted."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._start = (0.0, 0.0)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval across seeds."""
    x = np.asarray(values, dtype=np.float64)
    m = float(x.mean())
    if x.size < 2:
        return m, m, m
    half = (T975[x.size - 2] if x.size - 1 <= len(T975) else 1.96) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return m, m - half, m + half


def steps_to_reach(curve: dict[int, float], threshold: float) -> int | None:
    """First evaluated step whose (seed-mean) eval set utility is >= threshold; None if never."""
    for step in sorted(curve):
        if curve[step] >= threshold:
            return step
    return None


def run_one(
    task: RecsysTask,
    policy: Path,
    out: Path,
    method: str,
    seed: int,
    lr: float,
    args: argparse.Namespace,
    eval_rows: tuple[int, int],
) -> tuple[list[dict[str, float]], StepTimer, float]:
    eval_dataset = task.build_dataset("eval", 0).select(range(*eval_rows))
    timer = StepTimer()
    start = time.perf_counter()
    result = train_policy(
        task,
        policy,
        out,
        method=method,
        max_steps=args.steps,
        seed=seed,
        num_generations=args.num_generations,
        prompts_per_step=args.prompts_per_step,
        learning_rate=lr,
        max_completion_length=args.max_completion_length,
        temperature=1.0,
        beta=0.0,
        format_penalty=args.format_penalty,
        save_steps=args.steps,  # one checkpoint at the end: the benchmark does not need resumability
        save_total_limit=1,
        eval_every=args.eval_every,
        eval_dataset=eval_dataset,
        eval_num_prompts=None,
        eval_num_samples=args.eval_samples,
        eval_seed=0,
        callbacks=[timer],
        resume=False,
        logging_steps=args.eval_every,
        log_level="error",
    )
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return result.eval_curve, timer, wall


def ratio(a: int | None, b: int | None) -> str:
    """Steps ratio as printed: 'never' if the method never reached the threshold, 'n/a' if GRPO did at 0."""
    if a is None:
        return "never"
    if not b:
        return "n/a"
    return f"{a / b:.2f}"


def tail_score(curve: list[dict[str, float]], last: int = 3) -> float:
    return float(np.mean([e["eval_set_utility"] for e in curve[-last:]]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="reported seeds 0..N-1 (default 5)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default 200)")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-prompts", type=int, default=64, help="reporting eval users (first rows of eval)")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per eval user")
    p.add_argument("--tune-prompts", type=int, default=32, help="eval users for tuning (disjoint)")
    p.add_argument("--lrs", type=str, default="5e-4,1e-3,2e-3,4e-3", help="GRPO learning-rate sweep")
    p.add_argument("--lr", type=float, default=None, help="skip the sweep and use this learning rate")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=12)
    p.add_argument(
        "--format-penalty",
        type=float,
        default=0.1,
        help="set-reward penalty for a response that is not exactly K distinct items (all methods alike)",
    )
    p.add_argument("--games", type=str, default=",".join(GAMES))
    p.add_argument(
        "--methods", type=str, default=",".join(METHODS), help="grpo first, then any of shapegrpo,loo,wta"
    )
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/shapegrpo-convergence"))
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(1)
    games = [g for g in args.games.split(",") if g]
    methods = tuple(m for m in args.methods.split(",") if m)
    if not methods or methods[0] != "grpo":
        p.error("--methods must start with grpo (the reference every ratio is taken against)")
    seeds = list(range(args.seeds))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    tasks = {g: RecsysTask(game=g, seed=0) for g in games}
    num_eval = len(tasks[games[0]].build_dataset("eval", 0))
    if args.eval_prompts + args.tune_prompts > num_eval:
        raise SystemExit(f"--eval-prompts + --tune-prompts must be <= {num_eval} (eval users)")
    report_rows = (0, args.eval_prompts)
    tune_rows = (args.eval_prompts, args.eval_prompts + args.tune_prompts)

    policy = args.work_dir / "warm_start"
    if not (policy / "config.json").is_file():
        warm_start(tasks[games[0]], policy, **WARM_START)
    print(f"warm start ready at {policy} ({time.perf_counter() - t0:.0f} s)", flush=True)

    # -- 1. tune the shared learning rate once, on GRPO ------------------------------------------------
    sweep: dict[float, float] = {}
    if args.lr is None:
        for lr in [float(x) for x in args.lrs.split(",")]:
            scores = []
            for g in games:
                curve, _, wall = run_one(
                    tasks[g], policy, args.work_dir / "tune", "grpo", TUNING_SEED, lr, args, tune_rows
                )
                scores.append(tail_score(curve))
                print(f"  tune grpo lr={lr:g} {g}: {scores[-1]:.4f} ({wall:.0f} s)", flush=True)
            sweep[lr] = float(np.mean(scores))
        lr = max(sweep, key=lambda k: sweep[k])
    else:
        lr = args.lr

    # -- 2. the comparison -------------------------------------------------------------------------------
    rows: list[dict[str, Any]] = []
    timing: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: {"wall": [], "cpu": []})
    for g in games:
        for seed in seeds:
            for method in methods:
                curve, timer, wall = run_one(
                    tasks[g], policy, args.work_dir / "run", method, seed, lr, args, report_rows
                )
                for e in curve:
                    rows.append(
                        {
                            "method": method,
                            "game": g,
                            "seed": seed,
                            "step": e["step"],
                            "eval_set_utility": e["eval_set_utility"],
                            "eval_candidate_utility": e["eval_candidate_utility"],
                        }
                    )
                timing[(g, method)]["wall"].append(float(np.mean(timer.wall)))
                timing[(g, method)]["cpu"].append(float(np.mean(timer.cpu)))
                print(
                    f"  {g} seed={seed} {method}: final {curve[-1]['eval_set_utility']:.4f} "
                    f"step {np.mean(timer.wall):.3f} s wall ({wall:.0f} s total)",
                    flush=True,
                )

    csv_path = args.results / "convergence.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=["method", "game", "seed", "step", "eval_set_utility", "eval_candidate_utility"]
        )
        writer.writeheader()
        writer.writerows(rows)

    # -- 3. summary ----------------------------------------------------------------------------------------
    by: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[(r["game"], r["method"])][r["step"]].append(r["eval_set_utility"])
    final_step = max(r["step"] for r in rows)

    say("ShapE-GRPO convergence benchmark (recsys, embedded synthetic world)")
    say(
        f"budget: {len(seeds)} seeds x {args.steps} steps, G={args.num_generations}, "
        f"{args.prompts_per_step} prompts/step, max_completion_length={args.max_completion_length}, "
        f"eval every {args.eval_every} steps on {args.eval_prompts} held-out users "
        f"x {args.eval_samples} samples"
    )
    ws = ", ".join(f"{k}={v}" for k, v in WARM_START.items())
    say(f"warm start (shared by all runs): {ws}")
    if sweep:
        tried = ", ".join(f"lr={k:g}: {v:.4f}" for k, v in sweep.items())
        say(
            f"learning-rate sweep on GRPO only (seed {TUNING_SEED}, {args.tune_prompts} tuning users): "
            f"{tried}"
        )
    say(
        f"shared hyperparameters (all methods): learning_rate={lr:g}, beta=0, temperature=1.0, "
        f"format_penalty={args.format_penalty:g}, loss_type=dapo, scale_rewards=group, epsilon=0.2, "
        "linear LR decay, AdamW (TRL defaults otherwise)"
    )
    for g in games:
        grpo_curve = {s: float(np.mean(v)) for s, v in by[(g, "grpo")].items()}
        grpo_final = grpo_curve[final_step]
        start_level = grpo_curve[min(grpo_curve)]
        thr_level = 0.9 * grpo_final
        thr_gain = start_level + 0.9 * (grpo_final - start_level)
        base_level = steps_to_reach(grpo_curve, thr_level)
        base_gain = steps_to_reach(grpo_curve, thr_gain)
        say()
        say(
            f"game={g}: GRPO final eval set utility {grpo_final:.4f} (step 0: {start_level:.4f}); "
            f"thresholds 90% of final = {thr_level:.4f}, 90% of gain = {thr_gain:.4f}"
        )
        say(
            f"  {'method':<10} {'steps->90% final':>17} {'ratio':>6} {'steps->90% gain':>16} {'ratio':>6}   "
            f"{'final eval set utility [95% CI]':<34} {'step wall ratio':>15} {'step cpu ratio':>14}"
        )
        for method in methods:
            curve = {s: float(np.mean(v)) for s, v in by[(g, method)].items()}
            reach_level = steps_to_reach(curve, thr_level)
            reach_gain = steps_to_reach(curve, thr_gain)

            m, lo, hi = mean_ci(by[(g, method)][final_step])
            wall = np.mean(timing[(g, method)]["wall"]) / np.mean(timing[(g, "grpo")]["wall"])
            cpu = np.mean(timing[(g, method)]["cpu"]) / np.mean(timing[(g, "grpo")]["cpu"])
            say(
                f"  {method:<10} {('never' if reach_level is None else reach_level):>17} "
                f"{ratio(reach_level, base_level):>6} {('never' if reach_gain is None else reach_gain):>16} "
                f"{ratio(reach_gain, base_gain):>6}   {f'{m:.4f} [{lo:.4f}, {hi:.4f}]':<34} "
                f"{wall:>15.2f} {cpu:>14.2f}"
            )
        grpo_step = np.mean(timing[(g, "grpo")]["wall"])
        say(f"  (GRPO step: {grpo_step:.3f} s wall, {np.mean(timing[(g, 'grpo')]['cpu']):.3f} s CPU)")
    say()
    say(f"total wall-clock: {(time.perf_counter() - t0) / 60:.1f} min; results in {csv_path}")
    plot(rows, games, methods, args.results / "convergence.png", lr)
    (args.results / "convergence_summary.txt").write_text("\n".join(lines) + "\n")


def plot(
    rows: list[dict[str, Any]],
    games: list[str],
    methods: tuple[str, ...],
    path: Path,
    lr: float,
    title: str = "recsys",
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"grpo": "tab:gray", "shapegrpo": "tab:blue", "loo": "tab:orange", "wta": "tab:green"}
    fig, axes = plt.subplots(1, len(games), figsize=(6 * len(games), 4.2), squeeze=False)
    for ax, g in zip(axes[0], games, strict=True):
        for method in methods:
            per_step: dict[int, list[float]] = defaultdict(list)
            for r in rows:
                if r["game"] == g and r["method"] == method:
                    per_step[r["step"]].append(r["eval_set_utility"])
            steps = sorted(per_step)
            stats = [mean_ci(per_step[s]) for s in steps]
            ax.plot(steps, [s[0] for s in stats], label=method, color=colors[method], marker="o", ms=3)
            ax.fill_between(
                steps, [s[1] for s in stats], [s[2] for s in stats], color=colors[method], alpha=0.2
            )
        n = len({r["seed"] for r in rows})
        ax.set_title(f"{title} / {g} ({n} seeds, lr={lr:g})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out eval set utility")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{' vs '.join(methods)}: mean and 95% interval across seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
