"""Rollouts domain: responses of the base policy parsed into candidate sets, and their scores (once)."""

from typing import Any

import dagster as dg
import pandas as pd

from pipelines.checks import scorer_failure_rate, tied_group_rate
from pipelines.config import RolloutConfig
from pipelines.reporting import md_preview
from pipelines.resources import ComputeResource, GenerationResource, MLflowResource, StorageResource
from pipelines.taskio import load_rows, load_task
from pipelines.tracking import log_metrics, log_table, stage_run
from shapegrpo_core import evaluation, policy
from shapegrpo_core.evaluation import count_duplicates

KEYS = ["prompt_index", "generation"]


@dg.asset(
    group_name="rollouts",
    kinds={"pytorch", "parquet"},
    description="G sampled responses of the base policy per training prompt, each parsed into its candidates "
    "(text + character span; the first K are the players). One row per response.",
)
def candidate_sets(
    context: dg.AssetExecutionContext,
    config: RolloutConfig,
    task_dataset: dict[str, Any],
    base_policy: dict[str, Any],
    generation: GenerationResource,
    compute: ComputeResource,
    mlflow: MLflowResource,
    storage: StorageResource,
) -> dg.Output[pd.DataFrame]:
    task = load_task(task_dataset)
    rows = load_rows(task_dataset, "train", limit=config.num_prompts)
    model, tokenizer = policy.load_policy(base_policy["path"])
    model.to(compute.resolved_device())
    prompts = [policy.format_prompt(tokenizer, row["prompt"]) for row in rows]
    completions = generation.generate(
        model,
        tokenizer,
        prompts,
        model_path=base_policy["path"],
        num_samples=config.num_generations,
        max_new_tokens=policy.completion_cap(model, config.max_new_tokens),
        temperature=config.temperature,
        seed=config.seed,
    )
    records = []
    for i, (row, samples) in enumerate(zip(rows, completions, strict=True)):
        for g, text in enumerate(samples):
            parsed = task.parse(text)
            scored = parsed[: task.num_candidates]
            records.append(
                {
                    "prompt_index": i,
                    "generation": g,
                    "prompt": row["prompt"],
                    "completion": text,
                    "candidates": [c.text for c in scored],
                    "spans": [[c.start, c.end] for c in scored],
                    "num_parsed": len(parsed),
                    "num_scored": len(scored),
                    "num_duplicates": count_duplicates(scored),
                    "format_valid": bool(task.format_valid(text)),
                }
            )
    df = pd.DataFrame.from_records(records)
    stats = {
        "num_prompts": len(rows),
        "num_generations": config.num_generations,
        "num_responses": len(df),
        "format_valid_rate": float(df["format_valid"].mean()),
        "mean_num_parsed": float(df["num_parsed"].mean()),
        "empty_response_rate": float((df["num_scored"] == 0).mean()),
        "duplicate_rate": float(df["num_duplicates"].sum() / max(1, df["num_scored"].sum())),
    }
    with stage_run(
        mlflow, context, "rollouts", params=config.model_dump() | {"backend": generation.backend}
    ) as rid:
        log_metrics(mlflow, rid, stats)
        log_table(mlflow, rid, df, "candidate_sets", storage.run_dir(context, "candidate_sets"))
    return dg.Output(
        df,
        metadata={**stats, "dagster/row_count": len(df), "mlflow_run_id": rid, "preview": md_preview(df)},
    )


@dg.asset(
    group_name="rollouts",
    kinds={"python", "parquet"},
    description="Every rollout scored once by the task: set utility R = U(scored candidates), u0, each "
    "candidate's own utility U({i}) and the game itself (JSON), one row per response. The credit stage "
    "computes credit from this table; nothing downstream scores these rollouts again (for `code`: each "
    "candidate goes through the sandbox once).",
)
def rollout_scores(
    context: dg.AssetExecutionContext,
    task_dataset: dict[str, Any],
    candidate_sets: pd.DataFrame,
    mlflow: MLflowResource,
    storage: StorageResource,
) -> dg.Output[pd.DataFrame]:
    task = load_task(task_dataset)
    sets = candidate_sets.sort_values(KEYS)
    groups = [list(g["completion"]) for _, g in sets.groupby("prompt_index", sort=True)]
    num_prompts = len(groups)
    if sorted(set(sets["prompt_index"])) != list(range(num_prompts)):
        raise ValueError("candidate_sets must hold prompts 0..P-1 of the train split; rematerialize it")
    examples = load_rows(task_dataset, "train", limit=num_prompts)
    # The trainer's scorer, one task.games call for the batch: a response whose scoring fails is a recorded
    # NaN set utility, not a crash (docs/method.md, "Advantages").
    df = evaluation.score_completions(task, examples, groups, scorer_errors="nan", keep_games=True)
    df = df.rename(columns={"sample": "generation"})
    stats = {
        "num_sets": len(df),
        "num_candidates": int(df["num_scored"].sum()),
        "mean_set_utility": float(df["set_utility"].mean()),
        "mean_candidate_utility": float(df["candidate_utility"].mean()),
        "num_nan_sets": int(df["set_utility"].isna().sum()),
        "scorer_failure_rate": scorer_failure_rate(df),
        "tied_group_rate": tied_group_rate(df),
    }
    with stage_run(mlflow, context, "scores") as rid:
        log_metrics(mlflow, rid, stats)
        log_table(mlflow, rid, df, "rollout_scores", storage.run_dir(context, "rollout_scores"))
    preview = md_preview(df.drop(columns=["game", "spans"]))
    return dg.Output(
        df, metadata={**stats, "dagster/row_count": len(df), "mlflow_run_id": rid, "preview": preview}
    )
