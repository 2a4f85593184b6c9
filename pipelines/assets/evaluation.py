"""Evaluation domain: held-out evaluation per method (and of the base policy), and the method comparison built
from MLflow, which moves the registry's champion alias only to a winner with paired evidence."""

import hashlib
import json
import math
from typing import Any

import dagster as dg
import pandas as pd

from pipelines.checks import DataQualityResource
from pipelines.config import METHODS, ComparisonConfig, EvalConfig
from pipelines.partitions import method_partitions
from pipelines.reporting import (
    comparison_summary,
    figure_png,
    learning_curves,
    md_preview,
    mlflow_artifact_image_md,
    mlflow_ui_url,
    png_md,
    table_metadata,
)
from pipelines.resources import ComputeResource, MLflowResource, StorageResource
from pipelines.taskio import load_split, load_task
from pipelines.tracking import log_file, log_metrics, log_table, root_run_id, set_aliases, stage_run
from shapegrpo_core import evaluation, policy
from shapegrpo_core.batch_credit import collapsed
from shapegrpo_core.stats import decide_champion

CHECK_FINITE = "check_eval_utility_finite"
CHECK_SAMPLE_SIZE = "check_eval_sample_size"
CHECK_NOT_WORSE = "check_not_worse_than_base"
NO_WINNER = "no significant winner"
UNIT_KEYS = ("prompt_index", "sample")


def unit_scores(report: evaluation.EvalReport) -> dict[str, dict[str, float]]:
    """``{metric: {"prompt_index:sample": value}}`` per eval unit. Every method is evaluated on the same
    prompts with the same sampling seed (common random numbers), so unit i of one method pairs
    with unit i of another."""
    r = report.responses
    keys = [f"{i}:{s}" for i, s in zip(r["prompt_index"], r["sample"], strict=True)]
    return {m: dict(zip(keys, r[m].astype(float), strict=True)) for m in evaluation.METRICS if m in r}


def paired_units(units: dict[str, dict[str, float]]) -> dict[str, list[float]]:
    """Per-method scores on the units every method has a finite score for (a failed scorer drops the unit
    for all methods, so the pairing holds)."""
    keys = [
        k
        for k in next(iter(units.values()))
        if all(math.isfinite(u.get(k, math.nan)) for u in units.values())
    ]
    return {m: [u[k] for k in keys] for m, u in units.items()}


def scored_prompts(units: dict[str, dict[str, float]]) -> int:
    """How many eval prompts have a finite score for every policy in ``units`` (the independent units the
    comparison rests on; keys are ``"prompt_index:sample"``)."""
    first = next(iter(units.values()))
    keys = [k for k in first if all(math.isfinite(u.get(k, math.nan)) for u in units.values())]
    return len({k.split(":")[0] for k in keys})


def _evaluate(
    context: dg.AssetExecutionContext,
    config: EvalConfig,
    task_dataset: dict[str, Any],
    path: str,
    device: str,
) -> evaluation.EvalReport:
    task = load_task(task_dataset)
    model, tokenizer = policy.load_policy(path)
    model.to(device)
    dataset = policy.format_dataset(load_split(task_dataset, "eval"), tokenizer)
    report = evaluation.evaluate_policy(
        model,
        tokenizer,
        task,
        dataset=dataset,
        num_prompts=config.num_prompts,
        num_samples=config.num_samples,
        max_new_tokens=policy.completion_cap(model, config.max_new_tokens),
        temperature=config.temperature,
        seed=config.seed,
        num_bootstrap=config.num_bootstrap,
    )
    context.log.info(f"evaluated {path}: set_utility={report.metrics['set_utility'].value:.4f}")
    return report


def _log_report(
    mlflow: MLflowResource,
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    config: EvalConfig,
    report: evaluation.EvalReport,
    method: str,
) -> str:
    with stage_run(mlflow, context, "eval", method=method, params=config.model_dump()) as rid:
        log_metrics(mlflow, rid, report.to_dict())
        log_table(
            mlflow, rid, report.responses, "eval_responses", storage.run_dir(context, "eval_tables", method)
        )
    return rid


