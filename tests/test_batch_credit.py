"""BatchCredit: token weighting (efficiency in the loss), Winner-Takes-All, missing slots, metrics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shapegrpo_core.batch_credit import BatchCredit, ResponseCredit, collapsed, credit_responses
from shapegrpo_core.candidates import Candidate
from shapegrpo_core.credit import ALLOCATIONS, allocate_credit, group_advantages, winner_takes_all
from shapegrpo_core.evaluation import ResponseScore, count_duplicates, set_and_singleton_values
from shapegrpo_core.games import ChoiceGame, best_of_set, coverage, without_players


def score(game, texts: list[str] | None = None, valid: bool = True) -> ResponseScore:
    """A ResponseScore for a game whose players are candidates named ``texts``."""
    k = game.num_players
    texts = texts or [f"c{i}" for i in range(k)]
    cands = tuple(Candidate(t, 0, len(t)) for t in texts)
    r, singles = set_and_singleton_values(game)
    return ResponseScore(cands, k, game, r, float(game.u0), singles, count_duplicates(cands), valid)


def random_batch(rng: np.random.Generator, prompts: int, g: int, k: int) -> list[ResponseScore | None]:
    out: list[ResponseScore | None] = []
    for _ in range(prompts * g):
        kg = int(rng.integers(0, k + 1))
        if rng.uniform() < 0.1:
            out.append(None)  # a failed scorer
        elif rng.uniform() < 0.5:
            out.append(score(best_of_set(rng.choice([0.0, 0.3, 0.7, 1.0], kg))))
        else:
            out.append(score(coverage(rng.uniform(size=(3, kg)) > 0.5)))
    return out


def owners_and_mask(
    rng: np.random.Generator, credit: BatchCredit, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random token layouts: each scored candidate gets 0-5 tokens (0: all its tokens straddle), plus 0-4
    preamble/separator/EOS tokens, shuffled; the rest is padding."""
    n = len(credit)
    owners = np.full((n, width), -1)
    mask = np.zeros((n, width), dtype=bool)
    for row in range(n):
        layout = [i for i in range(credit.responses[row].num_scored) for _ in range(rng.integers(0, 6))]
        layout += [-1] * int(rng.integers(0, 5))
        rng.shuffle(layout)
        owners[row, : len(layout)] = layout
        mask[row, : len(layout)] = True
    return owners, mask


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    allocation=st.sampled_from(ALLOCATIONS),
    lam=st.sampled_from([0.0, 0.3, 1.0]),
    missing=st.sampled_from(["ignore", "null"]),
    scale=st.sampled_from(["group", "batch", "none"]),
)
def test_length_aware_sum_of_token_advantages_is_grpos(seed, allocation, lam, missing, scale) -> None:
    """For every response, any allocation, lam and candidate lengths: sum_t a_t = A_g x (loss tokens)."""
    rng = np.random.default_rng(seed)
    k, g = 4, 4
    scores = random_batch(rng, prompts=3, g=g, k=k)
    if all(s is None for s in scores):
        scores[0] = score(best_of_set([1.0]))
    rows = credit_responses(scores, allocation)
    credit = BatchCredit.from_responses(
        rows, g, allocation=allocation, lam=lam, num_slots=k, missing_slots=missing, scale_rewards=scale
    )
    owners, mask = owners_and_mask(rng, credit, width=32)
    tokens = credit.token_advantages(owners, mask)
    np.testing.assert_allclose(tokens.sum(axis=1), credit.advantages.set * mask.sum(axis=1), atol=1e-6)
    assert (tokens[~mask] == 0).all()
    # GRPO's own per-token advantage is A_g on every loss token; the credit path gives exactly that at lam=0.
    grpo = BatchCredit.from_responses(rows, g, allocation="uniform", num_slots=k, scale_rewards=scale)
    np.testing.assert_allclose(grpo.token_advantages(owners, mask), grpo.advantages.set[:, None] * mask)


