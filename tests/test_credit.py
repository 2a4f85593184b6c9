"""Credit allocation and advantages: TRL parity at lambda = 0, efficiency of the mix, NaN rows, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from trl.trainer.utils import nanstd

import shapegrpo_core.shapley as shapley_module
from shapegrpo_core import (
    CallableGame,
    ChoiceGame,
    SumOfMaxGame,
    allocate_credit,
    best_of_set,
    candidate_rewards,
    coverage,
    group_advantages,
    shapley_values,
)
from shapegrpo_core.credit import ALLOCATIONS, efficient_loo

SETTINGS = settings(max_examples=60, deadline=None)
seeds = st.integers(0, 2**32 - 1)


def trl_advantages(rewards_np: np.ndarray, num_generations: int, scale_rewards: str) -> np.ndarray:
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, multi_objective_aggregation="sum_then_normalize",
    line for line from the point where per-response rewards exist (NaN = unscorable) to ``nan_to_num``."""
    rewards = torch.tensor(rewards_np, dtype=torch.float64)
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        if num_generations > 1:
            std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
            std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
        else:
            std_rewards = torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        if rewards.numel() > 1:
            std_rewards = nanstd(rewards).expand_as(rewards)
        else:
            std_rewards = torch.zeros_like(rewards)
    else:
        raise ValueError(scale_rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    advantages = torch.nan_to_num(advantages, nan=0.0)
    return advantages.numpy()


def random_responses(rng: np.random.Generator, prompts: int, g: int, k: int, nan_frac: float):
    """Random set rewards (some NaN), u0, an efficient phi and a ragged mask, for prompts·g responses."""
    n = prompts * g
    mask = rng.random((n, k)) < 0.8
    mask[rng.random(n) < 0.1] = False  # some responses parse to nothing
    u0 = rng.choice([0.0, 0.2], n)
    r = u0 + np.where(rng.random(n) < 0.3, 1.0, rng.random(n) * 2)  # ties across a group are common
    raw = np.where(mask, rng.normal(size=(n, k)), 0.0)
    k_eff = mask.sum(1)
    # Shift raw credits so that each row sums to R − u0 (efficiency).
    phi = np.where(mask, raw + ((r - u0) - raw.sum(1))[:, None] / np.maximum(k_eff, 1)[:, None], 0.0)
    r = np.where(k_eff == 0, u0, r)  # nothing shown: R = u0
    r[rng.random(n) < nan_frac] = np.nan
    return r, u0, phi, mask


# ---- TRL parity at lambda = 0 --------------------------------------------------------------------


@SETTINGS
@given(
    seed=seeds,
    prompts=st.integers(1, 4),
    g=st.integers(1, 6),
    k=st.integers(1, 5),
    scale=st.sampled_from(["group", "batch", "none"]),
    allocation=st.sampled_from(ALLOCATIONS),
    nan_frac=st.sampled_from([0.0, 0.2, 0.6]),
)
def test_lambda_zero_equals_trl_grpo(seed, prompts, g, k, scale, allocation, nan_frac):
    rng = np.random.default_rng(seed)
    r, u0, phi, mask = random_responses(rng, prompts, g, k, nan_frac)
    rho = candidate_rewards(r, u0, phi, mask, allocation, lam=0.0)
    adv = group_advantages(rho, mask, r, g, scale_rewards=scale)
    expected = trl_advantages(r, g, scale)
    assert np.allclose(adv.set, expected, atol=1e-6, rtol=0)
    assert np.allclose(adv.candidate, np.where(mask, expected[:, None], 0.0), atol=1e-6, rtol=0)
    assert adv.num_nan_sets == int(np.isnan(r).sum())


def test_uniform_ignores_lambda_and_equals_trl():
    rng = np.random.default_rng(0)
    r, u0, phi, mask = random_responses(rng, 3, 4, 4, 0.2)
    rho = candidate_rewards(r, u0, phi, mask, "uniform", lam=0.7)
    adv = group_advantages(rho, mask, r, 4)
    assert np.allclose(adv.set, trl_advantages(r, 4, "group"), atol=1e-6)


# ---- efficiency of the mix, NaN rows, ties -------------------------------------------------------


@SETTINGS
@given(seed=seeds, lam=st.floats(0.0, 1.0), allocation=st.sampled_from(ALLOCATIONS))
def test_mean_rho_equals_set_reward_for_every_lambda(seed, lam, allocation):
    rng = np.random.default_rng(seed)
    r, u0, phi, mask = random_responses(rng, 2, 3, 5, 0.2)
    if allocation == "loo":
        phi = np.where(mask, np.abs(rng.normal(size=phi.shape)) * (rng.random(phi.shape) < 0.6), 0.0)
    rho = candidate_rewards(r, u0, phi, mask, allocation, lam)
    has = mask.any(1) & ~np.isnan(r)
    assert np.allclose(np.nanmean(rho[has], axis=1), r[has], atol=1e-9)
    assert np.isnan(rho[~mask]).all() and np.isnan(rho[np.isnan(r)]).all()


def test_all_tied_group_gives_shape_signal_but_no_grpo_signal():
    # Every response's best candidate is worth 1, so every set reward ties: GRPO has nothing to learn from.
    games = [best_of_set(u) for u in ([1.0, 0.0, 0.0], [1.0, 1.0, 0.2], [0.5, 1.0, 0.9], [1.0, 0.8, 0.6])]
    for allocation, nonzero in (("uniform", False), ("shapley", True), ("loo", True)):
        credits = allocate_credit(games, allocation, lam=1.0)
        r = np.array([c.set_reward for c in credits])
        rho = np.stack([c.rho for c in credits])
        adv = group_advantages(rho, np.ones_like(rho, bool), r, num_generations=4)
        assert np.allclose(adv.set, 0.0)
        assert np.allclose(trl_advantages(r, 4, "group"), 0.0)
        assert np.abs(adv.candidate).max() > 0.1 if nonzero else np.allclose(adv.candidate, 0.0)
    credits = allocate_credit(games, "shapley", lam=1.0)
    adv = group_advantages(np.stack([c.rho for c in credits]), np.ones((4, 3), bool), np.ones(4), 4)
    # The lone good candidate carries its set; the free riders next to it are pushed down.
    assert adv.candidate[0, 0] > 0 > adv.candidate[0, 1]
    assert adv.candidate[1, 0] == pytest.approx(adv.candidate[1, 1])  # duplicates split


def test_nan_rows_get_zero_advantage_and_are_excluded():
    rng = np.random.default_rng(3)
    r, u0, phi, mask = random_responses(rng, 2, 4, 3, 0.0)
    mask[:] = True
    phi = np.where(mask, (r - u0)[:, None] / 3 + rng.normal(size=(8, 3)) * 0.1, 0.0)
    phi -= (phi.sum(1) - (r - u0))[:, None] / 3
    r_nan = r.copy()
    r_nan[[1, 6]] = np.nan
    rho = candidate_rewards(r_nan, u0, phi, mask, "shapley", 0.5)
    adv = group_advantages(rho, mask, r_nan, 4)
    assert adv.num_nan_sets == 2
    assert (adv.candidate[[1, 6]] == 0).all() and (adv.set[[1, 6]] == 0).all()
    # Same result as dropping those rows (groups of 3 then).
    keep = [0, 2, 3, 4, 5, 7]
    rho_k = candidate_rewards(r[keep], u0[keep], phi[keep], mask[keep], "shapley", 0.5)
    ref = group_advantages(rho_k, mask[keep], r[keep], 3)
    assert np.allclose(adv.candidate[keep], ref.candidate) and np.allclose(adv.set[keep], ref.set)


def test_group_advantages_weights_responses_equally():
    # Group of 2: one set of 1 candidate, one of 4; mu is the mean of the two set rewards, not of the 5
    # candidates.
    rho = np.array([[2.0, np.nan, np.nan, np.nan], [0.0, 0.0, 0.0, 4.0]])
    mask = ~np.isnan(rho)
    adv = group_advantages(rho, mask, np.array([2.0, 1.0]), 2, scale_rewards="none")
    assert np.allclose(adv.set, [0.5, -0.5])
    assert np.allclose(adv.candidate, [[0.5, 0, 0, 0], [-1.5, -1.5, -1.5, 2.5]])
    group = group_advantages(rho, mask, np.array([2.0, 1.0]), 2)
    sigma = np.sqrt((0.5**2 + (3 * 1.5**2 + 2.5**2) / 4) / 1)
    assert group.std[0] == pytest.approx(sigma)
    assert np.allclose(group.candidate[1], np.array([-1.5, -1.5, -1.5, 2.5]) / (sigma + 1e-4))


def test_single_scored_response_and_single_generation_give_zero():
    rho = np.array([[1.0, 3.0], [np.nan, np.nan]])
    mask = np.ones((2, 2), bool)
    adv = group_advantages(rho, mask, np.array([2.0, np.nan]), 2)
    assert (adv.candidate == 0).all() and (adv.set == 0).all() and np.isnan(adv.std).all()
    adv1 = group_advantages(rho[:1], mask[:1], np.array([2.0]), 1)
    assert (adv1.candidate == 0).all()
    none = group_advantages(rho[:1], mask[:1], np.array([2.0]), 1, scale_rewards="none")
    assert np.allclose(none.candidate, [[-1.0, 1.0]])


# ---- candidate_rewards ---------------------------------------------------------------------------


def test_candidate_rewards_hand_example():
    # best-of-set [0.9, 0.9, 0.3, 0.0]: phi = [0.4, 0.4, 0.1, 0.0]; R = 0.9, u0 = 0, K = 4.
    r, u0 = np.array([0.9]), np.array([0.0])
    phi = np.array([[0.4, 0.4, 0.1, 0.0]])
    mask = np.ones((1, 4), bool)
    assert np.allclose(candidate_rewards(r, u0, phi, mask, "shapley", 1.0), [[1.6, 1.6, 0.4, 0.0]])
    assert np.allclose(candidate_rewards(r, u0, phi, mask, "shapley", 0.5), [[1.25, 1.25, 0.65, 0.45]])
    assert np.allclose(candidate_rewards(r, u0, phi, mask, "uniform", 1.0), [[0.9] * 4])
    # loo: raw marginals all 0 (duplicated best) -> equal split of R − u0.
    assert np.allclose(candidate_rewards(r, u0, np.zeros((1, 4)), mask, "loo", 1.0), [[0.9] * 4])
    loo = efficient_loo(np.array([[0.0, 2.0]]), np.array([3.0]), np.array([1.0]), np.ones((1, 2), bool))
    assert np.allclose(loo, [[0.0, 2.0]])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"allocation": "banzhaf"}, "allocation"),
        ({"lam": 1.5}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"phi": np.zeros((2, 3))}, "shape"),
        ({"set_reward": np.array([np.inf])}, "finite"),
        ({"phi": np.array([[np.nan, 0.0]])}, "finite"),
    ],
)
def test_candidate_rewards_bad_input(kwargs, match):
    args = {
        "set_reward": np.array([1.0]),
        "u0": np.array([0.0]),
        "phi": np.array([[0.5, 0.5]]),
        "mask": np.ones((1, 2), bool),
        "allocation": "shapley",
        "lam": 0.5,
    } | kwargs
    if "phi" in kwargs and kwargs["phi"].shape != (1, 2):
        args["mask"] = np.ones(kwargs["phi"].shape, bool)
    with pytest.raises(ValueError, match=match):
        candidate_rewards(**args)


