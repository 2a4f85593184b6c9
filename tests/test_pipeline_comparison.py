"""method_comparison moves the champion alias only when the best method's paired CI (over shared eval units)
against every other method excludes 0; overlapping intervals or all-NaN scores give "no significant winner"
and leave the alias where it was. The real asset
runs on a temporary Dagster instance and MLflow store, fed by stand-in training/eval assets that log real runs
and register real model versions (no policies are trained)."""

from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from pipeline_fixtures import mlflow_resource, resources

from pipelines.assets import method_comparison, task_dataset
from pipelines.assets.evaluation import FINAL_EVAL, NO_WINNER, _curve, paired_units
from pipelines.config import METHODS
from pipelines.jobs import compare_methods
from pipelines.partitions import method_partitions
from pipelines.reporting import COMPARISON_MARKER
from pipelines.resources import MLflowResource
from pipelines.tracking import TAG_STAGE, find_runs, log_metrics, register_model, stage_run

NAN = float("nan")


def test_paired_units_drop_a_unit_that_failed_for_any_method() -> None:
    units = {"grpo": {"0:0": 0.1, "0:1": NAN, "1:0": 0.3}, "loo": {"0:0": 0.2, "0:1": 0.5, "1:0": NAN}}
    assert paired_units(units) == {"grpo": [0.1], "loo": [0.2]}


def _units(utilities: dict[str, float], noise: float) -> dict[str, dict[str, float]]:
    """40 eval units per method: a shared per-unit difficulty (common random numbers) plus the method's level
    and independent noise of size ``noise``."""
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0, 0.3, 40)
    return {
        m: {f"{i}:0": u + d + noise * rng.normal() for i, d in enumerate(difficulty)}
        for m, u in utilities.items()
    }


def _stand_ins(utilities: dict[str, float], noise: float) -> list[dg.AssetsDefinition]:
    """Upstream assets under the real names, logging eval/train runs and registering a version per method."""

    @dg.asset(name="fine_tuned_policy", partitions_def=method_partitions)
    def trained(context: dg.AssetExecutionContext, mlflow: MLflowResource) -> dict:
        out = {}
        for m in context.partition_keys:
            with stage_run(mlflow, context, "train", method=m) as rid:
                for step in (1, 2):
                    log_metrics(mlflow, rid, {"reward": 0.1 * step}, step=step)
                    held = {"heldout/set_utility": 0.2, "heldout/set_utility_low": 0.1}
                    log_metrics(mlflow, rid, held | {"heldout/set_utility_high": 0.3}, step=step)
                version = register_model(mlflow, f"runs:/{rid}/policy", rid, method=m)
            out[m] = {"path": "unused", "mlflow_run_id": rid, "model_version": version}
        return out

    @dg.asset(name="policy_evaluation", partitions_def=method_partitions)
    def evaluated(context: dg.AssetExecutionContext, mlflow: MLflowResource) -> dict:
        with stage_run(mlflow, context, "eval", method="base") as base_rid:
            log_metrics(mlflow, base_rid, {"set_utility": 0.3})
        out = {}
        units = _units(utilities, noise)
        for m in context.partition_keys:
            with stage_run(mlflow, context, "eval", method=m) as rid:
                log_metrics(mlflow, rid, {"set_utility": utilities[m]})
            out[m] = {
                "mlflow_run_id": rid,
                "base_mlflow_run_id": base_rid,
                "units": {"set_utility": units[m]},
            }
        return out

    return [trained, evaluated]