def test_the_issue_example_best_response_keeps_a_positive_push() -> None:
    """A best-in-group response with a short good candidate and a long bad one: broadcast flips its sign."""
    scores = [score(best_of_set([1.0, 0.0])), score(best_of_set([0.5, 0.5])), score(best_of_set([0.0, 0.2]))]
    scores.append(score(best_of_set([0.4, 0.1])))
    credit = BatchCredit.compute(scores, 4, allocation="shapley")
    a_g = credit.advantages.set
    assert a_g[0] > 0 and a_g[0] == a_g.max()
    owners = np.full((4, 12), -1)
    owners[0, :10] = [0, -1, 1, 1, 1, 1, 1, 1, 1, 1]  # 1-token good candidate, ", ", 8-token bad candidate
    mask = np.zeros((4, 12), dtype=bool)
    mask[:, :11] = True  # + EOS
    broadcast = credit.token_advantages(owners, mask, weighting="broadcast")
    aware = credit.token_advantages(owners, mask)
    assert broadcast[0].sum() < 0 < aware[0].sum()
    assert aware[0].sum() == pytest.approx(a_g[0] * 11)
    # The good candidate's tokens still carry more than the bad one's, per token and in total.
    assert aware[0, 0] > aware[0, 2] and aware[0, 0] > aware[0, 2:10].sum()


def test_equal_lengths_make_both_weightings_agree() -> None:
    scores = [score(best_of_set([1.0, 0.0, 0.5])), score(best_of_set([0.2, 0.2, 0.0]))]
    credit = BatchCredit.compute(scores, 2, allocation="shapley")
    owners = np.array([[0, 0, -1, 1, 1, -1, 2, 2, -1]] * 2)
    mask = np.ones_like(owners, dtype=bool)
    np.testing.assert_allclose(
        credit.token_advantages(owners, mask), credit.token_advantages(owners, mask, weighting="broadcast")
    )


def test_token_advantages_rejects_bad_owners() -> None:
    credit = BatchCredit.compute(
        [score(best_of_set([1.0])), score(best_of_set([0.0]))], 2, allocation="shapley"
    )
    with pytest.raises(ValueError, match="slot index"):
        credit.token_advantages(np.array([[5], [0]]), np.ones((2, 1), dtype=bool))
    with pytest.raises(ValueError, match="weighting"):
        credit.token_advantages(np.zeros((2, 1), dtype=int), np.ones((2, 1), dtype=bool), weighting="x")


# ------------------------------------------------------------------------------------------------------------
# Winner-Takes-All
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([0.9, 0.3, 0.0], [0.9, 0.0, 0.0]),  # the surplus R - u0 = 0.9 to the best
        ([0.9, 0.9, 0.3], [0.45, 0.45, 0.0]),  # a tie splits it
        ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0]),  # an all-zero set has no surplus
        ([0.5], [0.5]),
    ],
)
def test_wta_hand_cases(scores: list[float], expected: list[float]) -> None:
    np.testing.assert_allclose(winner_takes_all(best_of_set(scores)), expected)


def test_wta_on_coverage_pays_the_best_standalone_candidate_the_whole_coverage() -> None:
    # Targets: candidate 0 covers 2 targets, candidate 1 covers 1 other, candidate 2 duplicates candidate 1.
    game = coverage(np.array([[1, 0, 0], [1, 0, 0], [0, 1, 1]], dtype=float))
    np.testing.assert_allclose(winner_takes_all(game), [3.0, 0.0, 0.0])  # U(N) = 3, U({0}) = 2 is best
    credit = allocate_credit([game], "wta", 1.0)[0]
    assert credit.engine == "wta" and credit.rho.mean() == pytest.approx(3.0)


def test_wta_malformed_response_is_a_pseudo_candidate() -> None:
    scores = [score(best_of_set([])), score(best_of_set([1.0, 0.0])), None, score(best_of_set([0.2, 0.2]))]
    credit = BatchCredit.compute(scores, 4, allocation="wta", num_slots=2)
    table = credit.table()
    row0 = table[table["generation"] == 0]
    assert row0["candidate_index"].tolist() == [-1] and row0["rho"].iloc[0] == 0.0
    assert table.loc[table["generation"] == 1, "phi_wta"].tolist() == [1.0, 0.0]
    assert table.loc[table["generation"] == 3, "phi_wta"].tolist() == pytest.approx([0.1, 0.1])
    assert credit.advantages.set[2] == 0.0 and np.isnan(credit.set_reward[2])


# ------------------------------------------------------------------------------------------------------------
# Missing slots
# ------------------------------------------------------------------------------------------------------------


