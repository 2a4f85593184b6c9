"""Failure and resume: re-executing a failed Dagster run "from failure" continues in the same run directory
and the same MLflow training run, so the step axis has no gap and no step is logged twice."""

import dagster as dg
from pipeline_fixtures import RESUME_WORKSPACE_ENV, flaky_job, mlflow_resource

from pipelines.tracking import TAG_ROOT_RUN, TAG_STAGE, find_runs


def test_reexecution_from_failure_resumes_run_dir_and_mlflow_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(RESUME_WORKSPACE_ENV, str(tmp_path))
    job = dg.reconstructable(flaky_job)
    with dg.instance_for_test() as instance:
        with dg.execute_job(job, instance=instance, raise_on_error=False) as first:
            assert not first.success
            first_id = first.run_id
        options = dg.ReexecutionOptions.from_failure(first_id, instance)
        with dg.execute_job(job, instance=instance, reexecution_options=options) as second:
            assert second.success
            value = second.output_for_node("flaky_training")
        assert instance.get_run_by_id(second.run_id).root_run_id == first_id

    assert f"/runs/{first_id}/" in value["dir"]  # the re-execution wrote into the first run's directory
    mlflow = mlflow_resource(tmp_path)
    (train,) = find_runs(mlflow, {TAG_ROOT_RUN: first_id, TAG_STAGE: "train"})  # reopened, not a second run
    assert train.info.run_id == value["mlflow_run_id"]
    assert train.info.status == "FINISHED"
    steps = [m.step for m in mlflow.client().get_metric_history(train.info.run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
