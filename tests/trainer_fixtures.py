"""Helpers for the trainer, resume and evaluation tests: a tiny recsys task, a tiny warm-started policy (built
offline once per test session and cached on disk), a random-init policy (emits garbage) and a small config."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import torch

from shapegrpo_core.policy import build_tiny_model, build_tokenizer, warm_start
from shapegrpo_core.tasks.recsys import RecsysTask
from shapegrpo_core.trainer import ShapEGRPOConfig

# Small model, short completions: a train step takes ~0.2 s on one CPU thread.
TINY_MODEL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}


def tiny_task(game: str = "best_of_set") -> RecsysTask:
    return RecsysTask(num_items=40, num_genres=6, num_train_users=64, num_eval_users=16, game=game, seed=0)


@functools.cache
def tiny_warm_start(game: str = "best_of_set") -> Path:
    """A 40-step SFT warm start (~5 s): mostly well-formed completions, some malformed, rewards that vary."""
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="shapegrpo-ws-")) / "policy"
    return warm_start(
        tiny_task(game),
        out,
        num_demos=400,
        max_steps=40,
        batch_size=16,
        learning_rate=1e-2,
        seed=0,
        **TINY_MODEL,
    )


def random_policy(task: RecsysTask, seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer): a random-init tiny LM; its completions are garbage (few or no valid candidates)."""
    tokenizer = build_tokenizer(task)
    return build_tiny_model(tokenizer, seed=seed, **TINY_MODEL), tokenizer


def tiny_settings(output_dir: str | Path, **overrides: Any) -> dict[str, Any]:
    """GRPOConfig keyword arguments for a 2-step CPU run (2 prompts x 4 generations, 12-token completions)."""
    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 12,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    settings.update(overrides)
    return settings


def tiny_config(output_dir: str | Path, **overrides: Any) -> ShapEGRPOConfig:
    return ShapEGRPOConfig(**tiny_settings(output_dir, **overrides))
