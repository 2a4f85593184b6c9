"""Rollouts domain: responses of the base policy parsed into candidate sets, and their utilities."""

from typing import Any

import dagster as dg
import pandas as pd

from pipelines.config import RolloutConfig
from pipelines.reporting import md_preview
from pipelines.resources import ComputeResource, GenerationResource, MLflowResource, StorageResource
from pipelines.taskio import load_rows, load_task
from pipelines.tracking import log_metrics, log_table, stage_run
from shapegrpo_core import policy
from shapegrpo_core.evaluation import count_duplicates, score_responses


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
        max_new_tokens=config.max_new_tokens,
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
    description="The task's game for every candidate set: set utility R = U(all), u0 = U(empty) and each "
    "candidate's own utility U({i}). One row per candidate (a response with no candidate gets one row, "
    "index -1).",
)
def candidate_utilities(
    context: dg.AssetExecutionContext,
    task_dataset: dict[str, Any],
    candidate_sets: pd.DataFrame,
    mlflow: MLflowResource,
    storage: StorageResource,
) -> dg.Output[pd.DataFrame]:
    task = load_task(task_dataset)
    examples = load_rows(task_dataset, "train", limit=int(candidate_sets["prompt_index"].max()) + 1)
    # The trainer's scorer, one task.games call for the batch: a response whose scoring fails is a recorded
    # NaN set utility, not a crash (docs/method.md, "Advantages").
    scores = score_responses(
        task,
        list(candidate_sets["completion"]),
        [examples[int(i)] for i in candidate_sets["prompt_index"]],
        scorer_errors="nan",
    )
    records = []
    for (_, resp), score in zip(candidate_sets.iterrows(), scores, strict=True):
        base = {
            "prompt_index": int(resp["prompt_index"]),
            "generation": int(resp["generation"]),
            "num_scored": score.num_scored if score else 0,
            "set_utility": score.set_utility if score else float("nan"),
            "u0": score.u0 if score else float("nan"),
        }
        if score is None or not score.candidates:
            records.append(base | {"candidate_index": -1, "candidate": "", "candidate_utility": base["u0"]})
            continue
        for i, (cand, u) in enumerate(zip(score.candidates, score.singleton_utilities, strict=True)):
            records.append(
                base | {"candidate_index": i, "candidate": cand.text, "candidate_utility": float(u)}
            )
    df = pd.DataFrame.from_records(records)
    per_set = df.drop_duplicates(["prompt_index", "generation"])
    stats = {
        "num_candidates": int((df["candidate_index"] >= 0).sum()),
        "num_sets": len(per_set),
        "mean_set_utility": float(per_set["set_utility"].mean()),
        "mean_candidate_utility": float(df.loc[df["candidate_index"] >= 0, "candidate_utility"].mean()),
        "num_nan_sets": int(per_set["set_utility"].isna().sum()),
    }
    with stage_run(mlflow, context, "utilities") as rid:
        log_metrics(mlflow, rid, stats)
        log_table(mlflow, rid, df, "candidate_utilities", storage.run_dir(context, "candidate_utilities"))
    return dg.Output(
        df, metadata={**stats, "dagster/row_count": len(df), "mlflow_run_id": rid, "preview": md_preview(df)}
    )
