"""Games: values against naive formulas, constructors, batching/masking, and bad input."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shapegrpo_core.games import (
    MAX_STORED_CALLABLE_PLAYERS,
    CallableGame,
    ChoiceGame,
    SumOfMaxGame,
    best_of_set,
    coalition_matrix,
    coverage,
    game_from_dict,
    game_to_dict,
)
from shapegrpo_core.shapley import shapley_values

SETTINGS = settings(max_examples=60, deadline=None)


def naive_sum_of_max(scores, weights, floors, mask, coalition) -> float:
    """U(S) = sum_t w_t max(b_t, max_{j in S} s_tj), straight from the definition (unbatched)."""
    total = 0.0
    for t in range(scores.shape[0]):
        best = floors[t]
        for j in range(scores.shape[1]):
            if coalition[j] and mask[j]:
                best = max(best, scores[t, j])
        total += weights[t] * best
    return total


def naive_choice(values, attraction, a0, v0, mask, coalition) -> float:
    num, den = v0 * math.exp(a0), math.exp(a0)
    for j in range(len(values)):
        if coalition[j] and mask[j]:
            num += values[j] * math.exp(attraction[j])
            den += math.exp(attraction[j])
    return num / den


def random_sum_of_max(rng: np.random.Generator, batch: int | None, t: int, k: int):
    shape = (t, k) if batch is None else (batch, t, k)
    # Draw from a small pool so that ties and scores below the floor are common.
    pool = np.array([-1.0, 0.0, 0.5, 1.0, 1.0, 2.0, 3.5])
    scores = np.where(rng.random(shape) < 0.5, rng.choice(pool, shape), rng.normal(size=shape))
    weights = rng.choice([0.0, 0.5, 1.0, 2.0], shape[:-1])
    floors = rng.choice([0.0, 0.5, -0.5], shape[:-1])
    mask = rng.random((*shape[:-2], k)) < 0.8
    return scores, weights, floors, mask


def test_coalition_matrix_bit_order():
    c = coalition_matrix(3)
    assert c.shape == (8, 3)
    assert c[5].tolist() == [True, False, True]  # 5 = 0b101: players 0 and 2
    assert not c.flags.writeable
    assert coalition_matrix(0).shape == (1, 0)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), t=st.integers(1, 3), k=st.integers(0, 5), batched=st.booleans())
def test_sum_of_max_value_matches_definition(seed, t, k, batched):
    rng = np.random.default_rng(seed)
    b = 3 if batched else None
    scores, weights, floors, mask = random_sum_of_max(rng, b, t, k)
    game = SumOfMaxGame(scores, weights, floors, mask)
    coalitions = coalition_matrix(k)
    got = game.value(coalitions)
    assert np.allclose(game.all_values(), got, atol=1e-12)
    rows = (
        [(scores, weights, floors, mask)]
        if b is None
        else list(zip(scores, weights, floors, mask, strict=True))
    )
    for r, (s, w, f, m) in enumerate(rows):
        expected = [naive_sum_of_max(s, w, f, m, c) for c in coalitions]
        assert np.allclose(got if b is None else got[r], expected, atol=1e-12)
        u0 = game.u0 if b is None else game.u0[r]
        grand = game.grand_value if b is None else game.grand_value[r]
        assert u0 == pytest.approx(float(np.dot(w, f)))
        assert grand == pytest.approx(naive_sum_of_max(s, w, f, m, np.ones(k, bool)))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(0, 5), batched=st.booleans())
def test_choice_value_matches_definition(seed, k, batched):
    rng = np.random.default_rng(seed)
    shape = (k,) if not batched else (2, k)
    values, attraction = rng.normal(size=shape), rng.normal(size=shape) * 2
    a0, v0 = rng.normal(size=shape[:-1]), rng.normal(size=shape[:-1])
    mask = rng.random(shape) < 0.8
    game = ChoiceGame(values, attraction, a0 if batched else float(a0), v0 if batched else float(v0), mask)
    coalitions = coalition_matrix(k)
    got = game.value(coalitions)
    assert np.allclose(game.all_values(), got, atol=1e-12)
    if not batched:
        expected = [naive_choice(values, attraction, float(a0), float(v0), mask, c) for c in coalitions]
        assert np.allclose(got, expected, atol=1e-12)
        assert game.u0 == pytest.approx(float(v0))
    else:
        for r in range(2):
            expected = [naive_choice(values[r], attraction[r], a0[r], v0[r], mask[r], c) for c in coalitions]
            assert np.allclose(got[r], expected, atol=1e-12)


def test_choice_game_is_stable_for_large_attractions():
    game = ChoiceGame([1.0, 2.0], [650.0, 640.0], outside_attraction=0.0, outside_value=0.5)
    assert game.u0 == 0.5
    assert game.value(np.array([False, False])) == pytest.approx(0.5)
    assert game.grand_value == pytest.approx((1.0 + 2.0 * math.exp(-10)) / (1.0 + math.exp(-10)))
    with pytest.raises(ValueError, match="700"):
        ChoiceGame([1.0], [800.0])


def test_best_of_set_and_coverage_constructors():
    g = best_of_set([1.0, 3.0, -2.0], floor=0.5)
    assert g.num_players == 3 and g.num_targets == 1 and g.batch_shape == ()
    assert g.u0 == 0.5 and g.grand_value == 3.0
    assert g.value(np.array([False, False, True])) == 0.5  # below the floor counts as the floor
    gb = best_of_set(np.array([[1.0, 2.0], [0.0, 5.0]]), floor=np.array([0.0, 1.0]))
    assert gb.batch_shape == (2,)
    assert np.allclose(gb.u0, [0.0, 1.0]) and np.allclose(gb.grand_value, [2.0, 5.0])

    hits = np.array([[1, 1, 0], [0, 0, 1]])
    cov = coverage(hits, weights=[1.0, 2.0])
    assert cov.u0 == 0.0 and cov.grand_value == 3.0
    assert cov.value(np.array([[True, True, False], [False, False, True]])).tolist() == [1.0, 2.0]
    assert coverage(hits.astype(bool)).grand_value == 2.0
    # Padding under the mask may be anything, even NaN.
    masked = coverage(np.array([[1.0, np.nan]]), mask=[True, False])
    assert masked.grand_value == 1.0
    with pytest.raises(ValueError, match="0/1"):
        coverage(np.array([[0.5, 1.0]]))


def test_zero_and_one_player_games():
    g0 = SumOfMaxGame(np.zeros((2, 0)), floors=[1.0, 2.0])
    assert g0.num_players == 0 and g0.u0 == 3.0 and g0.grand_value == 3.0
    assert g0.all_values().tolist() == [3.0]
    assert ChoiceGame(np.zeros(0), np.zeros(0), outside_value=0.3).grand_value == pytest.approx(0.3)
    assert CallableGame(lambda s: 1.0, 0).all_values().tolist() == [1.0]
    g1 = best_of_set([2.0])
    assert g1.all_values().tolist() == [0.0, 2.0]


def test_masked_player_is_absent():
    g = best_of_set(np.array([1.0, 9.0, 2.0]), mask=np.array([True, False, True]))
    assert g.grand_value == 2.0
    assert g.value(np.array([False, True, False])) == 0.0


def test_batched_value_accepts_shared_or_per_game_coalitions():
    g = best_of_set(np.array([[1.0, 2.0], [3.0, 0.0]]))
    shared = g.value(np.array([[True, False], [True, True]]))
    assert shared.tolist() == [[1.0, 2.0], [3.0, 3.0]]
    per_game = g.value(np.array([[[False, True]], [[False, True]]]))
    assert per_game.tolist() == [[2.0], [0.0]]
    with pytest.raises(ValueError, match="coalitions"):
        g.value(np.ones((3, 1, 2), bool))
    sub = g.take_batch(slice(1, 2))
    assert sub.batch_shape == (1,) and sub.grand_value.tolist() == [3.0]


def test_callable_game_calls_each_distinct_coalition_once():
    calls: list[frozenset[int]] = []

    def fn(s: frozenset[int]) -> float:
        calls.append(s)
        return float(sum(s))

    g = CallableGame(fn, 3)
    c = np.array([[True, False, True], [True, False, True], [False, False, False]])
    assert g.value(c).tolist() == [2.0, 2.0, 0.0]
    assert sorted(map(sorted, calls)) == [[], [0, 2]]
    assert g.u0 == 0.0 and g.grand_value == 3.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None, "x"])
def test_callable_game_rejects_bad_return_values(bad):
    g = CallableGame(lambda s: bad if s else 0.0, 2)
    with pytest.raises(ValueError, match="coalition"):
        g.all_values()


def test_games_are_immutable():
    g = best_of_set([1.0, 2.0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.scores = np.zeros((1, 2))  # type: ignore[misc]
    with pytest.raises(ValueError):
        g.scores[0, 0] = 5.0
    source = np.array([[1.0, 2.0]])
    g2 = SumOfMaxGame(source)
    source[0, 0] = 99.0
    assert g2.grand_value == 2.0  # the game holds its own copy


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scores": [[1.0, np.nan]]}, "finite"),
        ({"scores": [[1.0, np.inf]]}, "finite"),
        ({"scores": [1.0, 2.0]}, "shape"),
        ({"scores": [[1.0, 2.0]], "weights": [-1.0]}, ">= 0"),
        ({"scores": [[1.0, 2.0]], "weights": [np.nan]}, "finite"),
        ({"scores": [[1.0, 2.0]], "weights": [1.0, 1.0]}, "shape"),
        ({"scores": [[1.0, 2.0]], "floors": [np.inf]}, "finite"),
        ({"scores": [[1.0, 2.0]], "floors": [[0.0]]}, "shape"),
        ({"scores": [[1.0, 2.0]], "mask": [True]}, "shape"),
        ({"scores": [[1.0, 2.0]], "mask": [2, 0]}, "boolean"),
        ({"scores": [["a", "b"]]}, "numeric"),
    ],
)
def test_sum_of_max_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SumOfMaxGame(**kwargs)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (([1.0, np.nan], [0.0, 0.0]), {}, "finite"),
        (([1.0, 2.0], [0.0, np.inf]), {}, "finite"),
        (([1.0, 2.0], [0.0]), {}, "shape"),
        (([1.0], [0.0]), {"outside_value": np.nan}, "finite"),
        (([[1.0]], [[0.0]]), {"outside_value": [1.0, 2.0]}, "shape"),
        (([[[1.0]]], [[[0.0]]]), {}, "shape"),
    ],
)
def test_choice_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChoiceGame(*args, **kwargs)


def test_callable_bad_input_and_bad_coalitions():
    with pytest.raises(ValueError, match=">= 0"):
        CallableGame(lambda s: 0.0, -1)
    with pytest.raises(ValueError, match="callable"):
        CallableGame(3.0, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="coalitions"):
        best_of_set([1.0, 2.0]).value(np.ones((4, 3), bool))
    with pytest.raises(ValueError, match="boolean"):
        best_of_set([1.0, 2.0]).value(np.array([[2, 0]]))


def test_nan_padding_under_mask_is_ignored():
    scores = np.array([[[1.0, np.nan]], [[2.0, 4.0]]])
    g = SumOfMaxGame(scores, mask=np.array([[True, False], [True, True]]))
    assert g.grand_value.tolist() == [1.0, 4.0]
    assert all(np.isfinite(g.all_values()).ravel())
    assert list(itertools.chain.from_iterable(g.value(coalition_matrix(2)).tolist())) == [
        0,
        1,
        0,
        1,
        0,
        2,
        4,
        4,
    ]


def test_games_share_only_frozen_inputs():
    """A game keeps an array it is given only if nobody can write it; anything writable is copied."""
    frozen = np.array([[1.0, 2.0]])
    frozen.setflags(write=False)
    assert SumOfMaxGame(frozen).scores is frozen  # another game's field, say: no second copy
    base = np.array([[1.0, 2.0]])
    view = base[:]
    view.setflags(write=False)  # read-only view of a writable array: still copied
    g = SumOfMaxGame(view)
    base[0, 0] = 99.0
    assert not np.shares_memory(g.scores, base) and g.scores[0, 0] == 1.0
    u = np.array([[0.5, 3.0], [1.0, 1.0]])
    bos = best_of_set(u)
    assert not np.shares_memory(bos.scores, u) and not bos.scores.flags.writeable
    again = SumOfMaxGame(bos.scores, bos.weights, bos.floors, bos.mask)  # rebuilt from fields: shared
    assert again.scores is bos.scores and np.array_equal(again.grand_value, bos.grand_value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("batched", [False, True])
def test_fused_finiteness_check_catches_every_non_finite(bad, batched):
    scores = np.array([[0.5, 1.0, 2.0]])
    scores[0, 1] = bad
    if batched:
        scores = np.stack([np.ones((1, 3)), scores])  # (2, 1, 3): the bad entry in the second game
    with pytest.raises(ValueError, match="finite"):
        SumOfMaxGame(scores)
    with pytest.raises(ValueError, match="finite"):
        best_of_set(scores[..., 0, :])
    with pytest.raises(ValueError, match="finite"):
        best_of_set([1.0, 2.0], floor=bad)
    with pytest.raises(ValueError, match="finite"):
        SumOfMaxGame([[1.0, 2.0]], weights=[bad])
    mask = np.ones((*scores.shape[:-2], 3), bool)
    mask[..., 1] = False  # the same entry as absent padding: accepted and ignored
    assert np.isfinite(np.asarray(SumOfMaxGame(scores, mask=mask).grand_value)).all()


def test_default_and_explicit_floor_and_weights_give_the_same_game():
    u = np.array([[0.2, -1.0, 0.7], [3.0, 3.0, 0.0]])
    implicit = best_of_set(u)
    explicit = SumOfMaxGame(u[:, None, :], weights=np.ones((2, 1)), floors=np.zeros((2, 1)))
    for field in ("scores", "weights", "floors", "mask"):
        assert np.array_equal(getattr(implicit, field), getattr(explicit, field))
        assert getattr(implicit, field).shape == getattr(explicit, field).shape
    assert np.array_equal(implicit.all_values(), explicit.all_values())
    assert np.array_equal(best_of_set(u, floor=0.5).floors, np.full((2, 1), 0.5))


# --------------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "game",
    [
        SumOfMaxGame(
            np.array([[0.1, 0.7, 0.3], [0.5, 0.0, 0.9]]), np.array([1.0, 2.5]), np.array([0.2, 0.0])
        ),
        best_of_set([0.9, 0.9, 0.3, 0.0]),
        coverage(np.zeros((0, 3))),  # no target: an empty axis survives storage
        best_of_set(np.zeros(0)),  # no candidate
        ChoiceGame(np.array([1.0, 0.2, 0.5]), np.array([0.3, -1.0, 2.0]), 0.5, 0.1),
        CallableGame(lambda s: float(len({i % 3 for i in s})) + 0.25, 5),
    ],
    ids=["sum_of_max", "best_of_set", "no_target", "no_candidate", "choice", "callable"],
)
def test_stored_game_has_the_same_values_and_shapley_values(game):
    import json

    back = game_from_dict(json.loads(json.dumps(game_to_dict(game))))
    assert type(back) is type(game)
    k = game.num_players
    np.testing.assert_array_equal(back.value(coalition_matrix(k)), game.value(coalition_matrix(k)))
    ours, theirs = shapley_values(back), shapley_values(game)
    assert ours.engine == theirs.engine
    np.testing.assert_array_equal(ours.values, theirs.values)


def test_storing_a_game_refuses_what_it_cannot_rebuild():
    with pytest.raises(ValueError, match="too large to store"):
        game_to_dict(CallableGame(lambda s: 1.0, MAX_STORED_CALLABLE_PLAYERS + 1))
    with pytest.raises(ValueError, match="unbatched"):
        game_to_dict(best_of_set(np.ones((2, 3))))
    with pytest.raises(ValueError, match="unknown stored game kind"):
        game_from_dict({"kind": "pickle"})
