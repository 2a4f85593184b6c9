"""The credit table lays out credit.allocate_credit / credit.group_advantages per candidate: efficiency per
set, advantages equal to group_advantages, the format penalty as a constant shift, free-rider statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from shapegrpo_core.candidates import Candidate
from shapegrpo_core.credit import ALLOCATIONS, allocate_credit, group_advantages
from shapegrpo_core.credit_table import credit_table, free_rider_stats
from shapegrpo_core.evaluation import ResponseScore, set_and_singleton_values
from shapegrpo_core.games import best_of_set

# Two prompts x G = 3 responses (best-of-set utilities per response; None = a failed scorer, [] = nothing
# parsed). Response (0, 0) has two free riders: phi = 0 in a set worth 1 > u0 = 0.
UTILITIES: list[list[float] | None] = [[1.0, 0.0, 0.0], [0.5, 0.25], [], [0.2, 0.8, 0.4], None, [0.3, 0.3]]
GROUPS = [0, 0, 0, 1, 1, 1]
VALID = [True, False, False, True, True, False]


def _score(utilities: list[float] | None, valid: bool) -> ResponseScore | None:
    if utilities is None:
        return None
    game = best_of_set(np.array(utilities, dtype=float), floor=0.0)
    set_utility, singles = set_and_singleton_values(game)
    cands = tuple(Candidate(f"item{i}", 6 * i, 6 * i + 5) for i in range(len(utilities)))
    return ResponseScore(cands, len(cands), game, set_utility, 0.0, singles, 0, valid)


def _scores() -> list[ResponseScore | None]:
    return [_score(u, v) for u, v in zip(UTILITIES, VALID, strict=True)]


def _reference(scores: list[ResponseScore | None], allocation: str, penalty: float, lam: float = 1.0):
    """group_advantages on (N, K) arrays assembled straight from allocate_credit."""
    live = [i for i, s in enumerate(scores) if s is not None]
    credit = dict(zip(live, allocate_credit([scores[i].game for i in live], allocation, lam), strict=True))
    width = max(s.num_scored for s in scores if s is not None)
    rho = np.full((len(scores), width), np.nan)  # (N, K)
    mask = np.zeros((len(scores), width), dtype=bool)
    reward = np.full(len(scores), np.nan)
    for i, c in credit.items():
        shift = penalty * (not VALID[i])
        k = len(c.rho)
        rho[i, :k], mask[i, :k], reward[i] = c.rho - shift, True, c.set_reward - shift
    return group_advantages(rho, mask, reward, num_generations=3), rho


def test_table_rows_and_efficiency_per_set() -> None:
    table = credit_table(_scores(), GROUPS, format_penalty=0.1)
    # One row per scored candidate, one pseudo-candidate row per response without any (empty or failed).
    assert len(table) == 3 + 2 + 1 + 3 + 1 + 2
    assert list(table["generation"].drop_duplicates()) == [0, 1, 2]
    sets = table.groupby(["prompt_index", "generation"])
    scored = sets.first()["set_reward"].notna()
    for column in ("phi", "phi_loo"):
        total = sets[column].sum()[scored]
        gain = (sets.first()["set_reward"] - sets.first()["u0"])[scored]
        np.testing.assert_allclose(total, gain, atol=1e-12)
    for a in ALLOCATIONS:  # mean_i rho = R in every scored set, penalty included
        np.testing.assert_allclose(sets[f"rho_{a}"].mean()[scored], sets.first()["set_reward"][scored])
    assert table["set_utility"].isna().sum() == 1 and table["advantage_shapley"].notna().all()


@pytest.mark.parametrize("penalty", [0.0, 0.1])
@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_advantages_equal_group_advantages(allocation: str, penalty: float) -> None:
    scores = _scores()
    table = credit_table(scores, GROUPS, allocations=(allocation,), format_penalty=penalty)
    expected, rho = _reference(scores, allocation, penalty)
    for n in range(len(scores)):
        rows = table[(table["prompt_index"] == GROUPS[n]) & (table["generation"] == n % 3)]
        real = rows[rows["candidate_index"] >= 0]
        k = len(real)
        np.testing.assert_allclose(real[f"advantage_{allocation}"], expected.candidate[n, :k], atol=1e-12)
        np.testing.assert_allclose(real[f"rho_{allocation}"], rho[n, :k], atol=1e-12)
        np.testing.assert_allclose(rows[f"set_advantage_{allocation}"], expected.set[n], atol=1e-12)
        if k == 0:  # the pseudo-candidate carries the set advantage
            np.testing.assert_allclose(rows[f"advantage_{allocation}"], expected.set[n], atol=1e-12)
    assert {f"advantage_{a}" for a in ALLOCATIONS} & set(table.columns) == {f"advantage_{allocation}"}


def test_format_penalty_shifts_rewards_not_credit() -> None:
    plain = credit_table(_scores(), GROUPS, format_penalty=0.0)
    shifted = credit_table(_scores(), GROUPS, format_penalty=0.25)
    invalid = ~shifted["format_valid"].to_numpy()
    shift = np.where(invalid, 0.25, 0.0)
    pd.testing.assert_series_equal(plain["phi"], shifted["phi"])
    pd.testing.assert_series_equal(plain["set_utility"], shifted["set_utility"])
    pd.testing.assert_series_equal(plain["candidate_utility"], shifted["candidate_utility"])
    np.testing.assert_allclose(shifted["set_reward"], plain["set_reward"] - shift)
    np.testing.assert_allclose(shifted["u0"], plain["u0"] - shift)
    np.testing.assert_allclose(shifted["rho_shapley"], plain["rho_shapley"] - shift)


def test_free_rider_stats() -> None:
    stats = free_rider_stats(credit_table(_scores(), GROUPS))
    assert stats["num_sets"] == 6 and stats["num_nan_sets"] == 1 and stats["num_generations"] == 3
    assert stats["num_candidates"] == 3 + 2 + 3 + 2
    # The free riders are the two zero-utility candidates next to the 1.0 one (the [0.3, 0.3] copies split
    # their set's gain, each with phi = 0.15 > 0).
    assert stats["free_rider_rate"] == pytest.approx(2 / 10)
    assert stats["free_rider_grpo_reward"] == pytest.approx(1.0)  # GRPO pays them the set reward
    assert stats["free_rider_shapley_reward"] == pytest.approx(0.0)  # u0 + K phi = 0
    assert stats["free_rider_shapley_advantage"] < stats["free_rider_grpo_advantage"]


def test_bad_groups_rejected() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        credit_table(_scores(), [0, 1, 0, 1, 0, 1])
    with pytest.raises(ValueError, match="same number"):
        credit_table(_scores(), [0, 0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="allocations"):
        credit_table(_scores(), GROUPS, allocations=("banzhaf",))
