"""Two real ``dagster job execute`` processes of compare_methods (configs/smoke.yaml) at once on one Dagster
instance, one data directory and one MLflow store: both succeed, and every value, path and MLflow run that a
run's assets refer to belongs to that run (per-root-run storage). About a minute on 2 cores."""

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg
from mlflow import MlflowClient
from pipeline_fixtures import subprocess_env

from pipelines.tracking import TAG_ROOT_RUN

REPO = Path(__file__).resolve().parents[1]


def _references(value, key: str = ""):
    """(key, string) pairs of every string inside a stored asset value."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _references(v, str(k))
    elif isinstance(value, list):
        for v in value:
            yield from _references(v, key)
    elif isinstance(value, str):
        yield key, value


def test_two_runs_at_once_never_read_each_others_values(tmp_path) -> None:
    home, data = tmp_path / "dagster_home", tmp_path / "data"
    home.mkdir()
    tracking = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    env = subprocess_env(
        DAGSTER_HOME=str(home),
        SHAPEGRPO_DATA_DIR=str(data),
        MLFLOW_TRACKING_URI=tracking,
        SHAPEGRPO_MLFLOW_ARTIFACTS=str(tmp_path / "mlruns" / "artifacts"),
    )
    # Dagster's own SQLite storage is created on first use, and two processes creating it at once race in its
    # schema migration (alembic: "more than one head"): the README says to create it first, as here.
    dg.DagsterInstance.from_config(str(home)).dispose()
    cmd = [sys.executable, "-m", "dagster", "job", "execute", "-m", "pipelines", "-j", "compare_methods"]
    cmd += ["-c", str(REPO / "configs" / "smoke.yaml")]
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    procs = [
        subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        for log in logs
    ]
    codes = [p.wait(timeout=900) for p in procs]
    assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]

    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert len(runs) == 2 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        run_ids = {r.run_id for r in runs}
        for run in runs:
            records = instance.get_records_for_run(
                run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
            ).records
            stored = {r.event_log_entry.asset_materialization.metadata["stored_at"].value for r in records}
            assert stored and all(f"/assets/{run.run_id}" in path for path in stored), stored

    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    for run_id in run_ids:
        other = (run_ids - {run_id}).pop()
        values = list((data / "assets" / run_id).rglob("*.json"))
        assert len(values) >= 10  # dataset, base policy, comparison, 4 methods x (policy, evaluation)
        for file in values:
            for key, text in _references(json.loads(file.read_text())):
                assert other not in text, (file, key, text)  # no path or id of the other run
                if text.startswith(str(data)):
                    assert f"/{run_id}/" in text, (file, key, text)
                if key.endswith("mlflow_run_id"):
                    assert client.get_run(text).data.tags[TAG_ROOT_RUN] == run_id, (file, key)
        trains = client.search_runs(
            [client.get_experiment_by_name("shapegrpo-smoke").experiment_id],  # the smoke profile's own
            filter_string=f"tags.`{TAG_ROOT_RUN}` = '{run_id}' and tags.stage = 'train'",
        )
        assert len(trains) == 4
        for train in trains:  # each method trained from its own run's base policy
            assert train.data.params["base_path"] == str(data / "runs" / run_id / "base_policy")
    # The smoke profile registers its models under its own name and never moves an alias.
    (model,) = client.search_registered_models()
    assert model.name == "shapegrpo-policy-smoke" and model.aliases == {}
    assert len(client.search_model_versions("name = 'shapegrpo-policy-smoke'")) == 2 * 5  # base + 4 methods
