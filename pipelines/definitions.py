"""The Dagster ``Definitions`` of the pipeline: assets, checks, jobs, schedule, sensor and resources.

Locations come from environment variables when set (so a deployment or a test can move them) and otherwise
default to the repository layout: ``data/`` for files, ``mlruns/`` for the MLflow store.

    MLFLOW_TRACKING_URI        default sqlite:///mlruns/mlflow.db
    SHAPEGRPO_MLFLOW_ARTIFACTS default mlruns/artifacts
    SHAPEGRPO_MLFLOW_EXPERIMENT default shapegrpo
    SHAPEGRPO_DATA_DIR         default data
    SHAPEGRPO_INCOMING_DIR     default data/incoming  (read by the sensor at each evaluation)
    SHAPEGRPO_DEVICE           default cpu   (cpu | cuda | auto)
    SHAPEGRPO_NUM_THREADS      default 1     (torch threads; 0 = torch's default, one per core)
    SHAPEGRPO_GENERATION       default hf    (hf | vllm)

Training runs in the step's process unless the ``launcher`` resource says otherwise (``resources: launcher:
config: {mode: torchrun, nproc_per_node: 2}``: Dagster Pipes, ``pipelines/train_entry.py``). Steps run one
after another in the run's process unless the run config picks the multiprocess executor
(``execution: {config: {multiprocess: {max_concurrent: 2}}}``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg

from pipelines.assets import all_assets
from pipelines.checks import DataQualityResource, all_checks
from pipelines.jobs import all_jobs, all_schedules
from pipelines.resources import (
    DEFAULT_EXPERIMENT,
    ComputeResource,
    GenerationResource,
    ManifestIOManager,
    MLflowResource,
    StorageResource,
    TrainingLauncherResource,
    offline_environment,
)
from pipelines.sensors import all_sensors

# One process per run by default: the steps share imports (torch, transformers, TRL) and run one after another
# on the CPU anyway. A run config may pick Dagster's multiprocess executor instead (each step its own process,
# up to max_concurrent at once: `execution: {config: {multiprocess: {max_concurrent: 2}}}`); values pass
# between steps only through the IO manager's files, so both give the same results.
EXECUTOR = dg.multi_or_in_process_executor.configured(
    lambda config: config,
    config_schema=dg.Field(
        dg.multi_or_in_process_executor.config_schema.config_type, default_value={"in_process": {}}
    ),
    name="in_process_or_multiprocess",
)


def build_resources(
    *,
    data_dir: str | None = None,
    tracking_uri: str | None = None,
    artifact_root: str | None = None,
    experiment_name: str | None = None,
    device: str | None = None,
    num_threads: int | None = None,
    generation_backend: str | None = None,
) -> dict[str, Any]:
    """Resources pointing at the given locations (else environment variables, else the repo defaults)."""
    env = os.environ.get
    data = data_dir or env("SHAPEGRPO_DATA_DIR", "data")
    return {
        "mlflow": MLflowResource(
            tracking_uri=tracking_uri,  # None: the resource reads the environment when it is used
            artifact_root=artifact_root,
            experiment_name=experiment_name or env("SHAPEGRPO_MLFLOW_EXPERIMENT", DEFAULT_EXPERIMENT),
        ),
        "generation": GenerationResource(backend=generation_backend or env("SHAPEGRPO_GENERATION", "hf")),
        "compute": ComputeResource(
            device=device or env("SHAPEGRPO_DEVICE", "cpu"),
            num_threads=num_threads if num_threads is not None else int(env("SHAPEGRPO_NUM_THREADS", "1")),
        ),
        "storage": StorageResource(root_dir=data),
        # Thresholds of the blocking data checks; a run config's resources.data_quality overrides them.
        "data_quality": DataQualityResource(),
        "io_manager": ManifestIOManager(base_dir=str(Path(data) / "assets")),
        # How fine_tuned_policy trains: in its own process (default) or through Dagster Pipes in 1..N
        # launched processes (a run config's resources.launcher overrides it).
        "launcher": TrainingLauncherResource(),
    }


def build_definitions(**locations: Any) -> dg.Definitions:
    """The pipeline's Definitions; ``locations`` are :func:`build_resources` keyword arguments."""
    resources = build_resources(**locations)
    return dg.Definitions(
        assets=all_assets,
        asset_checks=all_checks,
        jobs=all_jobs,
        schedules=all_schedules,
        sensors=all_sensors,
        resources=resources,
        executor=EXECUTOR,
    )


offline_environment()
defs = build_definitions()
