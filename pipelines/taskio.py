"""Rebuilding the task and reading its dataset splits from the ``task_dataset`` manifest.

The manifest is what ``task_dataset`` returns:
``{"task", "task_kwargs", "seed", "splits": {split: parquet path}, "num_rows": {...}}``. Every downstream
asset rebuilds the same task from it, so all stages score alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import datasets
import pyarrow.parquet as pq

from shapegrpo_core.tasks import Task, get_task


def load_task(manifest: Mapping[str, Any]) -> Task:
    return get_task(manifest["task"], **manifest["task_kwargs"])


def load_split(manifest: Mapping[str, Any], split: str) -> datasets.Dataset:
    """The split as an in-memory ``datasets.Dataset`` (no cache files), as ``task_dataset`` wrote it."""
    splits = manifest["splits"]
    if split not in splits:
        raise ValueError(f"task_dataset has splits {sorted(splits)}, not {split!r}")
    return datasets.Dataset(pq.read_table(splits[split]))


def load_rows(manifest: Mapping[str, Any], split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` rows of a split as plain Python dicts (lists stay lists), for ``task.game``."""
    table = pq.read_table(manifest["splits"][split])
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()
