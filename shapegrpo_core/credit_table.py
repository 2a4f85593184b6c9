"""The credit table: one row per candidate of a batch of scored responses, with its Shapley value, its
efficient leave-one-out credit, and its candidate reward rho and group-relative advantage under each
allocation (DESIGN.md §2). On rollouts of one policy it shows what GRPO (uniform), ShapE-GRPO (shapley) and
the LOO ablation would pay each candidate, e.g. that GRPO pays a free rider (phi = 0 in a set worth more
than u0) the full set reward.

    scores = score_responses(task, completions, examples)            # N = P * G responses, groups contiguous
    table = credit_table(scores, group_ids, format_penalty=0.1)
    free_rider_stats(table)  # {"free_rider_rate": ..., "free_rider_grpo_reward": ..., ...}

The math lives in :mod:`shapegrpo_core.credit` (``allocate_credit``, ``group_advantages``); this module only
lays its results out per candidate, so the table applies the formulas the trainer applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from shapegrpo_core.credit import (
    ALLOCATIONS,
    FREE_RIDER_TOL,
    TRL_EPSILON,
    SetCredit,
    allocate_credit,
    group_advantages,
)
from shapegrpo_core.evaluation import ResponseScore
from shapegrpo_core.shapley import DEFAULT_NUM_PERMUTATIONS

NO_CANDIDATE = -1  # candidate_index of the pseudo-candidate row of a response without candidates


def _padded(values: Sequence[np.ndarray], width: int, fill: float) -> np.ndarray:
    out = np.full((len(values), width), fill)  # (N, K)
    for row, v in enumerate(values):
        out[row, : len(v)] = v
    return out


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
    advantage, utility U(empty)), as group_advantages treats it (DESIGN §2).
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

    live = [i for i, s in enumerate(scores) if s is not None]
    games = [scores[i].game for i in live]  # type: ignore[union-attr]
    k_g = np.array([s.num_scored if s is not None else 0 for s in scores])  # (N,)
    width = max(1, int(k_g.max()))
    mask = np.arange(width)[None, :] < k_g[:, None]  # (N, K)
    valid = np.array([s.format_valid if s is not None else True for s in scores])  # (N,)
    penalty = format_penalty * ~valid  # (N,) a constant shift of the game (the trainer's convention)
    utility = np.full(n, np.nan)  # (N,) unpenalised R, NaN for a failed scorer
    utility[live] = [scores[i].set_utility for i in live]  # type: ignore[union-attr]

    def per_response(allocation: str) -> list[SetCredit | None]:
        credit = allocate_credit(
            games, allocation, lam, engine=engine, seed=seed, num_permutations=num_permutations
        )
        out: list[SetCredit | None] = [None] * n
        for i, c in zip(live, credit, strict=True):
            out[i] = c
        return out

    # phi (Shapley) and phi_loo are always reported; rho and advantages only for the requested allocations.
    credits = {a: per_response(a) for a in dict.fromkeys([*allocations, "shapley", "loo"])}
    empty = np.zeros(0)
    u0 = np.array([c.u0 if c else np.nan for c in credits["shapley"]])  # (N,) unpenalised U(empty)
    reward = utility - penalty  # (N,)
    phi = {a: _padded([c.phi if c else empty for c in credits[a]], width, 0.0) for a in ("shapley", "loo")}
    rho, adv = {}, {}
    for a in allocations:
        rho[a] = _padded([c.rho if c else empty for c in credits[a]], width, np.nan) - penalty[:, None]
        rho[a][~mask] = np.nan  # (N, K)
        adv[a] = group_advantages(rho[a], mask, reward, num_generations, scale_rewards=scale_rewards, eps=eps)

    records: list[dict[str, Any]] = []
    for row in range(n):
        k = int(k_g[row])
        score = scores[row]
        cands = score.candidates if score is not None else ()
        singles = score.singleton_utilities if score is not None else empty
        base = {
            "prompt_index": groups[row].item(),
            "generation": gens[row].item(),
            "num_scored": k,
            "format_valid": bool(valid[row]),
            "set_utility": float(utility[row]),
            "set_reward": float(reward[row]),
            "u0": float(u0[row] - penalty[row]),
            "shapley_engine": credits["shapley"][row].engine if score is not None else "",
        }
        for i in range(k) if k else [NO_CANDIDATE]:
            real = i != NO_CANDIDATE
            rec = base | {
                "candidate_index": i,
                "candidate": cands[i].text if real else "",
                "candidate_utility": float(singles[i]) if real else float(u0[row]),
                "phi": float(phi["shapley"][row, i]) if real else 0.0,
                "phi_loo": float(phi["loo"][row, i]) if real else 0.0,
            }
            for a in allocations:
                rec[f"rho_{a}"] = float(rho[a][row, i]) if real else base["set_reward"]
                rec[f"advantage_{a}"] = float(adv[a].candidate[row, i] if real else adv[a].set[row])
                rec[f"set_advantage_{a}"] = float(adv[a].set[row])
            records.append(rec)
    return pd.DataFrame.from_records(records)


def free_rider_stats(table: pd.DataFrame, tol: float = FREE_RIDER_TOL) -> dict[str, float]:
    """Summary of a :func:`credit_table`: sizes; the free-rider rate (the share of candidates of sets with
    R > u0 + tol whose phi <= tol, as the trainer's ``shapegrpo/free_rider_rate``); the mean reward and
    advantage free riders get under each allocation in the table; the share of groups whose set rewards are
    all equal (no GRPO signal); and the mean |advantage| per allocation."""
    allocations = [a for a in ALLOCATIONS if f"advantage_{a}" in table]
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
        "free_rider_rate": float(len(free) / len(valuable)) if len(valuable) else float("nan"),
        "tied_group_rate": float(per_set.groupby("prompt_index")["set_reward"].nunique().eq(1).mean()),
    }
    names = {"uniform": "grpo"}  # the method that trains with the allocation
    for a in allocations:
        name = names.get(a, a)
        stats[f"free_rider_{name}_reward"] = float(free[f"rho_{a}"].mean()) if len(free) else 0.0
        stats[f"free_rider_{name}_advantage"] = float(free[f"advantage_{a}"].mean()) if len(free) else 0.0
        stats[f"mean_abs_advantage_{a}"] = float(real[f"advantage_{a}"].abs().mean())
    return stats
