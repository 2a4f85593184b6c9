"""``shapegrpo-train SETTINGS.json``: one method's fine-tuning as its own process (or N of them under
``torch.distributed.run`` / ``accelerate launch``), the way ``fine_tuned_policy`` launches it through Dagster
Pipes when the ``launcher`` resource's mode is not ``in_process``.

The settings file (written by :func:`pipelines.assets.policies.launch_settings`) holds everything the run
needs: the ``task_dataset`` manifest (task and parquet splits), the base policy's path, the output directory,
the method, the keyword arguments of :func:`shapegrpo_core.training.train_policy` (every ``TrainConfig``
field and the ``training_options``), the number of processes asked for, and the MLflow run to log into
(opened by the asset with ``stage_run``). Each process

1. checks that ``WORLD_SIZE`` is the number of processes the settings ask for, and fails otherwise: a launcher
   that silently started fewer processes would train on a different global batch;
2. trains with ``train_policy(..., resume=True)``, on its share of the global batch (``prompts_per_step`` is
   global: each of N processes takes ``prompts_per_step * num_generations / N`` rows), so a relaunch continues
   from the last complete checkpoint in the output directory;
3. on rank 0 only: sends the Trainer's log records to MLflow (``MLflowMetricsCallback``: once per checkpoint,
   never twice after a resume) and, when started by Dagster Pipes, reports each logged step (a Pipes log line
   and a custom message with the step's metrics) and, at the end, the result (final checkpoint path, global
   step, timings) as a custom message; the other ranks report nothing.

Run by hand (no Dagster): ``python -m pipelines.train_entry settings.json``; the result is also written to
``<output_dir>/train_result.json`` by ``train_policy``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

# Settings keys every file must have (what the asset writes; see launch_settings).
REQUIRED_KEYS = ("method", "task_dataset", "base_policy_path", "output_dir", "train_kwargs", "num_processes")
RESULT_EVENT = "result"
STEP_EVENT = "step"


class LaunchError(RuntimeError):
    """The process was started differently from what its settings ask (e.g. the wrong number of ranks)."""


def read_settings(path: str | Path) -> dict[str, Any]:
    """The settings file as a dict, with every required key present (a clear error naming the file if not)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training settings file {path} does not exist")
    settings = json.loads(path.read_text())
    missing = [k for k in REQUIRED_KEYS if k not in settings]
    if missing:
        raise ValueError(f"training settings file {path} lacks {missing}")
    return settings