def test_null_missing_slots_make_emptying_a_slot_cost_what_a_useless_candidate_costs() -> None:
    """{good, useless} vs {good, <empty>}: with null slots the two get the same candidate rewards, so
    dropping the useless candidate earns nothing; with 'ignore' the emptied response avoids the penalty."""
    full = score(best_of_set([1.0, 0.0]))
    emptied = score(best_of_set([1.0]))
    other = [score(best_of_set([0.5, 0.5])), score(best_of_set([0.0, 0.0]))]
    batch = [full, emptied, *other]
    null = BatchCredit.compute(batch, 4, allocation="shapley", num_slots=2, missing_slots="null")
    np.testing.assert_allclose(null.rho[0], null.rho[1])  # [1 + 2*1, 0 + 2*0] both
    np.testing.assert_allclose(null.advantages.candidate[0], null.advantages.candidate[1])
    ignore = BatchCredit.compute(batch, 4, allocation="shapley", num_slots=2, missing_slots="ignore")
    assert ignore.rho[1, 0] == pytest.approx(1.0) and np.isnan(ignore.rho[1, 1])
    # Under 'ignore' the emptied response has no negative candidate; under 'null' its empty slot's negative
    # credit lands on its separator/EOS tokens (length-aware weighting).
    owners = np.array([[0, -1, 1, -1], [0, -1, -1, -1], [0, -1, 1, -1], [0, -1, 1, -1]])
    mask = np.ones_like(owners, dtype=bool)
    tokens = null.token_advantages(owners, mask)
    assert tokens[1, 1:].mean() < null.advantages.set[1]
    assert tokens[1].sum() == pytest.approx(null.advantages.set[1] * 4)


def test_separator_only_answer_with_null_slots_is_u0_everywhere() -> None:
    credit = BatchCredit.compute(
        [score(best_of_set([])), score(best_of_set([1.0, 0.5]))],
        2,
        allocation="shapley",
        num_slots=2,
        missing_slots="null",
    )
    np.testing.assert_allclose(credit.rho[0], [0.0, 0.0])  # two null slots worth u0 = R = 0
    assert credit.mask[0].all() and not credit.scored[0].any()


# ------------------------------------------------------------------------------------------------------------
# Metrics and the table
# ------------------------------------------------------------------------------------------------------------


def test_collapse_metric_fires_on_identical_groups() -> None:
    same = score(best_of_set([0.5, 0.5]))
    batch = [same] * 4 + [score(best_of_set([1.0, 0.0])), same, same, same]
    texts = [" i7,,,,"] * 4 + [" i1, i2", " i7,,,,", " i7,,,,", " i7,,,,"]
    credit = BatchCredit.compute(batch, 4, allocation="shapley", texts=texts)
    metrics = credit.metrics()
    assert metrics["identical_group_rate"] == pytest.approx(0.5)
    assert metrics["tied_group_rate"] == pytest.approx(0.5)
    assert (credit.advantages.candidate[:4] == 0).all()  # an identical group has no signal left


def test_empty_means_are_nan_not_zero() -> None:
    credit = BatchCredit.compute([None, None], 2, allocation="shapley", num_slots=2)
    metrics = credit.metrics()
    for name in ("set_utility", "candidate_utility", "free_rider_rate", "duplicate_rate", "mean_abs_phi"):
        assert np.isnan(metrics[name]), name
    assert metrics["nan_sets"] == 2


def test_batch_credit_advantages_are_group_advantages_of_its_rho() -> None:
    rng = np.random.default_rng(0)
    scores = random_batch(rng, prompts=4, g=4, k=3)
    credit = BatchCredit.compute(scores, 4, allocation="loo", lam=0.7, num_slots=3)
    again = group_advantages(credit.rho, credit.mask, credit.set_reward, 4)
    np.testing.assert_array_equal(credit.advantages.candidate, again.candidate)
    np.testing.assert_array_equal(credit.advantages.set, again.set)


def test_from_responses_validates() -> None:
    row = ResponseCredit(1.0, 0.0, 0.0, [1.0], [1.0], "closed_form", "closed_form", [1.0], ["a"], 0, 1, True)
    with pytest.raises(ValueError, match="allocation"):
        BatchCredit.from_responses([row, row], 2, allocation="banzhaf")
    with pytest.raises(ValueError, match="missing_slots"):
        BatchCredit.from_responses([row, row], 2, allocation="shapley", missing_slots="fill")
    with pytest.raises(ValueError, match="num_slots"):
        BatchCredit.from_responses([row, row], 2, allocation="shapley", num_slots=0)
    with pytest.raises(ValueError, match="groups"):
        BatchCredit.from_responses([row, row, row], 2, allocation="shapley")


# ------------------------------------------------------------------------------------ repeated candidates