@pytest.mark.parametrize(
    ("utilities", "noise", "winner"),
    [
        ({"grpo": 0.5, "shapegrpo": 0.7, "loo": 0.6, "wta": 0.55}, 0.01, "shapegrpo"),  # clear paired win
        (
            {"grpo": 0.6, "shapegrpo": 0.61, "loo": 0.5, "wta": 0.55},
            0.2,
            None,
        ),  # best mean, but the CI vs grpo spans 0
        ({"grpo": NAN, "shapegrpo": NAN, "loo": NAN, "wta": NAN}, 0.0, None),
    ],
    ids=["winner", "overlapping", "all_nan"],
)
def test_champion_moves_only_on_a_winner(
    tmp_path, capsys, utilities: dict[str, float], noise: float, winner: str | None
) -> None:
    tied = [] if winner is not None else list(METHODS)
    mlflow = mlflow_resource(tmp_path)
    client = mlflow.client()
    name = mlflow.registered_model_name
    # A champion from an earlier comparison.
    earlier = client.create_run(mlflow.experiment_id()).info.run_id
    previous = register_model(mlflow, f"runs:/{earlier}/policy", earlier, method="earlier")
    client.set_registered_model_alias(name, "champion", previous)

    # The real compare_methods job (its tags cover every method partition; its hook prints the result) over
    # the real comparison asset and the stand-ins.
    defs = dg.Definitions(
        assets=[task_dataset, *_stand_ins(utilities, noise), method_comparison],
        jobs=[compare_methods],
        resources=resources(tmp_path),
        executor=dg.in_process_executor,
    )
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("compare_methods").execute_in_process(instance=instance)
        assert result.success
        out = result.output_for_node("method_comparison")
        mat = instance.get_latest_materialization_event(
            dg.AssetKey("method_comparison")
        ).asset_materialization

    champion = client.get_model_version_by_alias(name, "champion")
    # The held-out curve carries its interval, which the learning-curve plot draws as a band.
    band = _curve(mlflow, out["table"][1]["train_run_id"], "heldout/set_utility")
    assert band[["low", "high"]].to_numpy().tolist() == [[0.1, 0.3], [0.1, 0.3]]
    (compare_run,) = find_runs(mlflow, {TAG_STAGE: "compare"})
    report_path = client.download_artifacts(compare_run.info.run_id, "comparison.md", str(tmp_path))
    report = Path(report_path).read_text()
    assert out["winner"] == winner and out["tied"] == tied
    # The end of the run prints the table and where the report is; that file is the logged report.
    printed = capsys.readouterr().out
    assert COMPARISON_MARKER in printed and f"Report: {out['report_path']}" in printed
    assert all(f"| {m} " in printed for m in ["base", *METHODS])
    # Reference lines: the warm start (base policy) and the default recsys world's three reference policies;
    # no stand-in logged an identical-group rate, so no run is flagged collapsed.
    lines = out["reference_lines"]
    assert set(lines) == {"warm start", "random", "prompt_independent", "oracle"}
    assert lines["warm start"] == 0.3 and lines["random"] < lines["prompt_independent"] < lines["oracle"]
    assert "Reference lines: warm start 0.3, random" in printed and "Collapsed runs" in printed
    assert mat.metadata["collapsed"].value == "none"
    assert Path(out["report_path"]).read_text() == report
    # The asset page shows the table inline (table metadata, one record per policy) and the plot as a short
    # markdown image served by the MLflow UI (inline in Dagster's UI; the embedded PNG is kept too).
    shown = mat.metadata["comparison"]
    assert isinstance(shown, dg.TableMetadataValue)
    assert [r.data["method"] for r in shown.records] == ["base", *METHODS]
    assert [r.data["set_utility"] for r in shown.records[1:]] == [
        None if np.isnan(utilities[m]) else float(f"{utilities[m]:.4g}") for m in METHODS
    ]
    curves = mat.metadata["learning_curves"].value
    assert len(curves) < 1000 and f"run_uuid={compare_run.info.run_id}" in curves
    assert "plots%2Flearning_curves.png" in curves
    assert mat.metadata["learning_curves_embedded"].value.startswith("![learning curves](data:image/png")
    # MLflow: each method's training run carries the comparison's final eval under the same names, and the
    # compare run every method's headline numbers.
    for row in out["table"][1:]:
        train = client.get_run(row["train_run_id"]).data.metrics
        assert train[f"{FINAL_EVAL}/set_utility"] == pytest.approx(utilities[row["method"]], nan_ok=True)
        assert train[f"{FINAL_EVAL}/delta_vs_base"] == pytest.approx(row["delta_vs_base"], nan_ok=True)
        assert compare_run.data.metrics[f"{row['method']}/set_utility"] == pytest.approx(
            utilities[row["method"]], nan_ok=True
        )
    if winner is None:
        assert str(champion.version) == previous  # the alias stays
        assert out["champion_version"] is None
        assert mat.metadata["winner"].value == NO_WINNER
        assert compare_run.data.tags["winner"] == NO_WINNER
        assert f"Winner by set_utility: {NO_WINNER}" in report and "no significant winner" in out["reason"]
        assert mat.metadata["tied"].value == ", ".join(tied)
    else:
        assert champion.tags["method"] == winner and str(champion.version) == out["champion_version"]
        assert mat.metadata["winner"].value == winner == compare_run.data.tags["winner"]
        assert f"Winner by set_utility: {winner}" in report
        pairs = out["paired_differences"]
        assert {p["versus"] for p in pairs} == set(METHODS) - {winner}
        assert all(p["ci_low"] > 0 and p["p_improvement"] > 0.5 for p in pairs)