def test_group_advantages_bad_input():
    rho, mask, r = np.ones((4, 2)), np.ones((4, 2), bool), np.ones(4)
    with pytest.raises(ValueError, match="groups"):
        group_advantages(rho, mask, r, 3)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rho, mask, r, 2, scale_rewards="std")
    with pytest.raises(ValueError, match="finite"):
        group_advantages(rho, mask, np.array([1.0, np.inf, 1.0, 1.0]), 2)
    with pytest.raises(ValueError, match="efficient"):
        group_advantages(rho * 2, mask, r, 2)
    with pytest.raises(ValueError, match="rho"):
        group_advantages(np.where(np.eye(4, 2, dtype=bool), np.nan, 1.0), mask, r, 2)
    with pytest.raises(ValueError, match="shape"):
        group_advantages(rho, mask[:, :1], r, 2)


# ---- allocate_credit -----------------------------------------------------------------------------


def test_allocate_credit_batches_a_thousand_games_in_one_closed_form_call(monkeypatch):
    rng = np.random.default_rng(0)
    games = [best_of_set(rng.random(int(rng.integers(1, 7)))) for _ in range(1000)]
    calls = []
    real = shapley_module.shapley_closed_form
    monkeypatch.setattr(
        shapley_module, "shapley_closed_form", lambda g: calls.append(g.batch_shape) or real(g)
    )
    credits = allocate_credit(games, "shapley", lam=1.0)
    assert calls == [(1000,)]
    for game, credit in zip(games, credits, strict=True):
        assert credit.engine == "closed_form" and credit.phi.shape == (game.num_players,)
        assert np.allclose(credit.phi, shapley_values(game).values, atol=1e-12)
        assert credit.set_reward == pytest.approx(game.grand_value) and credit.u0 == 0.0
        assert credit.rho.mean() == pytest.approx(credit.set_reward)


