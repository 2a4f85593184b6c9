"""MLflow bookkeeping for the pipeline: one parent run per Dagster run, a nested run per stage and method,
metrics per training step (a transformers ``TrainerCallback``), artifacts, and policies logged with the
transformers flavour and registered with aliases.

Run layout in the experiment (the MLflow UI's compare view lines methods up by the ``method`` param/tag):

    dagster-<job>-<root run id[:8]>            stage=pipeline, dagster.root_run_id=...
      ├─ data                                  stage=data
      ├─ base_policy-base                      stage=base_policy, method=base  (model version, alias "base")
      ├─ rollouts, scores, credit              stage=rollouts | scores | credit  (tables, histograms)
      ├─ train-grpo, train-shapegrpo, ...      stage=train, method=<m>         (step metrics, model version)
      ├─ eval-base, eval-grpo, ...             stage=eval, method=<m>          (metrics, response tables)
      └─ compare                               stage=compare                   (table, curves, champion)

The core (``shapegrpo_core``) never imports mlflow; everything MLflow lives here.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from transformers import TrainerCallback

from pipelines.resources import MLflowResource

TAG_ROOT_RUN = "dagster.root_run_id"
TAG_RUN = "dagster.run_id"
TAG_JOB = "dagster.job"
TAG_ASSET = "dagster.asset"
TAG_PARTITION = "dagster.partition"
TAG_STAGE = "stage"
TAG_METHOD = "method"
_METRIC_KEY_RE = re.compile(r"[^0-9A-Za-z_\-. /]")


def metric_key(name: str) -> str:
    """An MLflow-legal metric/param key (letters, digits, ``_ - . / space``)."""
    return _METRIC_KEY_RE.sub("_", str(name))


def root_run_id(context: dg.AssetExecutionContext) -> str:
    return context.run.root_run_id or context.run_id


def dagster_tags(context: dg.AssetExecutionContext, stage: str, method: str | None = None) -> dict[str, str]:
    tags = {
        TAG_RUN: context.run_id,
        TAG_ROOT_RUN: root_run_id(context),
        TAG_JOB: context.job_name,
        TAG_ASSET: context.asset_key.to_user_string(),
        TAG_STAGE: stage,
    }
    if method is not None:
        tags[TAG_METHOD] = method
        tags[TAG_PARTITION] = method
    return tags


def _escape(value: str) -> str:
    return value.replace("'", "\\'")


def find_runs(mlflow: MLflowResource, tags: Mapping[str, str], max_results: int = 1000) -> list[Any]:
    """Runs of the pipeline's experiment whose tags match ``tags`` exactly, newest first."""
    client = mlflow.client()
    query = " and ".join(f"tags.`{k}` = '{_escape(v)}'" for k, v in tags.items())
    return mlflow.call(
        client.search_runs,
        [mlflow.experiment_id()],
        filter_string=query,
        max_results=max_results,
        order_by=["attributes.start_time DESC"],
    )


def parent_run_id(mlflow: MLflowResource, context: dg.AssetExecutionContext) -> str:
    """The MLflow run grouping all that one Dagster run (and its re-executions) logged; made on first use."""
    root = root_run_id(context)
    with mlflow.lock("parent"):
        found = find_runs(mlflow, {TAG_ROOT_RUN: root, TAG_STAGE: "pipeline"}, max_results=1)
        if found:
            return found[0].info.run_id
        client = mlflow.client()
        run = mlflow.call(
            client.create_run,
            mlflow.experiment_id(),
            run_name=f"dagster-{context.job_name}-{root[:8]}",
            tags={
                TAG_ROOT_RUN: root,
                TAG_RUN: context.run_id,
                TAG_JOB: context.job_name,
                TAG_STAGE: "pipeline",
            },
        )
        return run.info.run_id


