"""Paired statistics and the champion gate (shapegrpo_core.stats)."""

import numpy as np
import pytest

from shapegrpo_core.stats import bootstrap_iqm_ci, bootstrap_mean_ci, decide_champion, iqm, paired_difference


def test_paired_difference_detects_a_consistent_small_gain() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 200)  # large unit-to-unit spread ...
    better = base + 0.02 + rng.normal(0, 0.005, 200)  # ... but a consistent paired gain
    d = paired_difference(better, base, seed=1)
    assert d.excludes_zero and d.low > 0
    assert d.low < 0.02 < d.high
    assert d.p_improvement > 0.99
    assert d.wilcoxon_p < 1e-6


def test_paired_difference_of_identical_scores_is_a_point_at_zero() -> None:
    x = np.linspace(0, 1, 10)
    d = paired_difference(x, x)
    assert (d.mean, d.low, d.high, d.p_improvement, d.wilcoxon_p) == (0.0, 0.0, 0.0, 0.5, 1.0)
    assert not d.excludes_zero


def test_bootstrap_is_seeded() -> None:
    v = np.random.default_rng(3).normal(size=50)
    assert bootstrap_mean_ci(v, seed=7) == bootstrap_mean_ci(v, seed=7)


@pytest.mark.parametrize(
    ("a", "b", "msg"),
    [([1.0, 2.0], [1.0], "one length"), ([1.0], [2.0], "at least 2"), ([1.0, np.nan], [1.0, 2.0], "finite")],
)
def test_paired_difference_rejects_bad_input(a: list, b: list, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        paired_difference(a, b)


def test_champion_stays_on_overlapping_intervals() -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.2, (3, 40))
    scores = {"grpo": 0.5 + noise[0], "shapegrpo": 0.505 + noise[1], "loo": 0.5 + noise[2]}
    decision = decide_champion(scores, seed=0)
    assert decision.winner is None
    assert decision.reason.startswith("no significant winner")
    assert set(decision.pairs["versus"]) == set(scores) - {decision.pairs["method"].iloc[0]}


def test_champion_moves_on_a_clear_win() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 64)
    scores = {"grpo": base, "shapegrpo": base + 0.1, "loo": base + 0.05 * rng.uniform(0, 1, 64)}
    decision = decide_champion(scores, seed=0)
    assert decision.winner == "shapegrpo"
    assert decision.pairs["significant"].all()


def test_champion_needs_every_pair_significant() -> None:
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, 64)
    # shapegrpo clearly beats grpo, but is indistinguishable from loo.
    scores = {"grpo": base, "shapegrpo": base + 0.1, "loo": base + 0.1 + rng.normal(0, 0.05, 64)}
    decision = decide_champion(scores, seed=0)
    assert decision.winner is None


def test_iqm_ignores_the_outer_quartiles() -> None:
    # 8 runs: the IQM is the mean of the middle four (two collapsed runs and two lucky ones dropped)
    runs = [0.0, 0.05, 0.40, 0.41, 0.42, 0.43, 0.9, 0.95]
    assert iqm(runs) == pytest.approx((0.40 + 0.41 + 0.42 + 0.43) / 4)
    point, low, high = bootstrap_iqm_ci(runs, seed=0)
    assert point == pytest.approx(0.415)
    assert low <= point <= high
    assert bootstrap_iqm_ci(runs, seed=0) == (point, low, high)  # seeded
    assert bootstrap_iqm_ci([0.3, 0.3, 0.3]) == (0.3, 0.3, 0.3)
    with pytest.raises(ValueError, match="at least 2 finite"):
        bootstrap_iqm_ci([0.3, float("nan")])