@dg.asset(
    group_name="evaluation",
    kinds={"pytorch", "mlflow"},
    partitions_def=method_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    check_specs=[
        dg.AssetCheckSpec(
            CHECK_SAMPLE_SIZE,
            asset="policy_evaluation",
            blocking=True,
            description="At least data_quality.min_eval_prompts eval prompts (default 6) have a finite set "
            "utility for every policy; fewer cannot tell methods apart, so the comparison (and the champion "
            "alias) does not run on them.",
        ),
        dg.AssetCheckSpec(
            CHECK_FINITE,
            asset="policy_evaluation",
            blocking=True,
            description="Eval utility is finite for every method (and the base policy).",
        ),
        dg.AssetCheckSpec(
            CHECK_NOT_WORSE,
            asset="policy_evaluation",
            description="Fine-tuning did not lower eval set utility below the base policy's (warning).",
        ),
    ],
    description="Held-out evaluation of each fine-tuned policy (and, with the same prompts, samples and "
    "seed, of the base policy): set utility, candidate utility, duplicates and format validity with "
    "bootstrap intervals.",
)
def policy_evaluation(
    context: dg.AssetExecutionContext,
    config: EvalConfig,
    task_dataset: dict[str, Any],
    base_policy: dict[str, Any],
    fine_tuned_policy: dict[str, dict[str, Any]],
    mlflow: MLflowResource,
    storage: StorageResource,
    compute: ComputeResource,
    data_quality: DataQualityResource,
):
    device = compute.resolved_device()

    def evaluated(name: str, path: str) -> dict[str, Any]:
        # Once per root run, policy and eval settings: the base policy whatever the number of method
        # partitions, and a method already evaluated when a re-execution runs this step again (no second
        # MLflow eval run).
        key = hashlib.sha256(json.dumps([path, config.model_dump()], sort_keys=True).encode()).hexdigest()
        cache = storage.run_dir(context, "policy_evaluation", name) / f"{key[:16]}.json"
        if cache.is_file():
            return json.loads(cache.read_text())
        report = _evaluate(context, config, task_dataset, path, device)
        done = {
            "metrics": report.to_dict(),
            "units": unit_scores(report),
            "mlflow_run_id": _log_report(mlflow, context, storage, config, report, name),
        }
        cache.write_text(json.dumps(done))
        return done

    base = evaluated("base", base_policy["path"])
    results: dict[str, dict[str, Any]] = {}
    for method in context.partition_keys:
        done = evaluated(method, fine_tuned_policy[method]["path"])
        results[method] = {
            **done,
            "base_metrics": base["metrics"],
            "base_mlflow_run_id": base["mlflow_run_id"],
            "model_version": fine_tuned_policy[method].get("model_version"),
        }

    table = pd.DataFrame(
        [{"policy": "base", **base["metrics"]}] + [{"policy": m, **r["metrics"]} for m, r in results.items()]
    )
    metadata: dict[str, Any] = {"dagster/row_count": len(table), "summary": md_preview(table, max_rows=20)}
    for m, r in results.items():
        metadata[f"{m}/set_utility"] = r["metrics"]["set_utility"]
        metadata[f"{m}/mlflow_run_id"] = r["mlflow_run_id"]
    metadata["base/set_utility"] = base["metrics"]["set_utility"]
    yield dg.Output(results, metadata=metadata)

    units = {"base": base["units"]["set_utility"]}
    units |= {m: r["units"]["set_utility"] for m, r in results.items()}
    prompts = scored_prompts(units)
    yield dg.AssetCheckResult(
        check_name=CHECK_SAMPLE_SIZE,
        passed=prompts >= data_quality.min_eval_prompts,
        metadata={"num_scored_prompts": prompts, "min_eval_prompts": data_quality.min_eval_prompts},
    )
    utilities = {"base": base["metrics"]["set_utility"]} | {
        m: r["metrics"]["set_utility"] for m, r in results.items()
    }
    yield dg.AssetCheckResult(
        check_name=CHECK_FINITE,
        passed=all(math.isfinite(u) for u in utilities.values()),
        metadata={f"{k}_set_utility": float(v) for k, v in utilities.items()},
    )
    deltas = {m: r["metrics"]["set_utility"] - base["metrics"]["set_utility"] for m, r in results.items()}
    yield dg.AssetCheckResult(
        check_name=CHECK_NOT_WORSE,
        passed=all(d >= 0 for d in deltas.values()),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={f"{m}_minus_base": float(d) for m, d in deltas.items()},
    )


def _history(mlflow: MLflowResource, run_id: str, metric: str) -> pd.DataFrame:
    history = mlflow.call(mlflow.client().get_metric_history, run_id, metric)
    df = pd.DataFrame([{"step": m.step, "value": m.value} for m in history], columns=["step", "value"])
    return df.sort_values("step").drop_duplicates("step", keep="last")  # a resumed step keeps its last value


def _curve(mlflow: MLflowResource, run_id: str, metric: str) -> pd.DataFrame:
    """Per-step history of ``metric`` in a training run (empty when the run never logged it), with its
    ``low``/``high`` interval bounds when the run logged ``<metric>_low``/``_high`` at the same steps."""
    df = _history(mlflow, run_id, metric)
    bounds = [
        _history(mlflow, run_id, f"{metric}_{side}").set_index("step")["value"] for side in ("low", "high")
    ]
    if len(df) and all(len(b) for b in bounds):
        df = df.assign(low=df["step"].map(bounds[0]), high=df["step"].map(bounds[1]))
    return df