def test_allocate_credit_mixed_games_keep_order():
    rng = np.random.default_rng(1)
    games = [
        best_of_set([0.2, 0.9]),
        coverage(np.array([[1, 0, 1], [0, 1, 1]]), weights=[1.0, 0.5]),
        ChoiceGame([1.0, 0.5, 0.2], [0.0, 1.0, -1.0], outside_value=0.1),
        CallableGame(lambda s: float(len(s) ** 0.5), 4),
        best_of_set(np.zeros(0), floor=0.3),  # zero players
        SumOfMaxGame(rng.random((2, 5)), mask=[True, True, False, True, True]),
        CallableGame(lambda s: float(len(s) >= 9), 18),  # Monte Carlo
        best_of_set([0.7, 0.1, 0.4]),
    ]
    credits = allocate_credit(games, "shapley", lam=0.5, seed=0, num_permutations=64)
    engines = [c.engine for c in credits]
    assert engines == ["closed_form"] * 2 + ["exact"] * 2 + ["closed_form"] * 2 + [
        "monte_carlo",
        "closed_form",
    ]
    for game, credit in zip(games, credits, strict=True):
        assert credit.phi.shape == credit.rho.shape == (game.num_players,)
        assert credit.phi.sum() == pytest.approx(credit.set_reward - credit.u0, abs=1e-9)
        if game.num_players:
            present = game.mask
            assert np.nanmean(credit.rho) == pytest.approx(credit.set_reward)
            assert np.isnan(credit.rho[~present]).all() and (credit.phi[~present] == 0).all()
            if credit.engine != "monte_carlo":
                assert np.allclose(credit.phi, shapley_values(game).values, atol=1e-12)
    assert credits[4].set_reward == 0.3 and credits[4].u0 == 0.3 and credits[4].rho.shape == (0,)
    assert credits[6].stderr is not None and credits[0].stderr is None


