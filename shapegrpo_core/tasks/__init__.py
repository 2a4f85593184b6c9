"""Task registry: ``get_task("recsys", num_candidates=4)`` builds a task by name (docs/tasks.md)."""

from __future__ import annotations

import importlib
from typing import Any

from shapegrpo_core.tasks.base import Task

# name -> "module:Class"; imported on demand so that a task's optional heavy imports (e.g. rouge-score,
# the HumanEval data file) cost nothing until the task is used.
TASKS: dict[str, str] = {
    "recsys": "shapegrpo_core.tasks.recsys:RecsysTask",
    "code": "shapegrpo_core.tasks.code:CodeTask",
    "summarize": "shapegrpo_core.tasks.summarize:SummarizeTask",
    "aclsum": "shapegrpo_core.tasks.aclsum:ACLSumTask",
    "recsys_nl": "shapegrpo_core.tasks.recsys_nl:NLRecsysTask",
}


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the task registered under ``name`` with its constructor keyword arguments. ``preset="..."``
    starts from one of the task's named settings (``recsys``: :data:`~shapegrpo_core.tasks.recsys.PRESETS`);
    the other arguments override it."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    module_name, cls_name = TASKS[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    preset = kwargs.pop("preset", None)
    if preset is None:
        return cls(**kwargs)
    if not hasattr(cls, "from_preset"):
        raise ValueError(f"task {name!r} has no presets (preset={preset!r})")
    return cls.from_preset(preset, **kwargs)


__all__ = ["TASKS", "Task", "get_task"]
