"""What ShapE-GRPO adds to a GRPO step, measured directly inside the trainer, in one run.

    python benchmarks/credit_overhead.py [--steps 40] [--games best_of_set,coverage]

Trains each credit method for ``--steps`` steps with the convergence benchmark's settings (same warm start,
G = 8, 4 prompts per step, 12-token completions, lr 2e-3, format penalty 0.1) and prints, per method, the
wall-clock seconds per optimizer step and the mean of the trainer's ``shapegrpo/credit_seconds`` metric: the
time of the one overridden hook after TRL's own generation and scoring (credit engine, group advantages,
token mapping, metrics). GRPO goes through the same credit path (uniform credit: no Shapley engine, no token
map), so ``extra`` = (method's hook time − GRPO's hook time) / GRPO's step time is what per-candidate credit
adds to a GRPO step (target: at most 2%). Unlike the convergence benchmark's step-time ratio, this share does
not depend on how long the completions of each method's policy happen to be.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from convergence import WARM_START  # noqa: E402  (this folder is on sys.path: the same warm start)

from shapegrpo_core.policy import warm_start  # noqa: E402
from shapegrpo_core.tasks.recsys import RecsysTask  # noqa: E402
from shapegrpo_core.training import METHODS, train_policy  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--games", type=str, default="best_of_set,coverage")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "shapegrpo-overhead")
    args = p.parse_args()
    torch.set_num_threads(1)
    games = args.games.split(",")
    policy = args.work_dir / "warm_start"
    if not (policy / "config.json").exists():
        warm_start(RecsysTask(game=games[0]), policy, **WARM_START)
    print(f"{'game':12} {'method':10} {'s/step':>8} {'hook s/step':>12} {'share':>7} {'extra':>7}")
    for game in games:
        task = RecsysTask(game=game)
        grpo: tuple[float, float] | None = None
        for method in METHODS:  # grpo first: the baseline of `extra`
            shutil.rmtree(args.work_dir / f"{game}-{method}", ignore_errors=True)  # a fresh run every time
            result = train_policy(
                task,
                policy,
                args.work_dir / f"{game}-{method}",
                method=method,
                max_steps=args.steps,
                seed=0,
                num_generations=8,
                prompts_per_step=4,
                max_completion_length=12,
                learning_rate=2e-3,
                format_penalty=0.1,
                save_steps=args.steps,
                resume=False,
                log_level="error",
            )
            credit = float(
                np.mean(
                    [h["shapegrpo/credit_seconds"] for h in result.history if "shapegrpo/credit_seconds" in h]
                )
            )
            step = result.seconds_per_step
            grpo = (step, credit) if grpo is None else grpo
            extra = (credit - grpo[1]) / grpo[0]
            print(f"{game:12} {method:10} {step:8.4f} {credit:12.5f} {credit / step:7.1%} {extra:7.2%}")


if __name__ == "__main__":
    main()
