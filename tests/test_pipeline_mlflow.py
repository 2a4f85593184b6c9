"""MLflow plumbing: retries on SQLite contention, per-step training metrics from a real transformers Trainer,
and two pipeline runs at once against one SQLite store losing no run, metric or model version."""

import multiprocessing as mp

import pytest
import torch
from datasets import Dataset
from mlflow.exceptions import MlflowException
from pipeline_fixtures import TINY_TASK, concurrent_tracking_worker, mlflow_resource, workspace
from transformers import Trainer, TrainingArguments

from pipelines.tracking import MLflowMetricsCallback
from shapegrpo_core import policy
from shapegrpo_core.tasks import get_task


def test_call_retries_transient_store_errors_only(tmp_path) -> None:
    mlflow = mlflow_resource(tmp_path).model_copy(update={"max_attempts": 5})
    attempts = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert mlflow.call(flaky) == "ok" and len(attempts) == 3

    def broken() -> None:
        attempts.append(1)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: no such run")

    attempts.clear()
    with pytest.raises(MlflowException, match="no such run"):
        mlflow.call(broken)
    assert len(attempts) == 1  # a real error is not retried


def test_experiment_created_with_artifacts_under_artifact_root(tmp_path) -> None:
    mlflow = mlflow_resource(tmp_path)
    exp = mlflow.client().get_experiment(mlflow.experiment_id())
    assert exp.name == "shapegrpo-test"
    assert exp.artifact_location == (tmp_path / "mlruns" / "artifacts").as_uri()
    assert mlflow.experiment_id() == exp.experiment_id  # found, not created twice
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()


def test_trainer_callback_logs_every_step(tmp_path) -> None:
    mlflow = mlflow_resource(tmp_path)
    task = get_task(TINY_TASK["task"], num_candidates=3, **TINY_TASK["task_options"])
    tokenizer = policy.build_tokenizer(task)
    model = policy.build_tiny_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2)
    demos = task.demonstrations(8, seed=0)
    ids = [tokenizer(p + c)["input_ids"] for p, c in zip(demos["prompt"], demos["completion"], strict=True)]
    width = max(map(len, ids))
    rows = [
        {
            "input_ids": x + [tokenizer.pad_token_id] * (width - len(x)),
            "attention_mask": [1] * len(x) + [0] * (width - len(x)),
            "labels": x + [-100] * (width - len(x)),
        }
        for x in ids
    ]
    run = mlflow.client().create_run(mlflow.experiment_id(), run_name="callback")
    callback = MLflowMetricsCallback(mlflow, run.info.run_id)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=4,
        logging_steps=1,
        per_device_train_batch_size=4,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny model: one thread is fastest and does not fight other processes for cores
    Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), callbacks=[callback]).train()
    history = mlflow.client().get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert callback.num_logged >= 4


def test_two_pipeline_runs_at_once_lose_nothing(tmp_path) -> None:
    locations = workspace(tmp_path)  # a fresh SQLite store: both processes also race to create its schema
    num_runs, num_steps = 3, 20
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=concurrent_tracking_worker, args=(w, locations, num_runs, num_steps, barrier, out))
        for w in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    results = sorted(out.get(timeout=5) for _ in procs)
    assert [(w, ok) for w, ok, _ in results] == [(0, True), (1, True)]

    mlflow = mlflow_resource(tmp_path)
    client = mlflow.client()
    runs = client.search_runs([mlflow.experiment_id()], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    stage_runs = [r for r in runs if r.data.tags.get("stage") == "load"]
    assert len(parents) == 2  # one parent per Dagster run
    assert len(stage_runs) == 2 * num_runs
    for r in stage_runs:
        assert r.info.status == "FINISHED"
        for key in ("loss", "reward"):
            steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, key))
            assert steps == list(range(num_steps)), (r.info.run_name, key)
    versions = client.search_model_versions(f"name = '{mlflow.registered_model_name}'")
    assert sorted(int(v.version) for v in versions) == list(range(1, 2 * num_runs + 1))
    assert sorted(v.tags["method"] for v in versions) == sorted(
        f"w{w}-{i}" for w in range(2) for i in range(num_runs)
    )
    print(f"transient store errors retried per worker: {[n for _, _, n in results]}")
