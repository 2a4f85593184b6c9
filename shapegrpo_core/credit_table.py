"""The credit table: one row per candidate of a batch of scored responses, with its Shapley value, its
efficient leave-one-out credit, and its candidate reward rho and group-relative advantage under each
allocation (docs/method.md). On rollouts of one policy it shows what GRPO (uniform), ShapE-GRPO (shapley) and
the LOO ablation would pay each candidate, e.g. that GRPO pays a free rider (phi = 0 in a set worth more
than u0) the full set reward.

    scores = score_responses(task, completions, examples)            # N = P * G responses, groups contiguous
    table = credit_table(scores, group_ids, format_penalty=0.1)
    free_rider_stats(table)  # {"free_rider_rate": ..., "free_rider_grpo_reward": ..., ...}

The credit is :class:`~shapegrpo_core.batch_credit.BatchCredit`, the object the trainer uses; this module only
lays several allocations side by side, so the table applies exactly the formulas the trainer applies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from shapegrpo_core.batch_credit import NO_CANDIDATE, BatchCredit
from shapegrpo_core.credit import ALLOCATIONS, FREE_RIDER_TOL, TRL_EPSILON
from shapegrpo_core.evaluation import ResponseScore
from shapegrpo_core.shapley import DEFAULT_NUM_PERMUTATIONS


def _group_size(group_ids: np.ndarray) -> int:
    """G, checking that rows come in contiguous groups of G (the layout group_advantages expects)."""
    n = len(group_ids)
    starts = np.flatnonzero(np.r_[True, group_ids[1:] != group_ids[:-1]])  # first row of each block
    sizes = np.diff(np.r_[starts, n])
    if len(set(group_ids.tolist())) != len(starts):
        raise ValueError("group_ids must be contiguous: all responses of a group next to each other")
    if len(set(sizes.tolist())) != 1:
        raise ValueError(f"every group needs the same number of responses G, got sizes {sorted(set(sizes))}")
    return int(sizes[0])


def credit_table(
    scores: Sequence[ResponseScore | None],
    group_ids: Sequence[int],
    generations: Sequence[int] | None = None,
    *,
    allocations: Sequence[str] = ALLOCATIONS,
    lam: float = 1.0,
    scale_rewards: str = "group",
    engine: str = "auto",
    seed: int = 0,
    num_permutations: int = DEFAULT_NUM_PERMUTATIONS,
    format_penalty: float = 0.0,
    eps: float = TRL_EPSILON,
) -> pd.DataFrame:
    """Per-candidate credit of N scored responses (None = a failed scorer: NaN set reward, advantage 0).

    ``group_ids[n]`` is the prompt of response n (column ``prompt_index``); groups must be contiguous and of
    equal size G. ``generations[n]`` (column ``generation``) defaults to the position within the group.
    ``format_penalty`` is subtracted from a format-invalid response's game, as in training
    (``ShapEGRPOConfig.format_penalty``): set reward, u0 and every rho drop by it; phi is shift-invariant.

    Columns: prompt_index, generation, num_scored, format_valid, set_utility (R, unpenalised), set_reward
    (R − penalty), u0 (penalised like set_reward), shapley_engine, candidate_index, candidate,
    candidate_utility (U({i}), unpenalised), phi (Shapley), phi_loo (efficient LOO), and per allocation a:
    rho_a, advantage_a, set_advantage_a.
    A response without candidates is one pseudo-candidate row (index -1, phi 0, rho = R, advantage = the set
    advantage, utility U(empty)), as group_advantages treats it (docs/method.md).
    """
    groups = np.asarray(group_ids)
    n = len(scores)
    if groups.shape != (n,):
        raise ValueError(f"group_ids must have one entry per response ({n}), got shape {groups.shape}")
    if n == 0:
        raise ValueError("credit_table needs at least one response")
    unknown = [a for a in allocations if a not in ALLOCATIONS]
    if unknown or not allocations:
        raise ValueError(f"allocations must be a non-empty subset of {ALLOCATIONS}, got {list(allocations)}")
    if not (np.isfinite(format_penalty) and format_penalty >= 0.0):
        raise ValueError(f"format_penalty must be finite and >= 0, got {format_penalty}")
    gens = np.asarray(generations) if generations is not None else None
    num_generations = _group_size(groups)
    if gens is None:
        gens = np.tile(np.arange(num_generations), n // num_generations)
    elif gens.shape != (n,):
        raise ValueError(f"generations must have one entry per response ({n}), got shape {gens.shape}")

    # One BatchCredit per allocation; phi (Shapley) and phi_loo are always reported.
    def batch(allocation: str) -> BatchCredit:
        return BatchCredit.compute(
            scores,
            num_generations,
            allocation=allocation,
            lam=lam,
            scale_rewards=scale_rewards,
            eps=eps,
            format_penalty=format_penalty,
            engine=engine,
            seed=seed,
            num_permutations=num_permutations,
        )

    tables = {a: batch(a).table(groups, gens) for a in dict.fromkeys([*allocations, "loo"])}
    keys = ["prompt_index", "generation", "candidate_index"]
    first = tables[allocations[0]]
    out = first.drop(columns=["rho", "advantage", "set_advantage", f"phi_{allocations[0]}"])
    out["phi_loo"] = tables["loo"]["phi_loo"].to_numpy()
    for a in allocations:
        t = tables[a]
        if not t[keys].equals(first[keys]):
            raise RuntimeError(
                "credit tables of two allocations do not line up"
            )  # same slots by construction
        out[f"rho_{a}"] = t["rho"].to_numpy()
        out[f"advantage_{a}"] = t["advantage"].to_numpy()
        out[f"set_advantage_{a}"] = t["set_advantage"].to_numpy()
    return out


def free_rider_stats(table: pd.DataFrame, tol: float = FREE_RIDER_TOL) -> dict[str, float]:
    """Summary of a :func:`credit_table`: sizes; the free-rider rate (the share of candidates of sets with
    R > u0 + tol whose phi <= tol, as the trainer's ``shapegrpo/free_rider_rate``); the mean reward and
    advantage free riders get under each allocation in the table; the share of groups whose set rewards are
    all equal (no GRPO signal); and the mean |advantage| per allocation."""
    allocations = [a for a in ALLOCATIONS if f"advantage_{a}" in table]
    nan = float("nan")  # a mean over no free rider is undefined, not 0
    keys = ["prompt_index", "generation"]
    per_set = table.drop_duplicates(keys)
    real = table[table["candidate_index"] != NO_CANDIDATE]
    # The trainer's shapegrpo/free_rider_rate: among candidates of sets worth more than showing nothing.
    valuable = real[real["set_reward"] > real["u0"] + tol]
    free = valuable[valuable["phi"] <= tol]
    stats: dict[str, float] = {
        "num_sets": len(per_set),
        "num_nan_sets": int(per_set["set_reward"].isna().sum()),
        "num_candidates": len(real),
        "num_generations": int(per_set.groupby("prompt_index").size().iloc[0]) if len(per_set) else 0,
        "free_rider_rate": float(len(free) / len(valuable)) if len(valuable) else nan,
        "tied_group_rate": float(per_set.groupby("prompt_index")["set_reward"].nunique().eq(1).mean()),
    }
    names = {"uniform": "grpo"}  # the method that trains with the allocation
    for a in allocations:
        name = names.get(a, a)
        stats[f"free_rider_{name}_reward"] = float(free[f"rho_{a}"].mean()) if len(free) else nan
        stats[f"free_rider_{name}_advantage"] = float(free[f"advantage_{a}"].mean()) if len(free) else nan
        stats[f"mean_abs_advantage_{a}"] = float(real[f"advantage_{a}"].abs().mean())
    return stats
