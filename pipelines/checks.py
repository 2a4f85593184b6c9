"""Asset checks guarding the hand-offs (docs/pipeline.md, "Data checks").

The blocking checks test the *data* and stop everything downstream of it when training or comparing on it
would be wasted: an eval split too small to tell methods apart, a base policy whose responses rarely hold K
valid candidates, a scorer that fails on many responses, rollouts whose groups all tie (no GRPO signal). Their
thresholds are the ``data_quality`` resource's settings (:class:`DataQualityResource`, defaults below; the
smoke profiles relax them, since their tiny policies produce such data on purpose).

``check_efficiency`` and ``check_advantages_finite`` hold by construction of the credit code (a failure would
be a bug in ``shapegrpo_core``, tested there), so they only warn. Checks on the method-partitioned
``policy_evaluation`` (eval sample size, eval utility finite, not worse than base) are emitted by that asset
itself (``check_specs``), because one run may cover several partitions.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from shapegrpo_core.credit import ALLOCATIONS

EFFICIENCY_TOL = 1e-6

# Defaults of DataQualityResource, each with why.
# The SFT warm start teaches the format; the default one gives ~83% format-valid rollouts. Below 20% the
# warm start failed: most sets are not K candidates, so the methods differ mostly in how they treat garbage.
MIN_FORMAT_VALID_RATE = 0.2
# A failed scorer is a recorded NaN (advantage 0). A real scorer almost never fails; above 10% of responses a
# systematic problem (data that does not match the task, a broken scorer) is the likely cause, and training
# would learn from a biased remainder.
MAX_SCORER_FAILURE_RATE = 0.1
# A group whose G set utilities are all equal gives GRPO zero advantage. Above 90% of groups tied, GRPO (the
# baseline of the comparison) learns from almost nothing.
MAX_TIED_GROUP_RATE = 0.9
# Independent eval units are prompts (samples of one prompt are correlated). Below 6 no paired test at the
# 95% level can reject a tie (the exact two-sided Wilcoxon signed-rank test needs n >= 6).
MIN_EVAL_PROMPTS = 6


class DataQualityResource(dg.ConfigurableResource):
    """Thresholds of the blocking data checks (``resources.data_quality.config`` in a run config)."""

    min_format_valid_rate: float = Field(
        default=MIN_FORMAT_VALID_RATE,
        ge=0,
        le=1,
        description="Least share of the base policy's rollouts that are format-valid (exactly K distinct "
        "candidates).",
    )
    max_scorer_failure_rate: float = Field(
        default=MAX_SCORER_FAILURE_RATE,
        ge=0,
        le=1,
        description="Largest share of rollouts whose scorer failed (NaN set utility).",
    )
    max_tied_group_rate: float = Field(
        default=MAX_TIED_GROUP_RATE,
        ge=0,
        le=1,
        description="Largest share of prompt groups whose set utilities are all equal (no GRPO signal).",
    )
    min_eval_prompts: int = Field(
        default=MIN_EVAL_PROMPTS,
        ge=1,
        description="Least number of eval prompts: in the eval split, and scored (finite) for every policy.",
    )


# ------------------------------------------------------------------------------------------ measures


def scorer_failure_rate(scores: pd.DataFrame) -> float:
    """Share of responses whose set utility is NaN (the scorer failed)."""
    return float(scores["set_utility"].isna().mean()) if len(scores) else float("nan")


def tied_group_rate(scores: pd.DataFrame) -> float:
    """Share of prompt groups whose finite set utilities (the task's score, before any format penalty) are
    all equal, among groups with a finite one; the trainer's ``tied_group_rate`` rule on the utility."""
    finite = scores[np.isfinite(scores["set_utility"].to_numpy(dtype=float))]
    if finite.empty:
        return float("nan")
    spread = finite.groupby("prompt_index")["set_utility"].agg(lambda u: float(np.ptp(u.to_numpy())))
    return float((spread == 0).mean())


# ------------------------------------------------------------------------------------------ blocking


@dg.asset_check(
    asset="task_dataset",
    blocking=True,
    description="The eval split has at least data_quality.min_eval_prompts prompts (default 6): fewer cannot "
    "tell methods apart, so training them would be wasted.",
)
def check_eval_split_size(
    task_dataset: dict[str, Any], data_quality: DataQualityResource
) -> dg.AssetCheckResult:
    rows = int(task_dataset["num_rows"]["eval"])
    return dg.AssetCheckResult(
        passed=rows >= data_quality.min_eval_prompts,
        metadata={"num_eval_prompts": rows, "min_eval_prompts": data_quality.min_eval_prompts},
    )


@dg.asset_check(
    asset="candidate_sets",
    blocking=True,
    description="At least data_quality.min_format_valid_rate (default 20%) of the base policy's rollouts are "
    "format-valid; below it the warm start failed and candidate credit has little to work on.",
)
def check_format_valid_rate(
    candidate_sets: pd.DataFrame, data_quality: DataQualityResource
) -> dg.AssetCheckResult:
    rate = float(candidate_sets["format_valid"].mean()) if len(candidate_sets) else float("nan")
    return dg.AssetCheckResult(
        passed=bool(rate >= data_quality.min_format_valid_rate),  # NaN (no rollout) fails
        metadata={
            "format_valid_rate": rate,
            "min_format_valid_rate": data_quality.min_format_valid_rate,
            "responses_with_candidates": int((candidate_sets["num_scored"] > 0).sum()),
            "num_responses": len(candidate_sets),
        },
    )


@dg.asset_check(
    asset="rollout_scores",
    blocking=True,
    description="At most data_quality.max_scorer_failure_rate (default 10%) of rollouts have a failed "
    "scorer (NaN set utility).",
)
def check_scorer_failure_rate(
    rollout_scores: pd.DataFrame, data_quality: DataQualityResource
) -> dg.AssetCheckResult:
    rate = scorer_failure_rate(rollout_scores)
    return dg.AssetCheckResult(
        passed=bool(rate <= data_quality.max_scorer_failure_rate),
        metadata={
            "scorer_failure_rate": rate,
            "max_scorer_failure_rate": data_quality.max_scorer_failure_rate,
            "num_nan_sets": int(rollout_scores["set_utility"].isna().sum()),
            "num_sets": len(rollout_scores),
        },
    )


@dg.asset_check(
    asset="rollout_scores",
    blocking=True,
    description="At most data_quality.max_tied_group_rate (default 90%) of prompt groups have all-equal set "
    "utilities (no GRPO signal).",
)
def check_tied_group_rate(
    rollout_scores: pd.DataFrame, data_quality: DataQualityResource
) -> dg.AssetCheckResult:
    rate = tied_group_rate(rollout_scores)
    return dg.AssetCheckResult(
        passed=bool(rate <= data_quality.max_tied_group_rate),  # NaN (nothing scored) fails
        metadata={
            "tied_group_rate": rate,
            "max_tied_group_rate": data_quality.max_tied_group_rate,
            "num_groups": int(rollout_scores["prompt_index"].nunique()),
        },
    )


# ------------------------------------------------------------------------------------------ invariants


@dg.asset_check(
    asset="shapley_credits",
    description="Invariant of the credit code (warning): in every scored set, sum_i phi_i = R - u0 within "
    "1e-6 (Shapley and LOO credit).",
)
def check_efficiency(shapley_credits: pd.DataFrame) -> dg.AssetCheckResult:
    sets = shapley_credits.groupby(["prompt_index", "generation"]).agg(
        phi=("phi", "sum"), phi_loo=("phi_loo", "sum"), set_reward=("set_reward", "first"), u0=("u0", "first")
    )
    scored = sets[np.isfinite(sets["set_reward"])]
    gain = scored["set_reward"] - scored["u0"]
    err = np.abs(scored[["phi", "phi_loo"]].to_numpy() - gain.to_numpy()[:, None])  # (sets, 2)
    worst = float(np.max(err, initial=0.0))
    violations = int((err > EFFICIENCY_TOL).any(axis=1).sum())
    return dg.AssetCheckResult(
        passed=bool(violations == 0 and np.isfinite(worst)),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "num_sets": len(sets),
            "num_scored_sets": len(scored),
            "num_violations": violations,
            "max_abs_error": worst,
            "tolerance": EFFICIENCY_TOL,
        },
    )


@dg.asset_check(
    asset="shapley_credits",
    description="Invariant of the credit code (warning): no NaN or infinite advantage under any allocation "
    "(a failed scorer gives a recorded 0).",
)
def check_advantages_finite(shapley_credits: pd.DataFrame) -> dg.AssetCheckResult:
    columns = [f"{kind}_{a}" for a in ALLOCATIONS for kind in ("advantage", "set_advantage")]
    missing = [c for c in columns if c not in shapley_credits]
    bad = {
        c: int((~np.isfinite(shapley_credits[c].to_numpy(dtype=float))).sum())
        for c in columns
        if c not in missing
    }
    return dg.AssetCheckResult(
        passed=bool(not missing and sum(bad.values()) == 0),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"non_finite": bad, "missing_columns": missing, "num_rows": len(shapley_credits)},
    )


all_checks = [
    check_eval_split_size,
    check_format_valid_rate,
    check_scorer_failure_rate,
    check_tied_group_rate,
    check_efficiency,
    check_advantages_finite,
]