@dg.asset(
    group_name="evaluation",
    kinds={"mlflow", "pandas"},
    ins={
        "policy_evaluation": dg.AssetIn(metadata={"allow_missing_partitions": True}),
        "fine_tuned_policy": dg.AssetIn(metadata={"allow_missing_partitions": True}),
    },
    description="Side-by-side table of the methods (eval metrics read back from MLflow) and their learning "
    "curves, and the paired differences (CI, P(improvement)) of the best method against each other one over "
    "the shared eval units; the champion alias moves only when every such CI excludes 0, otherwise the "
    "report says 'no significant winner' and the alias stays.",
)
def method_comparison(
    context: dg.AssetExecutionContext,
    config: ComparisonConfig,
    task_dataset: dict[str, Any],
    policy_evaluation: dict[str, dict[str, Any]],
    fine_tuned_policy: dict[str, dict[str, Any]],
    mlflow: MLflowResource,
    storage: StorageResource,
) -> dg.Output[dict[str, Any]]:
    methods = [m for m in METHODS if m in policy_evaluation and m in fine_tuned_policy]
    if not methods:
        raise ValueError("no method has both a fine-tuned policy and an evaluation; materialize them first")
    client = mlflow.client()
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, pd.DataFrame]] = {metric: {} for metric in config.curve_metrics}
    # Eval metrics come from MLflow (what its UI shows), not from the manifests.
    columns = [config.metric, f"{config.metric}_low", f"{config.metric}_high"]
    columns += [k for k in evaluation.METRICS if k != config.metric]
    base_eval_run = policy_evaluation[methods[0]]["base_mlflow_run_id"]
    base_metrics = mlflow.call(client.get_run, base_eval_run).data.metrics
    rows.append({"method": "base", **{k: base_metrics.get(k) for k in columns}, "eval_run_id": base_eval_run})
    for m in methods:
        eval_run = policy_evaluation[m]["mlflow_run_id"]
        train_run = fine_tuned_policy[m]["mlflow_run_id"]
        metrics = mlflow.call(client.get_run, eval_run).data.metrics
        for metric in config.curve_metrics:
            curves[metric][m] = _curve(mlflow, train_run, metric)
        train_curve = curves[config.curve_metrics[0]][m] if config.curve_metrics else pd.DataFrame()
        identical = _history(mlflow, train_run, "shapegrpo/identical_group_rate")["value"]
        rows.append(
            {
                "method": m,
                **{k: metrics.get(k) for k in columns},
                "collapsed": collapsed(identical.tolist()),
                "train_steps": int(train_curve["step"].max()) if len(train_curve) else 0,
                "final_train_metric": float(train_curve["value"].iloc[-1]) if len(train_curve) else None,
                "model_version": fine_tuned_policy[m].get("model_version"),
                "train_run_id": train_run,
                "eval_run_id": eval_run,
            }
        )
    table = pd.DataFrame(rows)
    if table[config.metric].isna().all():
        raise ValueError(f"eval runs have no metric {config.metric!r}; choose one of {evaluation.METRICS}")
    table.insert(4, "delta_vs_base", table[config.metric] - table.loc[0, config.metric])
    units = {m: (policy_evaluation[m].get("units") or {}).get(config.metric) for m in methods}
    if len(methods) < 2 or any(u is None for u in units.values()):
        raise ValueError("the champion gate needs per-unit eval scores of at least 2 methods")
    paired = paired_units(units)  # type: ignore[arg-type]
    n_units = len(next(iter(paired.values())))
    if n_units < 2:
        decision_pairs = pd.DataFrame()
        winner, reason = None, f"{NO_WINNER}: only {n_units} eval units have a finite score for every method"
    else:
        decision = decide_champion(paired, confidence=config.confidence, seed=config.seed)
        winner, reason, decision_pairs = decision.winner, decision.reason, decision.pairs
    top = [] if winner is not None else list(methods)
    verdict = winner if winner is not None else NO_WINNER

    out_dir = storage.run_dir(context, "method_comparison")
    png = figure_png(
        learning_curves(curves, "Learning curves (from MLflow)"), out_dir / "learning_curves.png"
    )
    references = {"warm start": float(table.loc[0, config.metric])}
    if config.metric == "set_utility":  # the task's reference policies are valued in set utility
        first = next(iter(units.values())) or {}
        evaluated = 1 + max((int(k.split(":")[0]) for k in first), default=-1)  # the eval rows scored
        references |= _reference_lines(task_dataset, evaluated)
    report_path = out_dir / "comparison.md"
    report_path.write_text(
        table.to_markdown(index=False, floatfmt=".4g")
        + (
            f"\n\nReference lines ({config.metric}): "
            + ", ".join(f"{k} {v:.4g}" for k, v in references.items())
        )
        + f"\n\nWinner by {config.metric}: {verdict}\n\n{reason}\n\n"
        + "Paired differences (best mean − other; eval units = prompt × sample, common random numbers):\n\n"
        + (decision_pairs.to_markdown(index=False, floatfmt=".4g") if len(decision_pairs) else "(none)")
        + "\n"
    )
    champion_version = None
    with stage_run(
        mlflow, context, "compare", params={"metric": config.metric, "methods": ",".join(methods)}
    ) as rid:
        log_table(mlflow, rid, table, "method_comparison", out_dir)
        log_file(mlflow, rid, out_dir / "learning_curves.png", "plots")
        log_file(mlflow, rid, report_path)
        mlflow.call(client.set_tag, rid, "winner", verdict)
        _log_final_eval(mlflow, table)
        # The compare run's own row in MLflow shows every method's headline numbers.
        headline = [config.metric, f"{config.metric}_low", f"{config.metric}_high", "delta_vs_base"]
        log_metrics(
            mlflow, rid, {f"{r['method']}/{c}": r[c] for r in table.to_dict("records") for c in headline}
        )
        # Aliases move last, and only here: a run that failed earlier, or a smoke profile, moves none.
        versions = {m: fine_tuned_policy[m].get("model_version") for m in methods}
        versions["base"] = fine_tuned_policy[methods[0]].get("base_model_version")
        if winner is not None:  # a tie leaves the champion alias where it is
            champion_version = versions[winner]
            versions[config.champion_alias] = champion_version
        moved = set_aliases(mlflow, versions)
    result = {
        "winner": winner,
        "tied": top if winner is None else [],
        "metric": config.metric,
        "reason": reason,
        "paired_differences": decision_pairs.to_dict(orient="records"),
        "champion_alias": config.champion_alias,
        "champion_version": champion_version,
        "aliases_moved": moved,
        "table": table.to_dict(orient="records"),
        "reference_lines": references,
        "report_path": str(report_path),
        "learning_curves_path": str(out_dir / "learning_curves.png"),
        "mlflow_run_id": rid,
        "root_run_id": root_run_id(context),
    }
    # The job's success hook prints this summary at the end of `dagster job execute`; the log keeps it too.
    context.log.info("\n" + comparison_summary(result))
    shown = table.drop(columns=["train_run_id", "eval_run_id"], errors="ignore")
    ui = mlflow_ui_url(mlflow.resolved_tracking_uri)
    return dg.Output(
        result,
        metadata={
            "winner": verdict,
            "tied": ", ".join(top) if winner is None else "",
            "reason": reason,
            "comparison": table_metadata(shown),
            "paired_differences": table_metadata(decision_pairs) if len(decision_pairs) else "(none)",
            "champion_version": str(champion_version),
            "reference_lines": _fmt_lines(references),
            "collapsed": ", ".join(table.loc[table["collapsed"].fillna(False).astype(bool), "method"])
            or "none",
            "learning_curves": mlflow_artifact_image_md(
                ui, rid, "plots/learning_curves.png", "learning curves"
            ),
            "learning_curves_embedded": png_md(png, "learning curves"),
            "report_path": dg.MetadataValue.path(str(report_path)),
            "mlflow_run_id": rid,
        },
    )


