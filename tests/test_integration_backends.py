"""Production backends for real: a Dagster instance on PostgreSQL (deploy/dagster.yaml: queued run
coordinator, a concurrency limit on training runs) with its daemon, and an MLflow tracking server on
PostgreSQL. Two compare_methods smoke runs are submitted through the queue at once; both succeed, and the
MLflow server holds every run, metric step and model version of both. About two minutes on 2 cores."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml
from backends import mlflow_server, postgres_bin, postgres_cluster
from mlflow import MlflowClient
from pipeline_fixtures import subprocess_env

from pipelines.config import METHODS
from pipelines.tracking import TAG_METHOD, TAG_ROOT_RUN

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL server binaries not installed"),
]


def test_two_queued_runs_on_postgres_dagster_and_an_mlflow_server(tmp_path, monkeypatch) -> None:
    with postgres_cluster() as (pg, bindir):
        pg.create_database("dagster", bindir)
        pg.create_database("mlflow", bindir)
        with mlflow_server(pg.url("mlflow"), tmp_path / "artifacts") as tracking_uri:
            home = tmp_path / "dagster_home"
            home.mkdir()
            shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
            env = subprocess_env(
                DAGSTER_HOME=str(home),
                DAGSTER_PG_URL=pg.url("dagster"),
                MLFLOW_TRACKING_URI=tracking_uri,
                SHAPEGRPO_DATA_DIR=str(tmp_path / "data"),
            )
            monkeypatch.setenv("DAGSTER_PG_URL", env["DAGSTER_PG_URL"])  # for this process's instance
            daemon = subprocess.Popen(
                [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-m", "pipelines"],
                cwd=REPO,
                env=env,
                stdout=(tmp_path / "daemon.log").open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                launch = [sys.executable, "-m", "dagster", "job", "launch", "-m", "pipelines"]
                launch += ["-j", "compare_methods", "-c", str(REPO / "configs" / "smoke.yaml")]
                for _ in range(2):  # submitted back to back: both wait in the queue
                    out = subprocess.run(
                        launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
                    )
                    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
                with dg.DagsterInstance.from_config(str(home)) as instance:
                    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
                    deadline = time.monotonic() + 900
                    while True:
                        runs = instance.get_runs()
                        done = [r for r in runs if r.is_finished]
                        stop = daemon.poll() is not None or time.monotonic() > deadline
                        if (len(runs) == 2 and len(done) == 2) or stop:
                            break
                        time.sleep(2)
                    statuses = sorted(r.status.value for r in instance.get_runs())
                    assert statuses == ["SUCCESS", "SUCCESS"], (tmp_path / "daemon.log").read_text()[-4000:]
                    root_ids = [r.run_id for r in runs]
                    assert all(r.tags.get("shapegrpo/trains") == "true" for r in runs)  # the limited tag
            finally:
                daemon.terminate()
                daemon.wait(timeout=60)

            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            experiment = client.get_experiment_by_name("shapegrpo-smoke").experiment_id
            max_steps = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())["ops"][
                "fine_tuned_policy"
            ]["config"]["max_steps"]
            for root in root_ids:
                runs = client.search_runs([experiment], filter_string=f"tags.`{TAG_ROOT_RUN}` = '{root}'")
                stages = sorted(r.data.tags["stage"] for r in runs)
                assert stages.count("train") == len(METHODS) and stages.count("eval") == len(METHODS) + 1
                assert all(r.info.status == "FINISHED" for r in runs)
                for run in (r for r in runs if r.data.tags["stage"] == "train"):
                    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
                    assert steps == list(range(1, max_steps + 1)), run.data.tags[TAG_METHOD]
            versions = client.search_model_versions("name = 'shapegrpo-policy-smoke'")
            assert len(versions) == 2 * (1 + len(METHODS))  # base + one per method, per run
