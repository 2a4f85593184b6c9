"""Credit allocation and group-relative advantages (docs/method.md, "Credit allocation" and "Advantages").

Candidate reward with mix lambda ∈ [0, 1]:

    rho_{g,i} = (1 − lambda) · R_g + lambda · (u0_g + K_g · phi_{g,i})

Efficiency (sum_i phi_{g,i} = R_g − u0_g) makes mean_i rho_{g,i} = R_g for every lambda, so lambda only moves
credit inside a set. Allocations: "uniform" (rho = R: GRPO), "shapley" (phi = Shapley values), "loo" (phi =
leave-one-out marginals rescaled to be efficient — an ablation that is blind to redundancy), "wta"
(Winner-Takes-All, the paper's second baseline: the surplus R − u0 goes to the candidate(s) with the best
standalone utility U({i}), ties split equally, others 0 — efficient too).

Advantages per prompt group of G responses, each response weighted equally whatever its K_g:

    mu = (1/G) sum_g R_g
    sigma^2 = 1/(G−1) · sum_g mean_i (rho_{g,i} − mu)^2
    A_{g,i} = (rho_{g,i} − mu) / (sigma + eps)

At lambda = 0 this is TRL's GRPO advantage (``sum_then_normalize``: same nan-aware mean, Bessel std,
eps = 1e-4).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shapegrpo_core.games import CallableGame, ChoiceGame, Game, SumOfMaxGame
from shapegrpo_core.shapley import (
    DEFAULT_NUM_PERMUTATIONS,
    MAX_EXACT_PLAYERS,
    leave_one_out,
    resolve_engine,
    shapley_values,
)

# A candidate is a free rider when its Shapley credit is at most this in a set worth more than u0 + this.
FREE_RIDER_TOL = 1e-9
ALLOCATIONS = ("uniform", "shapley", "loo", "wta")
SCALE_REWARDS = ("group", "batch", "none")
TRL_EPSILON = 1e-4  # what TRL adds to the std in GRPOTrainer._generate_and_score_completions
# Tolerance of the efficiency check mean_i rho = R (relative to the scale of the rewards).
_EFFICIENCY_RTOL = 1e-6


def _check_allocation(allocation: str, lam: float) -> None:
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; choose one of {ALLOCATIONS}")
    if not (np.isfinite(lam) and 0.0 <= lam <= 1.0):
        raise ValueError(f"lam must be in [0, 1], got {lam}")


def efficient_loo(
    marginals: np.ndarray, set_reward: np.ndarray, u0: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """Leave-one-out marginals rescaled to sum to R − u0: m_i · (R − u0) / sum_j m_j; (N, K) in, (N, K) out.

    When sum_j m_j is 0 (relative to the marginals' size, e.g. two copies of the best candidate both have
    marginal 0) the set's gain is split equally among its present candidates. Absent candidates get 0.
    """
    m = np.where(mask, marginals, 0.0)  # (N, K)
    total = m.sum(axis=1)  # (N,)
    gain = set_reward - u0  # (N,)
    k_eff = mask.sum(axis=1)
    degenerate = np.abs(total) <= 1e-12 * np.maximum(1.0, np.abs(m).sum(axis=1))
    scale = np.divide(gain, total, out=np.zeros_like(gain), where=~degenerate)
    equal = np.divide(gain, k_eff, out=np.zeros_like(gain), where=k_eff > 0)
    return np.where(mask, np.where(degenerate[:, None], equal[:, None], m * scale[:, None]), 0.0)


def winner_takes_all(game: Game) -> np.ndarray:
    """Winner-Takes-All credit, (K,) or (B, K): R − u0 split equally among the present players whose
    standalone utility U({i}) is the highest (ties within 1e-12 relative); others and absent players get 0."""
    k = game.num_players
    if k == 0:
        return np.zeros((*game.batch_shape, 0))
    singles = np.asarray(game.value(np.eye(k, dtype=bool)), dtype=np.float64)  # (K,) or (B, K)
    mask = np.asarray(game.mask, dtype=bool)
    singles = np.where(mask, singles, -np.inf)
    best = singles.max(axis=-1, keepdims=True)  # (..., 1)
    winners = mask & (singles >= best - 1e-12 * np.maximum(1.0, np.abs(best)))
    surplus = np.asarray(game.grand_value, dtype=np.float64) - np.asarray(game.u0, dtype=np.float64)
    count = np.maximum(winners.sum(axis=-1), 1)
    return np.where(winners, (surplus / count)[..., None], 0.0)


def mix_credit(
    set_reward: np.ndarray, u0: np.ndarray, phi: np.ndarray, mask: np.ndarray, lam: float
) -> np.ndarray:
    """rho (N, S) = (1 − lam) R + lam (u0 + S_g phi), S_g = present slots of the row; NaN where masked.

    ``phi`` must already be efficient (sum over present slots = R − u0), so mean_i rho = R for every lam."""
    present = np.asarray(mask, dtype=bool)
    k_eff = present.sum(axis=1)  # (N,)
    r = np.asarray(set_reward, dtype=np.float64)[:, None]
    rho = (1.0 - lam) * r + lam * (np.asarray(u0, dtype=np.float64)[:, None] + k_eff[:, None] * phi)
    return np.where(present, rho, np.nan)


def candidate_rewards(
    set_reward: np.ndarray,
    u0: np.ndarray,
    phi: np.ndarray,
    mask: np.ndarray,
    allocation: str,
    lam: float,
) -> np.ndarray:
    """rho (N, K) from set rewards R (N,), empty-set values u0 (N,), credits phi (N, K) and the mask (N, K).

    ``phi`` holds Shapley values for "shapley", raw leave-one-out marginals for "loo" (rescaled here) and
    Winner-Takes-All credit for "wta"; it is ignored for "uniform" (rho = R). rho is NaN where masked and on
    rows whose set reward is NaN (a failed scorer).
    """
    _check_allocation(allocation, lam)
    r = np.asarray(set_reward, dtype=np.float64)
    base = np.asarray(u0, dtype=np.float64)
    credit = np.asarray(phi, dtype=np.float64)
    present = np.asarray(mask, dtype=bool)
    if r.ndim != 1 or base.shape != r.shape:
        raise ValueError(f"set_reward and u0 must both have shape (N,), got {r.shape} and {base.shape}")
    if credit.ndim != 2 or credit.shape[0] != r.shape[0] or present.shape != credit.shape:
        raise ValueError(
            f"phi and mask must have shape (N={r.shape[0]}, K), got {credit.shape} and {present.shape}"
        )
    if np.isinf(r).any() or not np.isfinite(base).all():
        raise ValueError("set_reward must be finite or NaN (a failed scorer), and u0 finite")
    scored = ~np.isnan(r)
    if allocation != "uniform" and not np.isfinite(credit[present & scored[:, None]]).all():
        raise ValueError("phi must be finite for present candidates of scored sets")
    if allocation == "uniform" or lam == 0.0:
        rho = np.where(present, r[:, None], np.nan)
    else:
        if allocation == "loo":
            credit = efficient_loo(credit, np.where(scored, r, base), base, present)
        rho = mix_credit(r, base, credit, present, lam)
    rho[~scored] = np.nan
    return rho


@dataclass(frozen=True, eq=False)
class GroupAdvantages:
    """Advantages of one batch.

    candidate (N, K): A_{g,i}, 0 where masked;
    set (N,): A_g = (R_g − mu)/(sigma + eps), for tokens outside any candidate;
    num_nan_sets: responses whose set reward was NaN (advantage 0);
    std (N,): the sigma each response was scaled by (its group's or the batch's), NaN where undefined (fewer
        than 2 scored responses) — for logging.
    """

    candidate: np.ndarray
    set: np.ndarray
    num_nan_sets: int
    std: np.ndarray


def group_advantages(
    rho: np.ndarray,
    mask: np.ndarray,
    set_reward: np.ndarray,
    num_generations: int,
    scale_rewards: str = "group",
    eps: float = TRL_EPSILON,
) -> GroupAdvantages:
    """Group-relative advantages of candidate rewards, TRL-compatible (see module docstring).

    Rows are grouped as TRL does: N = (number of prompts) · G, consecutive blocks of G. A response with no
    candidate (mask row all False) counts as one pseudo-candidate with rho = R. NaN set rewards are excluded
    from mu and sigma (TRL's nanmean/nanstd) and get advantage 0; so does every response when sigma is
    undefined (fewer than 2 scored responses where scaling is on), as TRL's nan_to_num does.
    ``scale_rewards``: "group" (sigma per group), "batch" (one sigma over the batch around the batch mean,
    numerators still use the group mean), "none" (no division).
    """
    r = np.asarray(set_reward, dtype=np.float64)
    values = np.asarray(rho, dtype=np.float64)
    present = np.asarray(mask, dtype=bool)
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if r.ndim != 1 or values.ndim != 2 or values.shape[0] != r.shape[0] or present.shape != values.shape:
        raise ValueError(
            "bad shapes: need rho (N, K), mask (N, K), set_reward (N,); "
            f"got {values.shape}, {present.shape}, {r.shape}"
        )
    g = int(num_generations)
    n = r.shape[0]
    if g < 1 or n % g:
        raise ValueError(f"N={n} responses do not split into groups of num_generations={num_generations}")
    if not (np.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    if np.isinf(r).any():
        raise ValueError("set rewards must be finite, or NaN for a failed scorer (inf found)")
    scored = ~np.isnan(r)  # (N,)
    live = present & scored[:, None]  # (N, K)
    if not np.isfinite(values[live]).all():
        raise ValueError("rho must be finite for present candidates of scored responses")
    k_eff = present.sum(axis=1)
    has_cands = k_eff > 0
    mean_rho = np.divide(np.where(live, values, 0.0).sum(axis=1), k_eff, out=r.copy(), where=has_cands)
    scale = np.maximum(1.0, np.nanmax(np.abs(r), initial=0.0))
    if (np.abs(mean_rho - r)[scored] > _EFFICIENCY_RTOL * scale).any():
        raise ValueError(
            "candidate rewards are not efficient: mean_i rho_{g,i} must equal R_g in every response"
        )

    # Each response contributes its mean squared deviation over its candidates (or (R − mu)^2 without any).
    def second_moment(center: np.ndarray) -> np.ndarray:  # center (N,) -> (N,), NaN for unscored rows
        dev = np.where(live, values - center[:, None], 0.0) ** 2
        with np.errstate(invalid="ignore"):
            cand = np.divide(dev.sum(axis=1), k_eff, out=(r - center) ** 2, where=has_cands)
        return np.where(scored, cand, np.nan)

    grouped = r.reshape(-1, g)  # (P, G)
    count = scored.reshape(-1, g).sum(axis=1)  # (P,)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_group = np.where(count > 0, np.nansum(grouped, axis=1) / np.maximum(count, 1), np.nan)  # (P,)
        mu = np.repeat(mu_group, g)  # (N,)
        if scale_rewards in ("group", "none"):
            ss = np.nansum(second_moment(mu).reshape(-1, g), axis=1)  # (P,)
            sigma = np.repeat(np.where(count > 1, np.sqrt(ss / (count - 1)), np.nan), g)
        else:
            total = int(scored.sum())
            mu_all = np.nansum(r) / total if total else np.nan
            ss = np.nansum(second_moment(np.full(n, mu_all)))
            sigma = np.full(n, np.sqrt(ss / (total - 1)) if total > 1 else np.nan)
        denom = 1.0 if scale_rewards == "none" else sigma[:, None] + eps
        cand_adv = (values - mu[:, None]) / denom
        set_adv = (r - mu) / (denom if scale_rewards == "none" else denom[:, 0])
    cand_adv = np.where(live, np.nan_to_num(cand_adv, nan=0.0), 0.0)
    set_adv = np.nan_to_num(set_adv, nan=0.0)
    return GroupAdvantages(candidate=cand_adv, set=set_adv, num_nan_sets=int((~scored).sum()), std=sigma)


# --------------------------------------------------------------------------------------------------
# Games -> credit, batched
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SetCredit:
    """Credit of one response's candidate set.

    set_reward R = U(N); u0 = U(∅);
    phi (K_g,): the credit the allocation uses (Shapley values for "uniform" and "shapley", efficient
        leave-one-out for "loo", Winner-Takes-All for "wta"), 0 for absent players;
    rho (K_g,): candidate rewards, NaN for absent players;
    engine: "closed_form" | "exact" | "monte_carlo" | "loo" | "wta";
    stderr: Monte-Carlo standard error, else None.
    """

    set_reward: float
    u0: float
    phi: np.ndarray
    rho: np.ndarray
    engine: str
    stderr: np.ndarray | None = None


def _stack_sum_of_max(games: Sequence[SumOfMaxGame]) -> SumOfMaxGame:
    """Unbatched sum-of-max games with equal T -> one batched game, K padded to the largest with the mask."""
    k_max = max(game.num_players for game in games)
    t = games[0].num_targets
    scores = np.zeros((len(games), t, k_max))
    mask = np.zeros((len(games), k_max), dtype=bool)
    for row, game in enumerate(games):
        k = game.num_players
        scores[row, :, :k] = np.where(game.mask[None, :], game.scores, 0.0)
        mask[row, :k] = game.mask
    weights = np.stack([game.weights for game in games])
    floors = np.stack([game.floors for game in games])
    return SumOfMaxGame(scores, weights, floors, mask)


def _stack_choice(games: Sequence[ChoiceGame]) -> ChoiceGame:
    """Unbatched choice games (equal K) -> one batched game."""
    return ChoiceGame(
        np.stack([np.where(game.mask, game.values, 0.0) for game in games]),
        np.stack([np.where(game.mask, game.attraction, 0.0) for game in games]),
        np.array([game.outside_attraction for game in games]),
        np.array([game.outside_value for game in games]),
        np.stack([game.mask for game in games]),
    )


def allocate_credit(
    games: Sequence[Game],
    allocation: str,
    lam: float,
    engine: str = "auto",
    seed: int = 0,
    num_permutations: int = DEFAULT_NUM_PERMUTATIONS,
    max_exact_players: int = MAX_EXACT_PLAYERS,
) -> list[SetCredit]:
    """Credit for each of a list of unbatched games, in order.

    Games are grouped so that each group goes through one vectorised engine call: sum-of-max games by T (K
    padded with the mask) for the closed form, by (T, K) otherwise; choice games by K; callable games one by
    one. Zero-player games get R = u0 and empty phi/rho.
    """
    _check_allocation(allocation, lam)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for idx, game in enumerate(games):
        if not isinstance(game, (SumOfMaxGame, ChoiceGame, CallableGame)):
            raise ValueError(f"games[{idx}] is a {type(game).__name__}, not a game")
        if game.batch_shape:
            raise ValueError(
                f"games[{idx}] is batched {game.batch_shape}; allocate_credit takes unbatched games"
            )
        chosen = resolve_engine(game, engine, max_exact_players)
        if isinstance(game, SumOfMaxGame):
            k_key = None if chosen == "closed_form" else game.num_players
            groups[("sum_of_max", game.num_targets, k_key, chosen)].append(idx)
        elif isinstance(game, ChoiceGame):
            groups[("choice", game.num_players, chosen)].append(idx)
        else:
            groups[("callable", idx, chosen)].append(idx)

    out: list[SetCredit | None] = [None] * len(games)
    for key, members in groups.items():
        kind, chosen = key[0], key[-1]
        group_games = [games[i] for i in members]
        if kind == "sum_of_max":
            batch: Game = _stack_sum_of_max(group_games)  # type: ignore[arg-type]
        elif kind == "choice":
            batch = _stack_choice(group_games)  # type: ignore[arg-type]
        else:
            batch = group_games[0]
        if allocation == "loo":
            credit, used, stderr = leave_one_out(batch), "loo", None
        elif allocation == "wta":
            credit, used, stderr = winner_takes_all(batch), "wta", None
        else:
            res = shapley_values(batch, chosen, max_exact_players, num_permutations, seed)
            credit, used, stderr = res.values, res.engine, res.stderr
        mask = batch.mask
        credit, mask = np.atleast_2d(credit), np.atleast_2d(mask)  # (n, K)
        r = np.atleast_1d(np.asarray(batch.grand_value, dtype=np.float64))
        u0 = np.atleast_1d(np.asarray(batch.u0, dtype=np.float64))
        if allocation == "loo":
            credit = efficient_loo(credit, r, u0, mask)
        rho = candidate_rewards(r, u0, credit, mask, "uniform" if allocation == "uniform" else "shapley", lam)
        se = None if stderr is None else np.atleast_2d(stderr)
        for row, idx in enumerate(members):
            k = games[idx].num_players
            out[idx] = SetCredit(
                set_reward=float(r[row]),
                u0=float(u0[row]),
                phi=credit[row, :k].copy(),
                rho=rho[row, :k].copy(),
                engine=used,
                stderr=None if se is None else se[row, :k].copy(),
            )
    return out  # type: ignore[return-value]