def test_allocate_credit_loo_and_uniform():
    games = [best_of_set([0.9, 0.9, 0.3, 0.0]), best_of_set([1.0, 3.0])]
    loo = allocate_credit(games, "loo", lam=1.0)
    assert [c.engine for c in loo] == ["loo", "loo"]
    assert np.allclose(loo[0].phi, [0.225] * 4) and np.allclose(loo[0].rho, [0.9] * 4)  # blind to redundancy
    assert np.allclose(loo[1].phi, [0.0, 3.0]) and np.allclose(loo[1].rho, [0.0, 6.0])
    uni = allocate_credit(games, "uniform", lam=1.0)
    assert np.allclose(uni[0].phi, [0.4, 0.4, 0.1, 0.0]) and np.allclose(uni[0].rho, [0.9] * 4)
    shp = allocate_credit(games, "shapley", lam=1.0)
    assert np.allclose(shp[0].rho, [1.6, 1.6, 0.4, 0.0]) and np.allclose(shp[1].rho, [1.0, 5.0])


def test_allocate_credit_engine_override_and_bad_input():
    games = [best_of_set([1.0, 3.0]), best_of_set([2.0, 0.0, 1.0])]
    exact = allocate_credit(games, "shapley", 1.0, engine="exact")
    assert [c.engine for c in exact] == ["exact", "exact"] and np.allclose(exact[0].phi, [0.5, 2.5])
    with pytest.raises(ValueError, match="unbatched"):
        allocate_credit([best_of_set(np.ones((2, 3)))], "shapley", 1.0)
    with pytest.raises(ValueError, match="not a game"):
        allocate_credit([np.ones(3)], "shapley", 1.0)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="allocation"):
        allocate_credit(games, "banzhaf", 1.0)
    with pytest.raises(ValueError, match="closed form"):
        allocate_credit([ChoiceGame([1.0], [0.0])], "shapley", 1.0, engine="closed_form")
    assert allocate_credit([], "shapley", 1.0) == []


def test_demo_prints_the_worked_example(capsys):
    from shapegrpo_core import demo

    demo.main()
    out = capsys.readouterr().out
    assert "+0.400    +0.400    +0.100    +0.000" in out  # phi of strong, duplicate, weak, useless
    assert "+1.600    +1.600    +0.400    +0.000" in out  # rho under shapley, lam = 1
    assert "+0.250    +0.550    +0.200    +0.000" in out  # coverage phi
