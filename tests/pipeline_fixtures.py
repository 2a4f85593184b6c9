"""Helpers for the pipeline tests: an isolated workspace (data dir + MLflow SQLite store under tmp_path), a
temporary Dagster instance, and a tiny random-init policy checkpoint (built offline by the core)."""

import os
from pathlib import Path
from typing import Any, ClassVar

import dagster as dg
import yaml

from pipelines import build_definitions, build_resources
from pipelines.resources import MLflowResource, StorageResource
from shapegrpo_core.games import CallableGame
from shapegrpo_core.tasks.recsys import RecsysTask

# Every asset of the pipeline, in chain order.
ASSETS = {
    "task_dataset",
    "base_policy",
    "candidate_sets",
    "rollout_scores",
    "shapley_credits",
    "fine_tuned_policy",
    "policy_evaluation",
    "method_comparison",
}

# A tiny recsys world: fast to build, small vocabulary.
TINY_TASK = {
    "task": "recsys",
    "num_candidates": 3,
    "task_options": {"num_items": 16, "num_genres": 4, "num_train_users": 12, "num_eval_users": 6},
}


def workspace(tmp_path: Path) -> dict[str, str]:
    """Locations of an isolated pipeline workspace (what build_resources/build_definitions take)."""
    return {
        "data_dir": str(tmp_path / "data"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
        "artifact_root": str(tmp_path / "mlruns" / "artifacts"),
        "experiment_name": "shapegrpo-test",
        "num_threads": 1,
    }


SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def smoke_run_config(tmp_path: Path, path: Path = SMOKE, **mlflow_config: Any) -> dict[str, Any]:
    """A configs/*.yaml run config pointed at the workspace's MLflow store.

    The smoke files override some MLflow resource fields (their own experiment and model name, no aliases);
    Dagster resets the fields such an override leaves out to their defaults, so the workspace's locations go
    into the override too. ``mlflow_config`` overrides more fields (e.g. ``registry_aliases=True``)."""
    config = yaml.safe_load(path.read_text())
    loc = workspace(tmp_path)
    resource = config.setdefault("resources", {}).setdefault("mlflow", {}).setdefault("config", {})
    resource.update(tracking_uri=loc["tracking_uri"], artifact_root=loc["artifact_root"], **mlflow_config)
    return config


def subprocess_env(**settings: str) -> dict[str, str]:
    """This process's environment for a pipeline subprocess, without any MLflow, Dagster or project setting
    (earlier tests' ``mlflow.set_tracking_uri``/``set_registry_uri`` leave MLFLOW_* variables behind), plus
    ``settings``."""
    prefixes = ("MLFLOW_", "DAGSTER_", "SHAPEGRPO_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    return {**env, "OMP_NUM_THREADS": "1", **settings}


def resources(tmp_path: Path) -> dict[str, Any]:
    return build_resources(**workspace(tmp_path))


def definitions(tmp_path: Path):
    return build_definitions(**workspace(tmp_path))


def mlflow_resource(tmp_path: Path) -> MLflowResource:
    return resources(tmp_path)["mlflow"]


def tiny_random_policy(path: Path, task_config: dict[str, Any] = TINY_TASK) -> Path:
    """A randomly initialised word-level policy for the task (no warm start): enough to exercise rollouts."""
    from shapegrpo_core import policy
    from shapegrpo_core.tasks import get_task

    task = get_task(
        task_config["task"], num_candidates=task_config["num_candidates"], **task_config["task_options"]
    )
    tokenizer = policy.build_tokenizer(task)
    model = policy.build_tiny_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def warm_policy(path: Path, task_config: dict[str, Any] = TINY_TASK) -> Path:
    """A real SFT warm start of the tiny policy on the task's format demonstrations (about 2 s): most of its
    rollouts are format-valid (62% of 4 x 4 at max_new_tokens=8 when measured), unlike a random init."""
    from shapegrpo_core import policy
    from shapegrpo_core.tasks import get_task

    task = get_task(
        task_config["task"], num_candidates=task_config["num_candidates"], **task_config["task_options"]
    )
    return policy.warm_start(
        task,
        path,
        num_demos=256,
        max_steps=120,
        batch_size=16,
        learning_rate=1e-2,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        seed=0,
    )


class CountingRecsysTask(RecsysTask):
    """The recsys task, recording every game it builds (what scoring a response costs: for ``code`` that is
    running its candidates in the sandbox). Register it with ``TASKS["counting_recsys"] = COUNTING_TASK``."""

    name = "counting_recsys"
    built: ClassVar[list[tuple[int, tuple[str, ...]]]] = []  # (user_id, candidate texts) per game built

    def game(self, candidates, example):  # type: ignore[no-untyped-def]
        CountingRecsysTask.built.append((int(example["user_id"]), tuple(c.text for c in candidates)))
        return super().game(candidates, example)


class NaNScorerRecsysTask(RecsysTask):
    """The recsys task with a scorer that returns NaN for every response with a candidate (as a relevance
    table with missing values would): each such response is a failed scorer, a recorded NaN set utility."""

    name = "nan_recsys"

    def game(self, candidates, example):  # type: ignore[no-untyped-def]
        if not candidates:
            return super().game(candidates, example)
        return CallableGame(lambda coalition: float("nan") if coalition else 0.0, len(candidates))


COUNTING_TASK = "pipeline_fixtures:CountingRecsysTask"
NAN_TASK = "pipeline_fixtures:NaNScorerRecsysTask"


def concurrent_tracking_worker(
    worker: int, locations: dict[str, str], num_runs: int, num_steps: int, barrier: Any, out: Any
) -> None:
    """One "pipeline run" for the concurrency test: a real Dagster materialization whose asset logs, through
    the pipeline's MLflow plumbing, ``num_runs`` nested stage runs with ``num_steps`` metric steps and one
    model version each. Started in a fresh process (spawn) next to another worker on the same SQLite store."""
    from pipelines import resources as res
    from pipelines.tracking import log_metrics, register_model, stage_run

    mlflow = build_resources(**locations)["mlflow"]

    @dg.asset(name=f"tracking_load_{worker}")
    def tracking_load(context: dg.AssetExecutionContext, mlflow: res.MLflowResource) -> None:
        barrier.wait(timeout=120)  # both processes write at the same time
        client = mlflow.client()
        for i in range(num_runs):
            with stage_run(mlflow, context, "load", method=f"w{worker}-{i}") as run_id:
                for step in range(num_steps):
                    log_metrics(mlflow, run_id, {"loss": 1.0 / (step + 1), "reward": float(step)}, step=step)
                mlflow.call(client.log_text, run_id, f"worker {worker} run {i}", "policy/model.txt")
                register_model(mlflow, f"runs:/{run_id}/policy", run_id, method=f"w{worker}-{i}")

    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([tracking_load], resources={"mlflow": mlflow}, instance=instance)
    out.put((worker, result.success, res.RETRY_COUNT["transient_errors"]))


RESUME_WORKSPACE_ENV = "SHAPEGRPO_TEST_WORKSPACE"


@dg.asset(name="flaky_training")
def flaky_training(
    context: dg.AssetExecutionContext, mlflow: MLflowResource, storage: StorageResource
) -> dict:
    """Stands in for a training step that is killed: logs 3 steps per attempt into a resumable stage run and
    crashes on its first attempt (a marker in the run directory, which re-execution shares, remembers it)."""
    from pipelines.tracking import log_metrics, stage_run

    out = storage.run_dir(context, "flaky_training")
    with stage_run(mlflow, context, "train", method="shapegrpo", resume=True) as run_id:
        done = len(mlflow.client().get_metric_history(run_id, "loss"))  # steps logged before the crash
        for step in range(done + 1, done + 4):
            log_metrics(mlflow, run_id, {"loss": 1.0 / step}, step=step)
        if not (out / "crashed_once").exists():
            (out / "crashed_once").write_text("")
            raise RuntimeError("simulated crash mid-training")
    return {"mlflow_run_id": run_id, "dir": str(out)}


def flaky_job() -> dg.JobDefinition:
    """A reconstructable job (module-level function) of ``flaky_training``; workspace from the environment."""
    locations = workspace(Path(os.environ[RESUME_WORKSPACE_ENV]))
    defs = dg.Definitions(
        assets=[flaky_training],
        jobs=[dg.define_asset_job("flaky", selection=[flaky_training])],
        resources=build_resources(**locations),
        executor=dg.in_process_executor,
    )
    return defs.resolve_job_def("flaky")
