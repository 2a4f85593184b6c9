"""Every setting of a run checked before the run exists.

Dagster checks a run config's *shape* (names and types) when a run is created, but a ``dg.Config``'s own
constraints (``ge``, ``Literal``) only run when a step builds its config object, and combinations across
assets (a task name, its K and its options; a MovieLens path) are nobody's. A bad learning rate then surfaced
after the dataset, the warm start and the rollouts had run and logged to MLflow.

:func:`require_valid_settings` checks the whole run config at once, one line per bad setting, each named by
its path in the run config. It runs

* in the incoming-data sensor, before it requests a run (a bad sizing file fails the tick: no run exists);
* when a step of a run opens its MLflow resource, i.e. before the first step of any run does anything (every
  asset logs to MLflow, so none can act first): the run fails at once with that message, and nothing reaches
  MLflow or the data directory.

Dagster itself cannot reject these settings before it records the run: ``dg.Config`` constraints are only
enforced when a step builds its config, and a job over partitioned assets (ours: one partition per method)
may not carry the ``ConfigMapping`` that would run at launch. Names with a fixed set of values (``Literal``
fields) are part of the run-config schema, so Dagster rejects those at launch, before a run exists.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import dagster as dg
import pydantic

from pipelines.config import (
    BasePolicyConfig,
    ComparisonConfig,
    CreditConfig,
    EvalConfig,
    RolloutConfig,
    TaskDatasetConfig,
    TrainConfig,
)

# The dg.Config of each asset that takes one (a test keeps this equal to the assets' signatures).
ASSET_CONFIGS: dict[str, type[dg.Config]] = {
    "task_dataset": TaskDatasetConfig,
    "base_policy": BasePolicyConfig,
    "candidate_sets": RolloutConfig,
    "shapley_credits": CreditConfig,
    "fine_tuned_policy": TrainConfig,
    "policy_evaluation": EvalConfig,
    "method_comparison": ComparisonConfig,
}


class InvalidSettingsError(dg.DagsterError, ValueError):
    """A run config that would fail (or silently misbehave) once running; raised before the run exists.

    A ``DagsterError`` so that Dagster reports it as it is instead of wrapping it in a user-code error.
    """


def _setting(asset: str, loc: tuple[Any, ...] = ()) -> str:
    return ".".join(["ops", asset, "config", *map(str, loc)])


def _field_problems(asset: str, values: Mapping[str, Any]) -> tuple[list[str], dg.Config | None]:
    try:
        return [], ASSET_CONFIGS[asset](**values)
    except pydantic.ValidationError as err:
        return [
            f"{_setting(asset, e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in err.errors()
        ], None


@functools.cache
def _task_problem(task: str, kwargs_json: str) -> str | None:
    """Whether the task can be built with these options (cached: Dagster resolves a config several times)."""
    from shapegrpo_core.tasks import TASKS, get_task

    if task not in TASKS:
        return f"{_setting('task_dataset', ('task',))}: unknown task {task!r}; known tasks: {sorted(TASKS)}"
    try:
        get_task(task, **json.loads(kwargs_json))
    except (TypeError, ValueError, OSError, KeyError) as err:  # the task's own message names the option
        return f"{_setting('task_dataset')}: task {task!r} rejects its options: {err}"
    return None


@functools.cache
def _training_option_names() -> frozenset[str]:
    import dataclasses
    import inspect

    from shapegrpo_core.trainer import ShapEGRPOConfig
    from shapegrpo_core.training import train_policy

    params = set(inspect.signature(train_policy).parameters) - {"config", "task", "output_dir"}
    return frozenset(params | {f.name for f in dataclasses.fields(ShapEGRPOConfig)})


def settings_problems(ops: Mapping[str, Any]) -> list[str]:
    """Every problem of the ``ops`` section of a run config (empty: the settings are consistent)."""
    problems: list[str] = []
    configs: dict[str, Any] = {}
    for asset in ASSET_CONFIGS:
        if asset in ops:
            found, config = _field_problems(asset, (ops[asset] or {}).get("config") or {})
            problems += found
            configs[asset] = config

    data = configs.get("task_dataset")
    if isinstance(data, TaskDatasetConfig):
        kwargs = {"num_candidates": data.num_candidates, **data.task_options}
        problem = _task_problem(data.task, json.dumps(kwargs, sort_keys=True, default=str))
        if problem:
            problems.append(problem)

    train = configs.get("fine_tuned_policy")
    if isinstance(train, TrainConfig):
        unknown = sorted(set(train.training_options) - _training_option_names())
        if unknown:
            problems.append(
                f"{_setting('fine_tuned_policy', ('training_options',))}: unknown options {unknown} (not "
                "train_policy arguments or ShapEGRPOConfig fields)"
            )
    base = configs.get("base_policy")
    if isinstance(base, BasePolicyConfig) and base.model_path is None and base.hidden_size % base.num_heads:
        problems.append(
            f"{_setting('base_policy', ('hidden_size',))}: {base.hidden_size} is not a multiple of num_heads "
            f"({base.num_heads})"
        )
    return problems


def launcher_problems(resources: Mapping[str, Any]) -> list[str]:
    """Problems of ``resources.launcher`` (a launch that would run another number of processes than asked
    for), judged with the run's device (``resources.compute.config.device``, else $SHAPEGRPO_DEVICE)."""
    import os

    from pipelines.resources import LaunchConfigError, TrainingLauncherResource

    launcher_config = ((resources.get("launcher") or {}).get("config")) or {}
    if not launcher_config:
        return []
    device = ((resources.get("compute") or {}).get("config") or {}).get("device")
    device = device or os.environ.get("SHAPEGRPO_DEVICE", "cpu")
    try:
        TrainingLauncherResource(**launcher_config).validate(use_cpu=True if device == "cpu" else None)
    except pydantic.ValidationError as err:
        return [f"resources.launcher.config.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
    except LaunchConfigError as err:
        return [f"resources.launcher.config: {err}"]
    return []


def require_valid_settings(run_config: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidSettingsError` listing every bad setting of ``run_config`` (else nothing)."""
    problems = settings_problems(run_config.get("ops") or {})
    problems += launcher_problems(run_config.get("resources") or {})
    if problems:
        raise InvalidSettingsError("invalid run settings:\n  " + "\n  ".join(problems))
