"""Held-out evaluation: scoring, seeded bootstrap intervals, deterministic sampling."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from trainer_fixtures import tiny_task, tiny_warm_start

from shapegrpo_core.credit_table import credit_table
from shapegrpo_core.evaluation import (
    METRICS,
    bootstrap_mean,
    evaluate_policy,
    generate_completions,
    score_completions,
    score_response,
    score_responses,
    scores_from_table,
)
from shapegrpo_core.policy import load_policy

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------------------
# Bootstrap
# ------------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=40),
    seed=st.integers(0, 2**31 - 1),
    confidence=st.sampled_from([0.5, 0.9, 0.95, 0.99]),
)
def test_bootstrap_interval_contains_point_estimate_and_is_seeded(values, seed, confidence):
    est = bootstrap_mean(np.array(values), num_bootstrap=200, confidence=confidence, seed=seed)
    assert est.value == pytest.approx(float(np.mean(values)))
    assert est.low <= est.value <= est.high
    assert bootstrap_mean(np.array(values), num_bootstrap=200, confidence=confidence, seed=seed) == est


def test_bootstrap_drops_nan_and_handles_empty_and_constant():
    est = bootstrap_mean(np.array([1.0, np.nan, 3.0]), seed=0)
    assert est.value == 2.0 and 1.0 <= est.low <= est.high <= 3.0
    empty = bootstrap_mean(np.array([np.nan]))
    assert math.isnan(empty.value) and math.isnan(empty.low) and math.isnan(empty.high)
    const = bootstrap_mean(np.full(7, 0.1), seed=3)
    assert const.low <= const.value <= const.high and const.high - const.low < 1e-12
    wider = bootstrap_mean(np.arange(20.0), confidence=0.99, seed=0)
    narrower = bootstrap_mean(np.arange(20.0), confidence=0.5, seed=0)
    assert wider.high - wider.low > narrower.high - narrower.low
    with pytest.raises(ValueError):
        bootstrap_mean(np.ones(3), confidence=1.0)


# ------------------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------------------


def test_score_completions_measures_format_and_duplicates():
    task = tiny_task()
    example = dict(task.build_dataset("eval", 0)[0])
    completions = [[" i1, i2, i3, i4", " i1, i1, i1, i1", "", " i1, i2, i3, i4, i5, i6"]]
    table = score_completions(task, [example], completions)
    assert list(table["format_valid_rate"]) == [1.0, 0.0, 0.0, 0.0]
    assert list(table["duplicate_rate"]) == [0.0, 0.75, 0.0, 0.0]
    assert list(table["num_parsed"]) == [4, 4, 0, 6]
    assert list(table["num_scored"]) == [4, 4, 0, 4]
    # Scored on the first K: the 6-item answer is worth what its first four are worth.
    assert table["set_utility"][3] == pytest.approx(table["set_utility"][0])
    # Nothing parsed: every utility is u0 (showing nothing).
    assert table["set_utility"][2] == table["u0"][2] == table["best_candidate_utility"][2]
    r = score_response(task, " i1, i2", example)
    assert r.best_candidate_utility == pytest.approx(r.set_utility)  # best-of-set game: U(S) = max_i U({i})
    assert r.candidate_utility <= r.best_candidate_utility


def test_failed_scorer_is_a_recorded_nan():
    task = tiny_task()
    example = dict(task.build_dataset("eval", 0)[0])
    broken = {**example, "relevance": [0.0, 1.0]}  # wrong catalogue size: the game raises ValueError
    table = score_completions(task, [example, broken], [[" i1, i2, i3, i4"], [" i1, i2, i3, i4"]])
    assert math.isfinite(table["set_utility"][0]) and math.isnan(table["set_utility"][1])
    assert table["format_valid_rate"][1] == 1.0
    with pytest.raises(ValueError, match="relevance"):
        score_completions(task, [broken], [[" i1"]], scorer_errors="raise")


@pytest.mark.parametrize("game", ["best_of_set", "coverage", "soft_coverage"])
def test_stored_scores_give_the_credit_of_a_fresh_scoring(tmp_path, game):
    # score_completions(keep_games=True) -> parquet -> scores_from_table: the credit of the rebuilt scores is
    # the credit of scoring again, to the bit (same games, same engines), a failed scorer included.
    task = tiny_task(game)
    rows = [dict(r) for r in task.build_dataset("train", 0).select(range(2))]
    broken = {**rows[1], "relevance": [0.0, 1.0]}  # the scorer fails on this prompt's responses
    examples = [rows[0], broken, rows[1]]
    texts = [" i1, i2, i3, i4", " i1, i1, i5", "", " i7, i8, i9, i10, i11", " i12, i3"]
    completions = [texts[:2], texts[2:4], [texts[4], texts[0]]]
    path = tmp_path / "scores.parquet"
    score_completions(task, examples, completions, keep_games=True).to_parquet(path)
    stored = pd.read_parquet(path)
    rebuilt = scores_from_table(stored)
    assert [s is None for s in rebuilt] == [False, False, True, True, False, False]
    flat = [(i, t) for i, group in enumerate(completions) for t in group]
    fresh = score_responses(task, [t for _, t in flat], [examples[i] for i, _ in flat])
    groups = stored["prompt_index"].to_numpy()
    pd.testing.assert_frame_equal(
        credit_table(rebuilt, groups, format_penalty=0.1),
        credit_table(fresh, groups, format_penalty=0.1),
        check_exact=True,
    )
    with pytest.raises(ValueError, match="keep_games"):
        scores_from_table(stored.drop(columns=["game"]))


# ------------------------------------------------------------------------------------------------------------
# Sampling and the full evaluation
# ------------------------------------------------------------------------------------------------------------


def test_generation_is_seeded_and_leaves_the_global_rng_alone():
    task = tiny_task()
    model, tok = load_policy(tiny_warm_start())
    prompts = task.build_dataset("eval", 0)["prompt"][:4]
    model.train()
    state = torch.random.get_rng_state()
    a = generate_completions(model, tok, prompts, num_samples=2, max_new_tokens=12, seed=1, batch_size=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = generate_completions(model, tok, prompts, num_samples=2, max_new_tokens=12, seed=1, batch_size=3)
    c = generate_completions(model, tok, prompts, num_samples=2, max_new_tokens=12, seed=2, batch_size=3)
    assert a == b and a != c
    assert all(len(samples) == 2 for samples in a)
    assert model.training  # the mode the caller had is restored


def test_evaluate_policy_report_is_deterministic_with_intervals():
    task = tiny_task()
    model, tok = load_policy(tiny_warm_start())
    kwargs = {"num_prompts": 12, "num_samples": 2, "max_new_tokens": 12, "num_bootstrap": 300}
    first = evaluate_policy(model, tok, task, seed=0, **kwargs)
    again = evaluate_policy(model, tok, task, seed=0, **kwargs)
    other = evaluate_policy(model, tok, task, seed=1, **kwargs)

    assert first.num_prompts == 12 and first.num_responses == 24 and first.num_nan_sets == 0
    assert set(first.metrics) == set(METRICS)
    for name, est in first.metrics.items():
        assert est.low <= est.value <= est.high, name
        assert est == again.metrics[name]
    pd.testing.assert_frame_equal(first.responses, again.responses)
    assert list(first.responses["completion"]) != list(other.responses["completion"])
    # Point estimates are plain means of the per-response table (equal samples per prompt).
    assert first.metrics["set_utility"].value == pytest.approx(first.responses["set_utility"].mean())
    assert 0.0 <= first.metrics["format_valid_rate"].value <= 1.0
    flat = first.to_dict()
    assert flat["set_utility"] == first.metrics["set_utility"].value
    assert {"set_utility_low", "set_utility_high", "num_prompts", "num_nan_sets"} <= set(flat)