@contextlib.contextmanager
def stage_run(
    mlflow: MLflowResource,
    context: dg.AssetExecutionContext,
    stage: str,
    *,
    method: str | None = None,
    params: Mapping[str, Any] | None = None,
    resume: bool = False,
) -> Iterator[str]:
    """A nested MLflow run for one stage (and method) of this Dagster run; yields its run id.

    With ``resume``, an unfinished run of the same stage and method under the same root Dagster run is
    reopened (a re-execution after a crash keeps logging training steps into the run it started, without
    gaps). The run ends FINISHED, or FAILED when the body raises; the parent run's status follows.
    """
    client = mlflow.client()
    parent = parent_run_id(mlflow, context)
    tags = dagster_tags(context, stage, method)
    run_id = None
    if resume:
        match = {
            TAG_ROOT_RUN: tags[TAG_ROOT_RUN],
            TAG_STAGE: stage,
            **({TAG_METHOD: method} if method else {}),
        }
        previous = [r for r in find_runs(mlflow, match) if r.info.status != "FINISHED"]
        if previous:
            run_id = previous[0].info.run_id
            mlflow.call(client.update_run, run_id, status="RUNNING")
            mlflow.call(client.set_tag, run_id, TAG_RUN, context.run_id)
    if run_id is None:
        name = stage if method is None else f"{stage}-{method}"
        run = mlflow.call(
            client.create_run,
            mlflow.experiment_id(),
            run_name=name,
            tags={**tags, "mlflow.parentRunId": parent},
        )
        run_id = run.info.run_id
        all_params = {**({"method": method} if method else {}), **(params or {})}
        if all_params:
            log_params(mlflow, run_id, all_params)
    try:
        yield run_id
    except BaseException:
        mlflow.call(client.set_terminated, run_id, "FAILED")
        mlflow.call(client.set_terminated, parent, "FAILED")
        raise
    mlflow.call(client.set_terminated, run_id, "FINISHED")
    mlflow.call(client.set_terminated, parent, "FINISHED")


def log_params(mlflow: MLflowResource, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(metric_key(k), str(v)[:6000]) for k, v in params.items()]
    client = mlflow.client()
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        mlflow.call(client.log_batch, run_id, params=items[start : start + 100])


