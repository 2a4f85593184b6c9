"""The whole compare_methods chain with configs/smoke.yaml, then the retrain job, against a temporary Dagster
instance and MLflow store; MLflow then holds every method's runs, per-step metrics, registered versions with
aliases (champion on the winner, none on a tie) and the comparison artifacts (about 20 s on 2 cores)."""

import dagster as dg
from pipeline_fixtures import ASSETS, definitions, mlflow_resource, smoke_run_config

from pipelines.assets.evaluation import NO_WINNER
from pipelines.config import METHODS, TrainConfig
from pipelines.tracking import TAG_METHOD, TAG_ROOT_RUN, TAG_STAGE, find_runs

MODEL = "shapegrpo-policy"


def _materialized(result: dg.ExecuteInProcessResult) -> set[tuple[str, str | None]]:
    return {(e.asset_key.to_user_string(), e.partition) for e in result.get_asset_materialization_events()}


def test_compare_methods_then_retrain(tmp_path) -> None:
    # Smoke sizes with the full profile's registry behaviour (the smoke profile itself moves no alias:
    # test_pipeline_isolation).
    run_config = smoke_run_config(
        tmp_path, experiment_name="shapegrpo-test", registered_model_name=MODEL, registry_aliases=True
    )
    defs = definitions(tmp_path)
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("compare_methods").execute_in_process(
            run_config=run_config, instance=instance
        )
        assert result.success
        done = _materialized(result)
        assert {a for a, _ in done} == ASSETS
        for asset in ("fine_tuned_policy", "policy_evaluation"):  # one run covered every method partition
            assert {p for a, p in done if a == asset} == set(METHODS)
        checks = [
            e.asset_check_evaluation_data
            for e in result.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"
        ]
        blocking = {c.check_name for c in checks if c.severity == dg.AssetCheckSeverity.ERROR}
        assert blocking == {
            "check_eval_split_size",
            "check_format_valid_rate",
            "check_scorer_failure_rate",
            "check_tied_group_rate",
            "check_eval_sample_size",
            "check_eval_utility_finite",
        }
        assert all(c.passed for c in checks if c.severity == dg.AssetCheckSeverity.ERROR)
        comparison = result.output_for_node("method_comparison")

        # retrain (the schedule's job) reuses the stored dataset and base policy.
        retrain_cfg = {"ops": {k: run_config["ops"][k] for k in ("fine_tuned_policy", "policy_evaluation")}}
        again = defs.resolve_job_def("retrain").execute_in_process(run_config=retrain_cfg, instance=instance)
        assert again.success
        assert {a for a, _ in _materialized(again)} == {
            "fine_tuned_policy",
            "policy_evaluation",
            "method_comparison",
        }

    mlflow = mlflow_resource(tmp_path)
    client = mlflow.client()
    runs = find_runs(mlflow, {TAG_ROOT_RUN: result.run_id})
    by_stage: dict[str, list] = {}
    for r in runs:
        by_stage.setdefault(r.data.tags[TAG_STAGE], []).append(r)
    assert sorted(r.data.tags[TAG_METHOD] for r in by_stage["train"]) == sorted(METHODS)
    assert sorted(r.data.tags[TAG_METHOD] for r in by_stage["eval"]) == sorted([*METHODS, "base"])
    max_steps = run_config["ops"]["fine_tuned_policy"]["config"]["max_steps"]
    for r in by_stage["train"]:  # per-step training metrics, through the TrainerCallback
        assert r.data.params["method"] == r.data.tags[TAG_METHOD]  # the compare view lines methods up
        assert float(r.data.params["format_penalty"]) == TrainConfig().format_penalty  # same for every method
        for key in ("loss", "reward"):
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            assert sorted(steps) == list(range(1, max_steps + 1)), key
        assert [m.step for m in client.get_metric_history(r.info.run_id, "heldout/set_utility")] == [
            0,
            max_steps,
        ]

    name = mlflow.registered_model_name
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(v.tags["method"] for v in versions) == sorted(["base", *METHODS, *METHODS])  # + retrain
    aliases = client.get_registered_model(name).aliases
    winner = comparison["winner"]
    (compare_run,) = by_stage["compare"]
    # Smoke-sized policies can tie exactly on eval set utility (3 steps barely move them, and the eval samples
    # share a seed): then there is no winner and no champion. test_pipeline_comparison covers both outcomes.
    if winner is None:
        assert comparison["tied"] and compare_run.data.tags["winner"] == NO_WINNER
        assert "champion" not in aliases
    else:
        assert winner in METHODS and compare_run.data.tags["winner"] == winner
        assert str(aliases["champion"]) == str(comparison["champion_version"])
    assert {"base", *METHODS} <= set(aliases) <= {"base", "champion", *METHODS}
    artifacts = {a.path for a in client.list_artifacts(compare_run.info.run_id, "tables")}
    assert {"tables/method_comparison.csv", "tables/method_comparison.parquet"} <= artifacts
    assert "plots/learning_curves.png" in {
        a.path for a in client.list_artifacts(compare_run.info.run_id, "plots")
    }
    # After retrain the champion (if any) is the retrain run's winner, a version registered by that run.
    retrain_compare = find_runs(mlflow, {TAG_ROOT_RUN: again.run_id, TAG_STAGE: "compare"})[0]
    retrain_winner = retrain_compare.data.tags["winner"]
    if retrain_winner != NO_WINNER:
        champion = client.get_model_version_by_alias(name, "champion")
        assert champion.tags["method"] == retrain_winner
        assert champion.run_id in {
            r.info.run_id for r in find_runs(mlflow, {TAG_ROOT_RUN: again.run_id, TAG_STAGE: "train"})
        }
    elif winner is None:
        assert "champion" not in client.get_registered_model(name).aliases
