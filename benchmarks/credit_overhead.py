"""What ShapE-GRPO adds to a GRPO step, measured directly inside the trainer, in one run.

    python benchmarks/credit_overhead.py [--steps 40] [--games best_of_set,coverage]

Trains each credit method for ``--steps`` steps with the convergence benchmark's settings (same warm start,
G = 8, 4 prompts per step, 12-token completions, lr 2e-3, format penalty 0.1) and prints, per method, the
wall-clock seconds per optimizer step and the mean of the trainer's ``shapegrpo/credit_seconds`` metric: the
time of the one overridden hook after TRL's own generation and scoring (credit engine, group advantages,
token mapping, metrics). GRPO keeps TRL's advantages and skips the token mapping, so its hook time is the
floor of metrics alone. Unlike the convergence benchmark's step-time ratio, this share does not depend on how
long the completions of each method's policy happen to be.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
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
    print(f"{'game':12} {'method':10} {'s/step':>8} {'credit s/step':>14} {'share':>7}")
    for game in games:
        task = RecsysTask(game=game)
        for method in METHODS:
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
            print(f"{game:12} {method:10} {step:8.4f} {credit:14.4f} {credit / step:7.1%}")


if __name__ == "__main__":
    main()