def log_metrics(mlflow: MLflowResource, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
    """Numeric entries of ``metrics`` at ``step`` (NaN kept: MLflow records it as NaN, which is the truth)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(metric_key(k), float(v), now, int(step))
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    client = mlflow.client()
    for start in range(0, len(items), 1000):
        mlflow.call(client.log_batch, run_id, metrics=items[start : start + 1000])


def log_table(mlflow: MLflowResource, run_id: str, df: pd.DataFrame, name: str, tmp_dir: Path) -> None:
    """``df`` as ``tables/<name>.parquet`` and ``tables/<name>.csv`` artifacts."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    pq, csv = tmp_dir / f"{name}.parquet", tmp_dir / f"{name}.csv"
    df.to_parquet(pq, index=False)
    df.to_csv(csv, index=False)
    client = mlflow.client()
    for path in (pq, csv):
        mlflow.call(client.log_artifact, run_id, str(path), "tables")


def log_file(mlflow: MLflowResource, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    mlflow.call(mlflow.client().log_artifact, run_id, str(path), artifact_path)


def _pip_requirements() -> list[str]:
    import tokenizers
    import torch
    import transformers

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"transformers=={transformers.__version__}",
        f"tokenizers=={tokenizers.__version__}",
    ]


def log_policy_model(
    mlflow: MLflowResource,
    run_id: str,
    checkpoint_dir: str | Path,
    *,
    method: str,
    tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Log the checkpoint with the transformers flavour (model + tokenizer dict: works offline with the custom
    word-level tokenizer, where the local-path mode does not) and register it as a new version of
    ``registered_model_name`` tagged with ``method``; returns ids for metadata. Aliases are not set here:
    only a successful comparison moves them (:func:`set_aliases`).
    """
    import mlflow as mlflow_api
    from huggingface_hub import ModelCard

    from shapegrpo_core.policy import load_policy

    mlflow.configure()
    model, tokenizer = load_policy(checkpoint_dir)
    # Our own card: without one MLflow tries to fetch a card (and license) for the checkpoint from the Hub.
    card = ModelCard(
        f"---\nlicense: apache-2.0\nlibrary_name: transformers\ntags: [shapegrpo, {method}]\n---\n"
        f"# ShapE-GRPO policy: {method}\n\nCheckpoint `{checkpoint_dir}`, MLflow run `{run_id}`.\n"
    )
    with mlflow_api.start_run(run_id=run_id):
        info = mlflow.call(
            mlflow_api.transformers.log_model,
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="policy",
            task="text-generation",
            model_card=card,
            pip_requirements=_pip_requirements(),
            metadata={"method": method},
        )
    version = register_model(mlflow, info.model_uri, run_id, method=method, tags=tags, model_id=info.model_id)
    return {
        "registered_model": mlflow.registered_model_name,
        "model_version": version,
        "model_uri": info.model_uri,
    }


def set_aliases(mlflow: MLflowResource, versions: Mapping[str, str | None]) -> dict[str, str]:
    """Point each alias at its model version (entries without a version are skipped); returns what moved.

    Nothing moves when ``mlflow.registry_aliases`` is off (smoke and test profiles), so the aliases a user
    deploys from only ever name models of a full, successful comparison.
    """
    if not mlflow.registry_aliases:
        return {}
    client = mlflow.client()
    moved = {alias: str(v) for alias, v in versions.items() if v is not None}
    for alias, version in moved.items():
        mlflow.call(client.set_registered_model_alias, mlflow.registered_model_name, alias, version)
    return moved


def register_model(
    mlflow: MLflowResource,
    source: str,
    run_id: str,
    *,
    method: str,
    tags: Mapping[str, str] | None = None,
    model_id: str | None = None,
) -> str:
    """A new version of the registered model (created on first use, race-safe); returns the version number."""
    from mlflow.exceptions import MlflowException

    client = mlflow.client()
    name = mlflow.registered_model_name
    try:
        mlflow.call(
            client.create_registered_model, name, description="ShapE-GRPO policies (base and fine-tuned)"
        )
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in f"{err.error_code} {err.message}" and "already exists" not in str(
            err
        ):
            raise
    version = mlflow.call(
        client.create_model_version,
        name,
        source,
        run_id=run_id,
        tags={"method": method, **(tags or {})},
        model_id=model_id,
    )
    return str(version.version)


# Number of ``state.log_history`` records a training run has sent to MLflow, logged in the same batch as them.
LOGGED_RECORDS_KEY = "pipeline/logged_records"


class MLflowMetricsCallback(TrainerCallback):
    """Sends the Trainer's log records (``state.log_history``: every ``on_log`` at its global step) to an
    MLflow run through the client, *when a checkpoint that holds them is on disk*, and at the end of training.

    Why at checkpoints: a run killed between checkpoints resumes from the last one and trains those steps
    again; records logged as they came would then appear twice, with different values. The Trainer keeps its
    log history inside each checkpoint, so the records a resumed run starts from are exactly the completed
    ones, and the callback sends those it has not sent yet: each batch carries the count of records sent so
    far (``LOGGED_RECORDS_KEY``), in the same store transaction, so no record is sent twice or lost, whenever
    the kill came. The price: MLflow shows a running training at checkpoint granularity (``save_steps``).
    Unlike transformers' own MLflowCallback it needs no fluent active run or environment variables, and it
    retries on SQLite contention.
    """

    def __init__(self, mlflow: MLflowResource, run_id: str) -> None:
        self.mlflow = mlflow
        self.run_id = run_id
        self.num_logged = 0
        self._sent = 0

    def flush(self, state: Any) -> None:
        from mlflow.entities import Metric

        client = self.mlflow.client()
        now = int(time.time() * 1000)
        batch: list[Metric] = []
        for index in range(self._sent, len(state.log_history)):
            record = state.log_history[index]
            step = int(record.get("step", state.global_step))
            batch += [
                Metric(metric_key(k), float(v), now, step)
                for k, v in record.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
            ]
            last = index == len(state.log_history) - 1
            if last or len(batch) >= 900:  # MLflow takes at most 1000 metrics per batch
                sent = Metric(LOGGED_RECORDS_KEY, float(index + 1), now, step)
                self.mlflow.call(client.log_batch, self.run_id, metrics=[*batch, sent])
                self.num_logged += len(batch)
                self._sent, batch = index + 1, []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if not state.is_world_process_zero:
            return
        # A resumed run: its state holds the records of the checkpoint it resumed from; an earlier attempt
        # may have sent some of them already (sent counts are only ever those of complete checkpoints).
        history = self.mlflow.call(self.mlflow.client().get_metric_history, self.run_id, LOGGED_RECORDS_KEY)
        self._sent = int(max((m.value for m in history), default=0))
        self.flush(state)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if state.is_world_process_zero:
            self.flush(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if state.is_world_process_zero:
            self.flush(state)


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(float(x))
