"""Settings are checked before any step acts: a rejected config names each bad setting and leaves MLflow and
the data directory untouched; names with a fixed set of values are rejected by Dagster before a run exists."""

import inspect
from pathlib import Path

import dagster as dg
import pytest
from pipeline_fixtures import definitions, smoke_run_config

from pipelines.assets import all_assets
from pipelines.validation import ASSET_CONFIGS, InvalidSettingsError, settings_problems


def _ops(**sections: dict) -> dict:
    return {asset: {"config": config} for asset, config in sections.items()}


@pytest.mark.parametrize(
    ("ops", "expected"),
    [
        (_ops(fine_tuned_policy={"learning_rate": -1e-3}), "ops.fine_tuned_policy.config.learning_rate"),
        (_ops(task_dataset={"num_candidates": 0}), "ops.task_dataset.config.num_candidates"),
        (_ops(task_dataset={"task": "recsy"}), "unknown task 'recsy'"),
        (
            _ops(task_dataset={"task": "recsys", "task_options": {"movielens_path": "/no/such/ml-100k"}}),
            "/no/such/ml-100k",
        ),
        (_ops(task_dataset={"task_options": {"num_itemz": 10}}), "num_itemz"),
        (_ops(fine_tuned_policy={"training_options": {"shapley_engin": "exact"}}), "shapley_engin"),
        (_ops(fine_tuned_policy={"num_generations": 1}), "ops.fine_tuned_policy.config.num_generations"),
        (_ops(shapley_credits={"lam": 1.5}), "ops.shapley_credits.config.lam"),
        (_ops(base_policy={"hidden_size": 30, "num_heads": 4}), "ops.base_policy.config.hidden_size"),
    ],
)
def test_each_bad_setting_is_named(ops, expected) -> None:
    problems = settings_problems(ops)
    assert len(problems) == 1 and expected in problems[0], problems


def test_good_settings_and_known_options_pass() -> None:
    ops = _ops(
        task_dataset={"task": "recsys", "num_candidates": 3, "task_options": {"num_items": 24}},
        fine_tuned_policy={"training_options": {"shapley_engine": "exact", "per_device_train_batch_size": 8}},
    )
    assert settings_problems(ops) == []
    assert settings_problems({}) == []


def test_every_asset_config_is_checked_and_every_asset_opens_mlflow() -> None:
    """The validation runs when a step opens its MLflow resource, so every asset must require it."""
    for asset in all_assets:
        fn = asset.op.compute_fn.decorated_fn
        params = inspect.signature(fn).parameters
        name = asset.key.to_user_string()
        assert "mlflow" in asset.required_resource_keys, name
        if "config" in params:
            assert ASSET_CONFIGS[name] is params["config"].annotation or (
                ASSET_CONFIGS[name].__name__ == params["config"].annotation
            ), name
        else:
            assert name not in ASSET_CONFIGS


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_a_rejected_config_changes_nothing_in_mlflow_or_data(tmp_path) -> None:
    config = smoke_run_config(tmp_path)
    config["ops"]["fine_tuned_policy"]["config"]["learning_rate"] = -0.001
    config["ops"]["task_dataset"]["config"]["task_options"]["movielens_path"] = str(tmp_path / "missing")
    with dg.instance_for_test() as instance:
        result = (
            definitions(tmp_path)
            .resolve_job_def("compare_methods")
            .execute_in_process(run_config=config, instance=instance, raise_on_error=False)
        )
        assert not result.success
        assert [e.step_key for e in result.all_events if e.event_type_value == "STEP_START"] == []
        logs = "\n".join(str(e.dagster_event) for e in instance.all_logs(result.run_id) if e.dagster_event)
        assert "ops.fine_tuned_policy.config.learning_rate" in logs and str(tmp_path / "missing") in logs
    assert _files(tmp_path / "data") == []
    assert not (tmp_path / "mlruns").exists()  # not even the MLflow store was opened


def test_a_value_outside_a_fixed_set_is_rejected_before_a_run_exists(tmp_path) -> None:
    config = smoke_run_config(tmp_path)
    config["ops"]["shapley_credits"]["config"]["engine"] = "fastest"
    with dg.instance_for_test() as instance:
        with pytest.raises(dg.DagsterInvalidConfigError, match="fastest"):
            definitions(tmp_path).resolve_job_def("compare_methods").execute_in_process(
                run_config=config, instance=instance
            )
        assert instance.get_runs() == []


def test_the_error_type_is_a_value_error_for_callers() -> None:
    assert issubclass(InvalidSettingsError, ValueError)