def _fmt_lines(lines: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in lines.items())


def _reference_lines(task_dataset: dict[str, Any], num_rows: int) -> dict[str, float]:
    """Where the methods stand besides the warm start (docs/statistics.md), for a task that knows them
    (recsys): a random policy, the best prompt-independent set and the oracle, on the eval rows evaluated."""
    task = load_task(task_dataset)
    if not hasattr(task, "reference_levels") or num_rows < 1:
        return {}
    eval_split = load_split(task_dataset, "eval")
    return task.reference_levels(eval_split.select(range(min(num_rows, len(eval_split)))))


# Prefix of the comparison's numbers logged on each method's training run (and the base policy's eval run),
# so MLflow's compare view of those runs shows the final eval side by side under the same names.
FINAL_EVAL = "final_eval"


_NOT_METRICS = {"method", "model_version", "train_run_id", "eval_run_id", "collapsed"}
_TRAIN_ONLY = {"train_steps", "final_train_metric"}


def _log_final_eval(mlflow: MLflowResource, table: pd.DataFrame) -> None:
    for row in table.to_dict("records"):
        base = row["method"] == "base"
        run_id = row["eval_run_id"] if base else row["train_run_id"]
        skip = _NOT_METRICS | (_TRAIN_ONLY if base else set())
        values = {f"{FINAL_EVAL}/{c}": v for c, v in row.items() if c not in skip and v is not None}
        # At the last training step, where the run's curves end (the base policy was not trained: step 0).
        step = 0 if base else int(row["train_steps"])
        log_metrics(mlflow, run_id, values, step=step)
