"""Run settings of the assets (``dg.Config``): set them in the launchpad, a ``-c run_config.yaml`` file or a
schedule/sensor. Each asset reads only its own settings; task identity (name, K, constructor options, data
seed) travels downstream in the ``task_dataset`` manifest so that every stage scores with the same task.

The defaults are the embedded CPU default (recsys, tiny policy), with the budget and learning rate of
``benchmarks/convergence.py`` (100 steps, G = 8, 4 prompts per step, lr 1e-3, a 64-wide 2-layer policy), sized
to finish ``compare_methods`` within 15 minutes on 2 cores; ``configs/smoke.yaml`` shrinks everything further.
"""

from __future__ import annotations

from typing import Any, Literal

import dagster as dg
from pydantic import Field

# Set-reward penalty of a format-invalid response (ShapEGRPOConfig.format_penalty); shared by the training
# budget and the credits table so the table shows the credit training would assign.
DEFAULT_FORMAT_PENALTY = 0.1
# Credit allocation each method trains with (shapegrpo_core.credit.ALLOCATIONS); the same table as
# shapegrpo_core.training.METHODS (a test keeps them equal) without importing torch at definition load.
METHOD_ALLOCATION = {"grpo": "uniform", "shapegrpo": "shapley", "loo": "loo", "wta": "wta"}
METHODS = tuple(METHOD_ALLOCATION)
ScaleRewards = Literal["group", "batch", "none"]


class TaskDatasetConfig(dg.Config):
    """Which task to build and how: the task name, K and the task's own constructor options."""

    task: str = Field(default="recsys", description="Task name in shapegrpo_core.tasks.TASKS.")
    num_candidates: int = Field(default=4, ge=1, description="K, candidates per response.")
    task_options: dict[str, Any] = Field(
        default_factory=lambda: {"preset": "interests"},
        description="Other keyword arguments of the task constructor (e.g. recsys: preset, num_items, game, "
        "num_train_users, movielens_path). The default is the recsys world where the prompt decides "
        "(docs/tasks.md, 'Presets').",
    )
    seed: int = Field(default=0, description="Row order of the dataset splits.")


class BasePolicyConfig(dg.Config):
    """The starting policy: a local Hugging Face checkpoint, or the offline tiny model + SFT warm start."""

    model_path: str | None = Field(
        default=None,
        description="A local HF checkpoint dir, the alias 'smollm2-135m-instruct' (prepared offline on first "
        "use) or a Hub id (only if the hub is reachable); None = warm start.",
    )
    num_demos: int = Field(default=3000, ge=1, description="Warm-start demonstrations.")
    epochs: float = Field(
        default=2.0, gt=0, description="Warm-start SFT epochs (ignored when max_steps > 0)."
    )
    max_steps: int = Field(default=-1, ge=-1, description="Warm-start SFT steps; -1 = use epochs.")
    batch_size: int = Field(default=32, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0)
    hidden_size: int = Field(default=64, ge=1)
    num_layers: int = Field(default=2, ge=1)
    num_heads: int = Field(default=2, ge=1)
    seed: int = 0
    register_model: bool = Field(
        default=True, description="Log with the transformers flavour and register in MLflow."
    )


class RolloutConfig(dg.Config):
    """Rollouts of the base policy used to inspect credit before training: prompts x G responses."""

    num_prompts: int = Field(default=32, ge=1, description="Training prompts to roll out.")
    num_generations: int = Field(default=8, ge=2, description="G, responses per prompt.")
    max_new_tokens: int | None = Field(
        default=None, ge=1, description="Completion length cap; None = the base policy's (as in training)."
    )
    temperature: float = Field(default=1.0, gt=0)
    seed: int = 0


class CreditConfig(dg.Config):
    """How candidate credit is computed for the credits table."""

    lam: float = Field(
        default=1.0, ge=0, le=1, description="Mix lambda: 0 = GRPO credit, 1 = pure Shapley/LOO credit."
    )
    engine: Literal["auto", "closed_form", "exact", "monte_carlo"] = Field(
        default="auto", description="Shapley engine: auto, closed_form, exact, monte_carlo."
    )
    scale_rewards: ScaleRewards = Field(
        default="group", description="Advantage scaling: group, batch or none."
    )
    format_penalty: float = Field(
        default=DEFAULT_FORMAT_PENALTY,
        ge=0,
        description="Set-reward penalty for a format-invalid response, as in training (keep it equal to "
        "fine_tuned_policy's format_penalty); 0 shows the unpenalised credit.",
    )
    free_rider_tol: float = Field(
        default=1e-9, description="A candidate with phi <= tol in a set with R > u0 is a free rider."
    )
    seed: int = 0


