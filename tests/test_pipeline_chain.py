"""The pipeline materializes for real (tiny random-init policy, temporary Dagster instance and MLflow store),
and a failing blocking check stops the assets downstream of it."""

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from pipeline_fixtures import TINY_TASK, mlflow_resource, resources, tiny_random_policy

from pipelines.assets import all_assets, fine_tuned_policy
from pipelines.checks import all_checks
from pipelines.config import CreditConfig
from pipelines.tracking import TAG_ROOT_RUN, TAG_STAGE, find_runs
from shapegrpo_core.credit import ALLOCATIONS

UP_TO_CREDITS = ["task_dataset", "base_policy", "candidate_sets", "candidate_utilities", "shapley_credits"]


def _check_results(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {
        e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data.passed
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def test_chain_materializes_dataset_to_credits(tmp_path) -> None:
    policy_dir = tiny_random_policy(tmp_path / "random_policy")
    run_config = {
        "ops": {
            "task_dataset": {"config": TINY_TASK},
            "base_policy": {"config": {"model_path": str(policy_dir)}},
            "candidate_sets": {"config": {"num_prompts": 4, "num_generations": 4, "max_new_tokens": 8}},
        }
    }
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [*all_assets, *all_checks],
            selection=UP_TO_CREDITS,
            resources=resources(tmp_path),
            run_config=run_config,
            instance=instance,
        )
        assert result.success
        materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        assert materialized == set(UP_TO_CREDITS)
        checks = _check_results(result)
        assert checks["check_efficiency"] and checks["check_advantages_finite"]
        assert set(checks) == {"check_efficiency", "check_advantages_finite", "check_candidates_parsed"}

        credits = result.output_for_node("shapley_credits")
        sets = result.output_for_node("candidate_sets")
        assert len(sets) == 4 * 4
        # Every set is in the table; phi sums to R - u0 per set; advantages are finite.
        per_set = credits.groupby(["prompt_index", "generation"]).agg(
            phi=("phi", "sum"), r=("set_reward", "first"), u0=("u0", "first")
        )
        assert len(per_set) == 16
        np.testing.assert_allclose(per_set["phi"], per_set["r"] - per_set["u0"], atol=1e-6)
        for a in ("uniform", "shapley", "loo"):
            assert np.isfinite(credits[f"advantage_{a}"]).all()
        # GRPO (uniform) pays every candidate the set reward.
        real = credits[credits["candidate_index"] >= 0]
        np.testing.assert_allclose(real["rho_uniform"], real["set_reward"])
        # As in training, a format-invalid response's rewards carry the format penalty (utilities do not).
        penalty = np.where(credits["format_valid"], 0.0, CreditConfig().format_penalty)
        np.testing.assert_allclose(credits["set_reward"], credits["set_utility"] - penalty)
        assert not credits["format_valid"].all()  # a random-init policy: the penalty is exercised

        # Metadata a user sees in the UI.
        mat = instance.get_latest_materialization_event(dg.AssetKey("shapley_credits")).asset_materialization
        for key in ("free_rider_rate", "credit_histogram", "preview", "mlflow_run_id", "dagster/row_count"):
            assert key in mat.metadata
        assert mat.metadata["credit_histogram"].value.startswith("![credit histogram](data:image/png;base64,")

    # MLflow: one parent run for the Dagster run, one nested run per stage, the base model registered.
    mlflow = mlflow_resource(tmp_path)
    runs = find_runs(mlflow, {TAG_ROOT_RUN: result.run_id})
    stages = sorted(r.data.tags[TAG_STAGE] for r in runs)
    assert stages == sorted(["pipeline", "data", "base_policy", "rollouts", "utilities", "credit"])
    parent = next(r for r in runs if r.data.tags[TAG_STAGE] == "pipeline").info.run_id
    assert all(r.data.tags.get("mlflow.parentRunId") == parent for r in runs if r.info.run_id != parent)
    client = mlflow.client()
    (base,) = client.search_model_versions(f"name = '{mlflow.registered_model_name}'")
    assert base.tags["method"] == "base"
    assert client.get_registered_model(mlflow.registered_model_name).aliases == {}  # no comparison ran
    credit_run = next(r for r in runs if r.data.tags[TAG_STAGE] == "credit")
    artifacts = {a.path for a in client.list_artifacts(credit_run.info.run_id, "tables")}
    assert "tables/shapley_credits.parquet" in artifacts


def _credits_table(corruption: str) -> pd.DataFrame:
    """A two-set credits table with the real columns, consistent except for ``corruption``."""
    rows = []
    for g, (r, phis) in enumerate([(1.0, [0.75, 0.25]), (0.5, [0.5, 0.0])]):
        for i, phi in enumerate(phis):
            row = {
                "prompt_index": 0,
                "generation": g,
                "candidate_index": i,
                "candidate": f"i{i}",
                "num_scored": 2,
                "set_reward": r,
                "u0": 0.0,
                "phi": phi,
                "phi_loo": phi,
            }
            for a in ALLOCATIONS:
                row |= {f"rho_{a}": r, f"advantage_{a}": 0.1, f"set_advantage_{a}": 0.1}
            rows.append(row)
    df = pd.DataFrame(rows)
    if corruption == "inefficient":
        df.loc[0, "phi"] += 0.01  # sum phi != R - u0 in set 0
    elif corruption == "nan_advantage":
        df.loc[1, "advantage_shapley"] = np.nan
    return df


@pytest.mark.parametrize(
    ("corruption", "failing_check"),
    [("inefficient", "check_efficiency"), ("nan_advantage", "check_advantages_finite"), ("none", None)],
)
def test_failing_blocking_check_stops_downstream(tmp_path, corruption, failing_check) -> None:
    # A test-only definition of the credits asset producing bad data, the real checks, and the real training
    # asset downstream of it. Training must not start when a blocking check fails.
    @dg.asset(name="shapley_credits")
    def bad_credits() -> pd.DataFrame:
        return _credits_table(corruption)

    @dg.asset(
        name="fine_tuned_policy", partitions_def=fine_tuned_policy.partitions_def, deps=["shapley_credits"]
    )
    def training_stand_in(context: dg.AssetExecutionContext) -> dict:
        return {k: {"trained": True} for k in context.partition_keys}

    credit_checks = [
        c for c in all_checks if "shapley_credits" in {k.asset_key.path[-1] for k in c.check_keys}
    ]
    # The real training asset's wiring: it depends on shapley_credits (its checks gate it).
    assert dg.AssetKey("shapley_credits") in fine_tuned_policy.dependency_keys
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [bad_credits, training_stand_in, *credit_checks],
            resources={"io_manager": resources(tmp_path)["io_manager"]},
            partition_key="shapegrpo",
            instance=instance,
            raise_on_error=False,
        )
        checks = _check_results(result)
        materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "shapley_credits" in materialized
    if failing_check is None:
        assert result.success and all(checks.values())
        assert "fine_tuned_policy" in materialized
    else:
        assert not result.success
        assert checks[failing_check] is False
        assert "fine_tuned_policy" not in materialized
