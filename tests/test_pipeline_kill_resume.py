"""A real ``dagster job execute`` of compare_methods is SIGKILLed while it trains its second method, then
resumed with the documented command (``python -m pipelines.resume RUN_ID``, the ``shapegrpo-resume`` script).
Its MLflow history is then compared, step by step, with an uninterrupted run of the same config: the same
steps, each exactly once, with the same values; the method that had finished before the kill keeps its run
and model version. About two minutes on 2 cores."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import yaml
from mlflow import MlflowClient
from pipeline_fixtures import subprocess_env

from pipelines.config import METHODS
from pipelines.tracking import TAG_METHOD, TAG_ROOT_RUN
from shapegrpo_core.checkpoints import find_last_complete_checkpoint

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS, SAVE_STEPS = 6, 2
# Wall-clock timings, and whole-run summaries (the mean loss of the steps one attempt ran), are no per-step
# history of the model: they differ between any two runs.
SUMMARY = {"train_loss", "total_flos"}


def _is_history(key: str) -> bool:
    return key not in SUMMARY and not any(t in key for t in ("time", "per_second", "seconds"))


def _config(tmp_path: Path) -> Path:
    config = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    train = config["ops"]["fine_tuned_policy"]["config"]
    train.update(max_steps=MAX_STEPS, save_steps=SAVE_STEPS, eval_every=SAVE_STEPS)
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _histories(client: MlflowClient, root: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    experiment = client.get_experiment_by_name("shapegrpo-smoke").experiment_id
    runs = client.search_runs(
        [experiment], filter_string=f"tags.`{TAG_ROOT_RUN}` = '{root}' and tags.stage = 'train'"
    )
    assert sorted(r.data.tags[TAG_METHOD] for r in runs) == sorted(METHODS)  # one training run per method
    out = {}
    for run in runs:
        keys = {k for k in run.data.metrics if _is_history(k)}
        out[run.data.tags[TAG_METHOD]] = {
            k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in keys
        }
    return out


def test_sigkill_mid_training_then_documented_resume_equals_uninterrupted_run(tmp_path) -> None:
    home, data = tmp_path / "dagster_home", tmp_path / "data"
    home.mkdir()
    tracking = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    env = subprocess_env(
        DAGSTER_HOME=str(home),
        SHAPEGRPO_DATA_DIR=str(data),
        MLFLOW_TRACKING_URI=tracking,
        SHAPEGRPO_MLFLOW_ARTIFACTS=str(tmp_path / "mlruns" / "artifacts"),
    )
    config = _config(tmp_path)
    cmd = [sys.executable, "-m", "dagster", "job", "execute", "-m", "pipelines", "-j", "compare_methods"]
    cmd += ["-c", str(config)]

    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 600
    killed_in = None
    while time.monotonic() < deadline and proc.poll() is None:
        for method_dir in (data / "runs").glob(f"*/fine_tuned_policy/{METHODS[1]}"):
            if find_last_complete_checkpoint(method_dir) is not None:  # the second method is mid-training
                os.killpg(proc.pid, signal.SIGKILL)
                killed_in = method_dir
                break
        if killed_in:
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_in is not None, (tmp_path / "killed.log").read_text()[-3000:]
    killed_root = killed_in.parents[1].name

    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_run_by_id(killed_root).status == dg.DagsterRunStatus.STARTED  # nobody reported

    resumed = subprocess.run(
        [sys.executable, "-m", "pipelines.resume", killed_root],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    uninterrupted = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert uninterrupted.returncode == 0, uninterrupted.stdout[-3000:]

    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = {r.run_id: r for r in instance.get_runs()}
        assert runs[killed_root].status == dg.DagsterRunStatus.FAILURE  # marked by the resume command
        (child,) = [r for r in runs.values() if r.root_run_id == killed_root]
        assert child.status == dg.DagsterRunStatus.SUCCESS
        (clean_root,) = [r.run_id for r in runs.values() if r.run_id != killed_root and r.root_run_id is None]

    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    killed, clean = _histories(client, killed_root), _histories(client, clean_root)
    for method in METHODS:
        assert killed[method].keys() == clean[method].keys(), method
        for key, points in clean[method].items():
            # The same steps with the same values (a key the Trainer logs in several records of one step, such
            # as epoch, has that step as often in both).
            assert killed[method][key] == points, (method, key)
        for key in ("loss", "reward", "shapegrpo/identical_group_rate"):  # once per step, no step twice
            assert [s for s, _ in killed[method][key]] == list(range(1, MAX_STEPS + 1)), (method, key)
    # Every policy registered once per root run: base + one version per method, none from the failed attempt.
    versions = client.search_model_versions("name = 'shapegrpo-policy-smoke'")
    per_root = {}
    for v in versions:
        per_root.setdefault(client.get_run(v.run_id).data.tags[TAG_ROOT_RUN], []).append(v.tags["method"])
    assert sorted(per_root[killed_root]) == sorted(["base", *METHODS])
    assert sorted(per_root[clean_root]) == sorted(["base", *METHODS])