def world() -> tuple[int, int]:
    """(rank, world size) of this process as the launcher set them (a plain process: (0, 1))."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def check_world_size(expected: int) -> None:
    """Fail loudly unless the launcher started exactly ``expected`` processes."""
    _, size = world()
    if size != expected:
        raise LaunchError(
            f"WORLD_SIZE is {size} but the settings ask for num_processes={expected}: the launcher started "
            f"{'no distributed group' if 'WORLD_SIZE' not in os.environ else f'{size} process(es)'}; "
            "training on another number of processes would change the global batch. Launch with "
            f"`python -m torch.distributed.run --standalone --nproc_per_node {expected} "
            "-m pipelines.train_entry SETTINGS` (the launcher resource's torchrun mode)"
        )


def per_process_kwargs(train_kwargs: Mapping[str, Any], num_processes: int) -> dict[str, Any]:
    """``train_policy`` keyword arguments for one of ``num_processes`` ranks: the global batch of
    ``prompts_per_step * num_generations`` rows split evenly (unless ``per_device_train_batch_size`` is set
    explicitly, which is per process by TRL's definition)."""
    kwargs = dict(train_kwargs)
    if num_processes == 1 or "per_device_train_batch_size" in kwargs:
        return kwargs
    rows = int(kwargs["prompts_per_step"]) * int(kwargs["num_generations"])
    if rows % num_processes:
        raise ValueError(
            f"fine_tuned_policy.config: prompts_per_step ({kwargs['prompts_per_step']}) x num_generations "
            f"({kwargs['num_generations']}) = {rows} rows per step do not split evenly over {num_processes} "
            "processes (launcher.nproc_per_node)"
        )
    kwargs["per_device_train_batch_size"] = rows // num_processes
    return kwargs


def _numbers(record: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


class PipesProgressCallback(TrainerCallback):
    """Rank 0's progress to Dagster through Pipes: a log line per logged step (loss, reward, the main credit
    metrics) and a ``{"event": "step", "step": s, "metrics": {...}}`` custom message with every number."""

    SUMMARY = ("loss", "reward", "shapegrpo/set_utility", "shapegrpo/free_rider_rate", "heldout/set_utility")

    def __init__(self, pipes: Any, method: str) -> None:
        self.pipes = pipes
        self.method = method

    def on_log(
        self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kwargs: Any
    ):
        if not state.is_world_process_zero or not logs:
            return
        numbers = _numbers(logs)
        shown = ", ".join(f"{k}={numbers[k]:.4g}" for k in self.SUMMARY if k in numbers)
        self.pipes.log.info(f"{self.method}: step {state.global_step}/{state.max_steps} {shown}")
        self.pipes.report_custom_message({"event": STEP_EVENT, "step": state.global_step, "metrics": numbers})


def _mlflow_callback(settings: Mapping[str, Any]) -> TrainerCallback | None:
    target = settings.get("mlflow")
    if not target:
        return None
    from pipelines.resources import MLflowResource
    from pipelines.tracking import MLflowMetricsCallback

    resource = MLflowResource(
        tracking_uri=target["tracking_uri"],
        artifact_root=target.get("artifact_root"),
        experiment_name=target["experiment_name"],
    )
    return MLflowMetricsCallback(resource, target["run_id"])


def run(settings: Mapping[str, Any], pipes: Any | None = None) -> dict[str, Any]:
    """Train as the settings say (this process's share); returns the result record (rank 0 reports it)."""
    import torch

    from pipelines.taskio import load_split, load_task
    from shapegrpo_core.training import train_policy

    check_world_size(int(settings["num_processes"]))
    rank, size = world()
    threads = int(settings.get("num_threads", 1))
    if threads > 0:
        torch.set_num_threads(threads)
    manifest = settings["task_dataset"]
    callbacks: list[TrainerCallback] = []
    mlflow_callback = None
    if rank == 0:
        mlflow_callback = _mlflow_callback(settings)
        callbacks += [mlflow_callback] if mlflow_callback is not None else []
        callbacks += [PipesProgressCallback(pipes, settings["method"])] if pipes is not None else []
    kwargs = per_process_kwargs(settings["train_kwargs"], size)
    result = train_policy(
        load_task(manifest),
        settings["base_policy_path"],
        settings["output_dir"],
        method=settings["method"],
        train_dataset=load_split(manifest, "train"),
        eval_dataset=load_split(manifest, "eval"),
        callbacks=callbacks,
        resume=True,
        **kwargs,
    )
    return {
        "event": RESULT_EVENT,
        "final_checkpoint": result.final_checkpoint,
        "global_step": result.global_step,
        "resumed_from": result.resumed_from,
        "train_seconds": result.train_seconds,
        "seconds_per_step": result.seconds_per_step,
        "world_size": size,
        "metrics_logged": getattr(mlflow_callback, "num_logged", 0),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shapegrpo-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", help="the JSON settings file the fine_tuned_policy asset wrote")
    args = parser.parse_args(argv)
    settings = read_settings(args.settings)
    rank, _ = world()
    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

    if rank != 0 or DAGSTER_PIPES_CONTEXT_ENV_VAR not in os.environ:
        # Other ranks (and runs by hand) train without Pipes: only rank 0 talks to Dagster.
        result = run(settings)
        if rank == 0:
            print(json.dumps(result), flush=True)
        return 0
    with open_dagster_pipes() as pipes:
        pipes.log.info(
            f"{settings['method']}: training on {settings['num_processes']} process(es) into "
            f"{settings['output_dir']}"
        )
        result = run(settings, pipes)
        pipes.report_custom_message(result)
        pipes.log.info(f"{settings['method']}: final checkpoint {result['final_checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