class TrainConfig(dg.Config):
    """Fine-tuning budget, identical for every method partition (same warm start, seed and budget).

    Fields map onto ``shapegrpo_core.training.train_policy``; ``training_options`` passes any other
    ShapEGRPOConfig/GRPOConfig field (e.g. ``per_device_train_batch_size``, ``shapley_engine``, ``bf16``).
    """

    max_steps: int = Field(default=100, ge=1, description="Optimizer steps per method.")
    num_generations: int = Field(default=8, ge=2, description="G, responses per prompt in a GRPO group.")
    prompts_per_step: int = Field(
        default=4, ge=1, description="Prompts per optimizer step (x G completions)."
    )
    lam: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Credit mix lambda; None = the method's own (grpo 0, shapegrpo/loo 1).",
    )
    learning_rate: float = Field(
        default=1e-3, gt=0, description="Tuned on GRPO/recsys in benchmarks/convergence."
    )
    max_completion_length: int | None = Field(
        default=None,
        ge=1,
        description="Completion cap; None = the base policy's generation_config.max_new_tokens.",
    )
    temperature: float = Field(default=1.0, gt=0)
    beta: float = Field(default=0.0, ge=0, description="KL coefficient.")
    scale_rewards: ScaleRewards = Field(
        default="group", description="Advantage scaling: group, batch or none."
    )
    format_penalty: float = Field(
        default=DEFAULT_FORMAT_PENALTY,
        ge=0,
        description="Set-reward penalty for a response that is not format-valid (not exactly K distinct "
        "candidates), the same for every method; without it extra candidates cost nothing and policies drift "
        "into emitting more than K.",
    )
    save_steps: int | None = Field(
        default=None, ge=1, description="Checkpoint interval (resume after a crash)."
    )
    eval_every: int | None = Field(
        default=20, ge=1, description="Held-out evaluation every N steps (learning curves); None = off."
    )
    eval_num_prompts: int = Field(
        default=64, ge=1, description="Held-out prompts of each in-training evaluation."
    )
    eval_num_samples: int = Field(
        default=4,
        ge=1,
        description="Samples per held-out prompt at each in-training evaluation: 64 prompts x 4 samples "
        "give each held-out point an interval, drawn as the curve band in the comparison plot.",
    )
    logging_steps: int = Field(default=1, ge=1)
    seed: int = 0
    training_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for shapegrpo_core.training.train_policy."
    )
    register_model: bool = Field(default=True, description="Log and register each fine-tuned policy.")


class EvalConfig(dg.Config):
    """Held-out evaluation, identical for every method and for the base policy."""

    num_prompts: int = Field(default=100, ge=1, description="Eval prompts (capped at the eval split size).")
    num_samples: int = Field(default=4, ge=1, description="Samples per prompt.")
    max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Completion length cap; None = the policy's generation_config.max_new_tokens, the cap "
        "training used by default.",
    )
    temperature: float = Field(default=1.0, gt=0)
    num_bootstrap: int = Field(default=1000, ge=100)
    seed: int = 0


class ComparisonConfig(dg.Config):
    """How the winner is chosen."""

    metric: str = Field(
        default="set_utility", description="Eval metric the champion is chosen by (higher wins)."
    )
    curve_metrics: list[str] = Field(
        default=["reward", "heldout/set_utility"],
        description="Training-run metrics plotted per step (TRL's mean set reward, held-out set utility).",
    )
    champion_alias: str = "champion"
    confidence: float = Field(
        default=0.95,
        gt=0.5,
        lt=1.0,
        description="Level of the paired bootstrap CI of the best method against each other method; the "
        "champion alias moves only when every such CI lies above 0 (else: no significant winner).",
    )
    seed: int = Field(default=0, description="Seed of the paired bootstrap.")
