"""Asset checks guarding the hand-offs (docs/pipeline.md). Blocking checks stop downstream assets on failure.

Checks on the method-partitioned assets (eval utility finite, not worse than base) are emitted by
``policy_evaluation`` itself (``check_specs``), because one run may cover several partitions.
"""

import dagster as dg
import numpy as np
import pandas as pd

from shapegrpo_core.credit import ALLOCATIONS

EFFICIENCY_TOL = 1e-6


@dg.asset_check(
    asset="shapley_credits",
    blocking=True,
    description="Efficiency: in every scored set, sum_i phi_i = R - u0 within 1e-6 (Shapley and LOO credit).",
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
    blocking=True,
    description="No NaN or infinite advantage under any allocation (a failed scorer must give a recorded 0).",
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
        metadata={"non_finite": bad, "missing_columns": missing, "num_rows": len(shapley_credits)},
    )


@dg.asset_check(
    asset="candidate_sets",
    description="At least one rollout parsed into candidates (warning: an unparsable policy gives no credit "
    "signal, only set rewards).",
)
def check_candidates_parsed(candidate_sets: pd.DataFrame) -> dg.AssetCheckResult:
    parsed = int((candidate_sets["num_scored"] > 0).sum())
    return dg.AssetCheckResult(
        passed=bool(parsed > 0),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"responses_with_candidates": parsed, "num_responses": len(candidate_sets)},
    )


all_checks = [check_efficiency, check_advantages_finite, check_candidates_parsed]
