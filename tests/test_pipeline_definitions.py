"""The Dagster definitions load and hold every asset, check, job, schedule and sensor."""

import dagster as dg
from pipeline_fixtures import ASSETS, definitions

import pipelines
from pipelines.config import METHODS
from pipelines.partitions import ALL_METHODS_TAGS

# Blocking: each stops everything downstream of bad data.
BLOCKING = {
    ("task_dataset", "check_eval_split_size"),
    ("candidate_sets", "check_format_valid_rate"),
    ("rollout_scores", "check_scorer_failure_rate"),
    ("rollout_scores", "check_tied_group_rate"),
    ("policy_evaluation", "check_eval_sample_size"),
    ("policy_evaluation", "check_eval_utility_finite"),
}
CHECKS = BLOCKING | {
    ("shapley_credits", "check_efficiency"),  # invariants of the credit code: warnings
    ("shapley_credits", "check_advantages_finite"),
    ("policy_evaluation", "check_not_worse_than_base"),
}


def test_module_defs_validate() -> None:
    dg.Definitions.validate_loadable(pipelines.defs)


def test_assets_checks_jobs_schedule_sensor_present(tmp_path) -> None:
    defs = definitions(tmp_path)
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == ASSETS
    assert {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys} == CHECKS

    compare = defs.resolve_job_def("compare_methods")
    retrain = defs.resolve_job_def("retrain")
    assert {k.to_user_string() for k in compare.asset_layer.executable_asset_keys} == ASSETS
    assert {k.to_user_string() for k in retrain.asset_layer.executable_asset_keys} == {
        "fine_tuned_policy",
        "policy_evaluation",
        "method_comparison",
    }
    for job in (compare, retrain):  # one run covers every method partition; the end prints the comparison
        assert ALL_METHODS_TAGS.items() <= job.tags.items()
        assert "print_comparison" in {h.name for h in job.hook_defs}

    schedule = defs.resolve_schedule_def("weekly_retrain")
    assert schedule.job_name == "retrain"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    sensor = defs.resolve_sensor_def("incoming_data_sensor")
    assert sensor.job_name == "compare_methods"


def test_assets_are_grouped_with_kinds_and_partitions(tmp_path) -> None:
    graph = definitions(tmp_path).resolve_asset_graph()
    groups = {k.to_user_string(): graph.get(k).group_name for k in graph.get_all_asset_keys()}
    assert groups == {
        "task_dataset": "data",
        "base_policy": "training",
        "fine_tuned_policy": "training",
        "candidate_sets": "rollouts",
        "rollout_scores": "rollouts",
        "shapley_credits": "credit",
        "policy_evaluation": "evaluation",
        "method_comparison": "evaluation",
    }
    for key in graph.get_all_asset_keys():
        assert graph.get(key).kinds, f"{key} has no kinds"
    for name in ("fine_tuned_policy", "policy_evaluation"):
        partitions = graph.get(dg.AssetKey(name)).partitions_def
        assert partitions is not None and partitions.get_partition_keys() == list(METHODS)
    blocking = {
        (k.asset_key.to_user_string(), k.name)
        for k in graph.asset_check_keys
        if graph.get_check_spec(k).blocking
    }
    assert blocking == BLOCKING


def test_method_partitions_match_the_trainers_methods() -> None:
    """Every method the trainer knows (wta included) is a partition, with the allocation it trains with."""
    from pipelines.config import METHOD_ALLOCATION
    from shapegrpo_core.training import METHODS as TRAIN_METHODS

    assert set(METHODS) == set(TRAIN_METHODS)
    assert METHOD_ALLOCATION == {m: alloc for m, (alloc, _lam) in TRAIN_METHODS.items()}