def test_shared_repeats_split_credit_and_null_repeats_pay_the_original() -> None:
    """Best of set {a = 0.8, copy of a, b = 0.3}. Shared (the game as scored): b gets 0.3/3 = 0.1, a and its
    copy split the rest, (0.8 − 0.3)/2 + 0.1 = 0.35 each. Null: the copy is a null player, so the game is
    {a, b}: b gets 0.3/2 = 0.15, a 0.15 + 0.5 = 0.65, the copy 0. Both sum to U = 0.8."""
    s = score(best_of_set(np.array([0.8, 0.8, 0.3])), ["a", " a ", "b"])
    shared = credit_responses([s], "shapley")[0]
    null = credit_responses([s], "shapley", repeats="null")[0]
    np.testing.assert_allclose(shared.phi, [0.35, 0.35, 0.1])
    np.testing.assert_allclose(null.phi, [0.65, 0.0, 0.15])
    assert null.set_utility == shared.set_utility == pytest.approx(0.8)
    assert null.shapley_phi == null.phi  # the free-rider metric sees the same game
    # loo and wta see the null game too: without the copy, a's leave-one-out value is U − U({b}) = 0.5 and
    # b's is 0, scaled to sum to U. Shared, the copy hides a's contribution: every leave-one-out value is 0
    # and the efficient fallback splits U equally among all three.
    np.testing.assert_allclose(credit_responses([s], "loo")[0].phi, [0.8 / 3] * 3)
    np.testing.assert_allclose(credit_responses([s], "loo", repeats="null")[0].phi, [0.8, 0.0, 0.0])
    np.testing.assert_allclose(credit_responses([s], "wta", repeats="null")[0].phi, [0.8, 0.0, 0.0])


def test_null_repeats_on_coverage_and_without_repeats_change_nothing() -> None:
    hits = np.array([[1, 1, 0], [0, 0, 1]], dtype=bool)  # candidates 0 and 1 are copies covering target 0
    s = score(coverage(hits), ["x", "x", "y"])
    np.testing.assert_allclose(credit_responses([s], "shapley", repeats="null")[0].phi, [1.0, 0.0, 1.0])
    np.testing.assert_allclose(credit_responses([s], "shapley")[0].phi, [0.5, 0.5, 1.0])
    distinct = score(coverage(hits), ["x", "z", "y"])  # same game, distinct texts: no repeats, no change
    np.testing.assert_allclose(
        credit_responses([distinct], "shapley", repeats="null")[0].phi, [0.5, 0.5, 1.0]
    )


def test_null_repeats_gives_a_duplicate_the_advantage_of_a_useless_candidate() -> None:
    """In the loss: a response [a, a] is paid like [a, useless] under null repeats, and a duplicate earns
    strictly less than under shared repeats (where it takes half of a's credit)."""
    batch = [
        score(best_of_set(np.array([0.9, 0.9])), ["a", "a"]),
        score(best_of_set(np.array([0.9, 0.0])), ["a", "junk"]),
        score(best_of_set(np.array([0.2, 0.1])), ["c", "d"]),
        score(best_of_set(np.array([0.5, 0.4])), ["e", "f"]),
    ]
    null = BatchCredit.compute(batch, 4, allocation="shapley", repeats="null")
    shared = BatchCredit.compute(batch, 4, allocation="shapley")
    np.testing.assert_allclose(null.advantages.candidate[0], null.advantages.candidate[1])
    assert null.advantages.candidate[0, 1] < shared.advantages.candidate[0, 1]


def test_null_repeats_keeps_the_game_where_a_copy_is_not_a_copy() -> None:
    s = score(best_of_set(np.array([0.8, 0.3])), ["a", "a"])  # same text, different values: not a copy
    np.testing.assert_allclose(
        credit_responses([s], "shapley", repeats="null")[0].phi, credit_responses([s], "shapley")[0].phi
    )
    with pytest.raises(ValueError, match="repeats must be one of"):
        credit_responses([s], "shapley", repeats="half")
    with pytest.raises(ValueError, match="unbatched SumOfMaxGame"):
        without_players(ChoiceGame(values=np.array([1.0, 1.0]), attraction=np.zeros(2)), [1])


def test_a_run_is_collapsed_when_its_last_tenth_has_mostly_identical_groups() -> None:
    healthy = [0.0] * 90 + [0.25] * 10
    assert not collapsed(healthy)
    assert collapsed([0.0] * 90 + [0.75] * 10)  # the last 10 of 100 steps: most groups identical
    assert not collapsed([1.0] * 90 + [0.0] * 10)  # collapsed early, recovered: judged by the end
    assert collapsed([0.6])  # a 1-step run: its one step
    assert not collapsed([]) and not collapsed([float("nan")])
