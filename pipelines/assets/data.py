"""Data domain: the task's dataset splits."""

from typing import Any

import dagster as dg
import pandas as pd

from pipelines.config import TaskDatasetConfig
from pipelines.reporting import md_preview
from pipelines.resources import MLflowResource, StorageResource
from pipelines.tracking import log_metrics, stage_run
from shapegrpo_core.tasks import get_task

SPLITS = ("train", "eval")


@dg.asset(
    group_name="data",
    kinds={"python", "parquet"},
    description="Train and eval splits of the task (prompts + the columns its game scores with), as parquet.",
)
def task_dataset(
    context: dg.AssetExecutionContext,
    config: TaskDatasetConfig,
    storage: StorageResource,
    mlflow: MLflowResource,
) -> dg.Output[dict[str, Any]]:
    task_kwargs = {"num_candidates": config.num_candidates, **config.task_options}
    task = get_task(config.task, **task_kwargs)
    out_dir = storage.run_dir(context, "task_dataset")
    splits, num_rows, previews = {}, {}, {}
    for split in SPLITS:
        dataset = task.build_dataset(split, config.seed)
        path = out_dir / f"{split}.parquet"
        dataset.to_parquet(str(path))
        splits[split], num_rows[split] = str(path), len(dataset)
        previews[split] = dataset.select(range(min(5, len(dataset)))).to_pandas()
    if min(num_rows.values()) == 0:
        raise ValueError(f"task {config.task!r} built an empty split: {num_rows}")

    vocab_size = len(task.vocabulary())
    with stage_run(
        mlflow, context, "data", params={"task": config.task, **task_kwargs, "seed": config.seed}
    ) as rid:
        log_metrics(
            mlflow, rid, {f"num_{s}_rows": n for s, n in num_rows.items()} | {"vocabulary_size": vocab_size}
        )

    manifest = {
        "task": config.task,
        "task_kwargs": task_kwargs,
        "num_candidates": task.num_candidates,
        "seed": config.seed,
        "splits": splits,
        "num_rows": num_rows,
        "mlflow_run_id": rid,
    }
    preview: pd.DataFrame = previews["train"]
    return dg.Output(
        manifest,
        metadata={
            "task": config.task,
            "num_candidates": task.num_candidates,
            "num_train_rows": num_rows["train"],
            "num_eval_rows": num_rows["eval"],
            "dagster/row_count": num_rows["train"] + num_rows["eval"],
            "vocabulary_size": vocab_size,
            "train_path": dg.MetadataValue.path(splits["train"]),
            "mlflow_run_id": rid,
            "preview": md_preview(preview),
        },
    )
