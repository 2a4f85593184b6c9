"""Wall time of the smoke comparison (configs/smoke.yaml: the whole compare_methods job, four methods) run
four ways, measured in one run, each a fresh ``dagster job execute`` in its own temporary workspace (Dagster
home, data directory, MLflow SQLite store):

    in-process executor         every step in the run's process (the default)
    multiprocess executor       each step in its own process, at most 2 at once (forkserver start method)
    Pipes, 1 process            in-process executor; each method trains in a subprocess
                                (`python -m pipelines.train_entry`, Dagster Pipes; launcher mode subprocess)
    Pipes, torchrun x 2         as above with 2 torch.distributed.run processes (gloo) per method

    python benchmarks/scaling.py [--out benchmarks/results/scaling.txt] [--repeats 1]

Prints (and writes) a table: total wall time of the command, the summed duration of the fine_tuned_policy
step (training of all four methods, from the run's event log), and both as ratios to the in-process run.
All four produce the same kind of result; only where the work runs differs. On a small CPU machine the
launched variants pay process start-up and imports (torch, TRL, Dagster) per launch, which the tiny smoke
policies cannot amortise; the table measures that price.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
FORKSERVER = {"forkserver": {"preload_modules": ["pipelines"]}}
VARIANTS: dict[str, dict[str, Any]] = {
    "in-process executor": {},
    "multiprocess executor (2)": {
        "execution": {"config": {"multiprocess": {"max_concurrent": 2, "start_method": FORKSERVER}}}
    },
    "Pipes, 1 process": {"resources": {"launcher": {"config": {"mode": "subprocess"}}}},
    "Pipes, torchrun x 2": {"resources": {"launcher": {"config": {"mode": "torchrun", "nproc_per_node": 2}}}},
}


def run_config(extra: dict[str, Any]) -> dict[str, Any]:
    config = yaml.safe_load(SMOKE.read_text())
    for key, value in extra.items():
        if key == "resources":
            config.setdefault("resources", {}).update(value)
        else:
            config[key] = value
    return config


def environment(work: Path) -> dict[str, str]:
    prefixes = ("MLFLOW_", "DAGSTER_", "SHAPEGRPO_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    (work / "dagster_home").mkdir(parents=True)
    return {
        **env,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "DAGSTER_HOME": str(work / "dagster_home"),
        "SHAPEGRPO_DATA_DIR": str(work / "data"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlruns' / 'mlflow.db'}",
        "SHAPEGRPO_MLFLOW_ARTIFACTS": str(work / "mlruns" / "artifacts"),
    }


def training_seconds(home: Path) -> float:
    """Summed wall time of the run's fine_tuned_policy step (STEP_START to STEP_SUCCESS)."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        (run,) = instance.get_runs()
        if run.status != dg.DagsterRunStatus.SUCCESS:
            raise RuntimeError(f"run {run.run_id} ended {run.status.value}")
        stats = instance.get_run_step_stats(run.run_id)
    spans = [s.end_time - s.start_time for s in stats if s.step_key == "fine_tuned_policy"]
    if len(spans) != 1:
        raise RuntimeError(f"expected one fine_tuned_policy step, found {len(spans)}")
    return float(spans[0])


def measure(name: str, extra: dict[str, Any], root: Path) -> tuple[float, float]:
    work = root / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    env = environment(work)
    config_file = work / "run.yaml"
    config_file.write_text(yaml.safe_dump(run_config(extra)))
    cmd = [sys.executable, "-m", "dagster", "job", "execute", "-m", "pipelines", "-j", "compare_methods"]
    start = time.perf_counter()
    done = subprocess.run([*cmd, "-c", str(config_file)], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return wall, training_seconds(work / "dagster_home")


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scaling.txt")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant (the best is reported)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="shapegrpo-scaling-") as tmp:
        for repeat in range(args.repeats):
            for name, extra in VARIANTS.items():
                wall, train = measure(name, extra, Path(tmp) / f"r{repeat}")
                best = results.get(name)
                results[name] = (wall, train) if best is None or wall < best[0] else best
                print(f"  {name}: {wall:.1f} s (training step {train:.1f} s)", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    base_wall, base_train = results["in-process executor"]
    lines = [
        f"smoke comparison (configs/smoke.yaml, 4 methods x 3 steps), `dagster job execute`, "
        f"{os.cpu_count()} CPUs, {platform.python_version()}, nice'd; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after; best of {args.repeats}",
        "",
        f"{'variant':28} {'wall s':>8} {'ratio':>6} {'training step s':>16} {'ratio':>6}",
    ]
    for name, (wall, train) in results.items():
        lines.append(f"{name:28} {wall:8.1f} {wall / base_wall:6.2f} {train:16.1f} {train / base_train:6.2f}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
