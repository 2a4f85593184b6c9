"""Shapley engines: axioms on random games, closed form == exact, Monte Carlo within its error, examples."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shapegrpo_core import (
    CallableGame,
    ChoiceGame,
    SumOfMaxGame,
    best_of_set,
    coverage,
    leave_one_out,
    shapley_closed_form,
    shapley_exact,
    shapley_monte_carlo,
    shapley_values,
)
from shapegrpo_core.games import coalition_matrix
from shapegrpo_core.shapley import antithetic_permutations, shapley_max_games

SETTINGS = settings(max_examples=60, deadline=None)
TOL = 1e-9

seeds = st.integers(0, 2**32 - 1)


# ---- random games --------------------------------------------------------------------------------


def random_scores(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    pool = np.array([-1.0, 0.0, 0.5, 1.0, 1.0, 2.0, 3.5])  # ties and sub-floor scores are common
    return np.where(rng.random(shape) < 0.5, rng.choice(pool, shape), rng.normal(size=shape))


def random_sum_of_max(rng, k, t=2, batch=None, masked=True) -> SumOfMaxGame:
    shape = (t, k) if batch is None else (batch, t, k)
    mask = rng.random((*shape[:-2], k)) < 0.8 if masked else None
    return SumOfMaxGame(
        random_scores(rng, shape),
        rng.choice([0.0, 0.5, 1.0, 2.0], shape[:-1]),
        rng.choice([0.0, 0.5, -0.5], shape[:-1]),
        mask,
    )


def random_choice(rng, k, batch=None) -> ChoiceGame:
    shape = (k,) if batch is None else (batch, k)
    a0 = rng.normal(size=shape[:-1])
    v0 = rng.normal(size=shape[:-1])
    return ChoiceGame(
        random_scores(rng, shape),
        rng.normal(size=shape),
        a0 if batch else float(a0),
        v0 if batch else float(v0),
        rng.random(shape) < 0.8,
    )


def random_table_game(rng, k) -> CallableGame:
    """An arbitrary (non-monotone) set function given by a table over bitmasks."""
    table = rng.normal(size=2**k)
    table[rng.random(2**k) < 0.3] = 1.0  # ties
    return CallableGame(lambda s: float(table[sum(1 << i for i in s)]), k)


def random_game(rng, kind: str, k: int):
    if kind == "sum_of_max":
        return random_sum_of_max(rng, k, t=int(rng.integers(1, 4)), masked=False)
    if kind == "choice":
        return ChoiceGame(
            random_scores(rng, (k,)), rng.normal(size=k), float(rng.normal()), float(rng.normal())
        )
    return random_table_game(rng, k)


def engine_for(game):
    return shapley_closed_form(game) if isinstance(game, SumOfMaxGame) else shapley_exact(game)


def as_callable(game) -> CallableGame:
    return CallableGame(
        lambda s: float(game.value(np.isin(np.arange(game.num_players), list(s)))), game.num_players
    )


def brute_force(fn, k) -> np.ndarray:
    """Shapley values by the textbook formula, in plain Python."""
    phi = np.zeros(k)
    for i in range(k):
        others = [j for j in range(k) if j != i]
        for size in range(k):
            w = math.factorial(size) * math.factorial(k - size - 1) / math.factorial(k)
            for s in itertools.combinations(others, size):
                phi[i] += w * (fn(frozenset((*s, i))) - fn(frozenset(s)))
    return phi


KINDS = st.sampled_from(["sum_of_max", "choice", "callable"])


# ---- hand-computed examples ----------------------------------------------------------------------


def test_hand_examples():
    assert np.allclose(shapley_values(best_of_set([1.0, 3.0])).values, [0.5, 2.5])
    assert np.allclose(shapley_values(best_of_set([1.0, 3.0], floor=2.0)).values, [0.0, 1.0])
    assert np.allclose(shapley_values(best_of_set([3.0, 3.0])).values, [1.5, 1.5])  # duplicates split
    # strong, duplicate of it, weak, useless: the weak one shares its 0.3 with the 3 players at least as good.
    assert np.allclose(shapley_values(best_of_set([0.9, 0.9, 0.3, 0.0])).values, [0.4, 0.4, 0.1, 0.0])
    cov = coverage(np.array([[1, 1, 0], [0, 0, 1]]), weights=[1.0, 2.0])
    assert np.allclose(shapley_values(cov).values, [0.5, 0.5, 2.0])
    # Glove game: player 0 holds a left glove, players 1 and 2 right gloves; a pair is worth 1.
    glove = CallableGame(lambda s: float(0 in s and bool(s & {1, 2})), 3)
    assert np.allclose(shapley_values(glove).values, [2 / 3, 1 / 6, 1 / 6])


@pytest.mark.parametrize("engine", ["closed_form", "exact", "monte_carlo"])
def test_zero_and_one_player(engine):
    g1 = best_of_set([2.0], floor=0.5)
    res = shapley_values(g1, engine=engine, num_permutations=4)
    assert res.engine == engine and np.allclose(res.values, [1.5])
    g0 = best_of_set(np.zeros(0), floor=0.5)
    res0 = shapley_values(g0, engine=engine, num_permutations=4)
    assert res0.values.shape == (0,)
    gb = best_of_set(np.zeros((3, 0)))
    assert shapley_values(gb, engine=engine, num_permutations=4).values.shape == (3, 0)


# ---- axioms --------------------------------------------------------------------------------------


@SETTINGS
@given(seed=seeds, kind=KINDS, k=st.integers(1, 6))
def test_efficiency(seed, kind, k):
    game = random_game(np.random.default_rng(seed), kind, k)
    phi = engine_for(game)
    assert phi.sum() == pytest.approx(game.grand_value - game.u0, abs=TOL)


@SETTINGS
@given(seed=seeds, kind=KINDS, k=st.integers(2, 6), data=st.data())
def test_symmetry_duplicates_split(seed, kind, k, data):
    rng = np.random.default_rng(seed)
    i, j = data.draw(st.lists(st.integers(0, k - 1), min_size=2, max_size=2, unique=True))
    if kind == "sum_of_max":
        base = random_sum_of_max(rng, k, t=2, masked=False)
        scores = base.scores.copy()
        scores[:, j] = scores[:, i]  # candidate j duplicates candidate i
        game = SumOfMaxGame(scores, base.weights, base.floors)
    elif kind == "choice":
        values, attraction = random_scores(rng, (k,)), rng.normal(size=k)
        values[j], attraction[j] = values[i], attraction[i]
        game = ChoiceGame(values, attraction, 0.2, -0.1)
    else:
        inner = random_table_game(rng, k)

        def swap(s: frozenset[int]) -> frozenset[int]:
            return frozenset(j if p == i else i if p == j else p for p in s)

        game = CallableGame(lambda s: inner.fn(s) + inner.fn(swap(s)), k)  # symmetric in i and j
    phi = engine_for(game)
    assert phi[i] == pytest.approx(phi[j], abs=TOL)


@SETTINGS
@given(seed=seeds, kind=KINDS, k=st.integers(1, 6), data=st.data())
def test_null_player(seed, kind, k, data):
    rng = np.random.default_rng(seed)
    i = data.draw(st.integers(0, k - 1))
    if kind == "sum_of_max":
        base = random_sum_of_max(rng, k, t=2, masked=False)
        scores = base.scores.copy()
        scores[:, i] = base.floors - rng.random(2)  # at or below every floor: never adds value
        game = SumOfMaxGame(scores, base.weights, base.floors)
    elif kind == "choice":
        # Every present MNL candidate can draw the user (e^a > 0), so the choice game's null player is an
        # absent (masked) one.
        mask = np.ones(k, bool)
        mask[i] = False
        game = ChoiceGame(random_scores(rng, (k,)), rng.normal(size=k), 0.1, 0.2, mask)
    else:
        inner = random_table_game(rng, k)
        game = CallableGame(lambda s: inner.fn(s - {i}), k)
    phi = engine_for(game)
    assert phi[i] == pytest.approx(0.0, abs=TOL)
    if kind == "choice":  # the same game as a plain set function: the enumeration itself gives 0
        assert shapley_exact(as_callable(game))[i] == pytest.approx(0.0, abs=TOL)


@SETTINGS
@given(seed=seeds, kind=KINDS, k=st.integers(1, 6))
def test_additivity(seed, kind, k):
    rng = np.random.default_rng(seed)
    u, v = random_game(rng, kind, k), random_game(rng, kind, k)
    both = CallableGame(lambda s: u.fn(s) + v.fn(s) if kind == "callable" else None, k)
    if kind == "sum_of_max":
        # A sum of sum-of-max games is the sum-of-max game over the stacked targets.
        both = SumOfMaxGame(
            np.concatenate([u.scores, v.scores]),
            np.concatenate([u.weights, v.weights]),
            np.concatenate([u.floors, v.floors]),
        )
        assert np.allclose(
            shapley_closed_form(both), shapley_closed_form(u) + shapley_closed_form(v), atol=TOL
        )
    cu, cv = as_callable(u), as_callable(v)
    both = CallableGame(lambda s: cu.fn(s) + cv.fn(s), k)
    assert np.allclose(shapley_exact(both), engine_for(u) + engine_for(v), atol=TOL)


@settings(max_examples=20, deadline=None)
@given(seed=seeds, kind=KINDS, k=st.integers(1, 5))
def test_exact_matches_textbook_brute_force(seed, kind, k):
    game = as_callable(random_game(np.random.default_rng(seed), kind, k))
    assert np.allclose(shapley_exact(game), brute_force(game.fn, k), atol=TOL)


# ---- engines agree -------------------------------------------------------------------------------


@SETTINGS
@given(seed=seeds, k=st.integers(0, 7), t=st.integers(1, 4), batch=st.integers(1, 5))
def test_closed_form_equals_exact_batched_masked(seed, k, t, batch):
    game = random_sum_of_max(np.random.default_rng(seed), k, t=t, batch=batch, masked=True)
    closed = shapley_closed_form(game)
    assert closed.shape == (batch, k)
    assert np.allclose(closed, shapley_exact(game), atol=TOL, rtol=0)
    assert (closed[~game.mask] == 0).all()
    # Masking = removing: each row equals the closed form of the game restricted to its present players.
    for r in range(batch):
        present = game.mask[r]
        sub = SumOfMaxGame(game.scores[r][:, present], game.weights[r], game.floors[r])
        assert np.allclose(closed[r, present], shapley_closed_form(sub), atol=TOL)


@SETTINGS
@given(seed=seeds, k=st.integers(1, 6))
def test_exact_batched_choice_equals_unbatched(seed, k):
    game = random_choice(np.random.default_rng(seed), k, batch=3)
    batched = shapley_exact(game)
    for r in range(3):
        row = ChoiceGame(
            game.values[r],
            game.attraction[r],
            game.outside_attraction[r],
            game.outside_value[r],
            game.mask[r],
        )
        assert np.allclose(batched[r], shapley_exact(row), atol=TOL)
    assert (batched[~game.mask] == 0).all()


def test_max_game_kernel_against_brute_force_with_ties():
    gains = np.array([[0.0, 2.0, 2.0, 1.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0, 3.0]])
    got = shapley_max_games(gains)
    for r in range(3):
        expected = brute_force(lambda s, r=r: max([0.0, *[gains[r, j] for j in s]]), 5)
        assert np.allclose(got[r], expected, atol=1e-12)
    assert got[0, 1] == got[0, 2] and got[0, 0] == 0.0 and got[0, 4] == 0.0


@pytest.mark.parametrize("k", [3, 32, 33, 60])  # both sides of the matmul / cumsum switch
def test_max_game_kernel_against_sorted_formula(k):
    rng = np.random.default_rng(k)
    gains = np.where(rng.random((6, k)) < 0.3, 0.0, rng.choice([0.5, 1.0, 2.0], (6, k)) + rng.random((6, k)))
    gains[0, : k // 2] = 1.0  # a block of ties
    got = shapley_max_games(gains)
    for r in range(6):
        expected = np.zeros(k)
        prev, running = 0.0, 0.0
        for pos, player in enumerate(np.argsort(gains[r], kind="stable")):
            running += (gains[r, player] - prev) / (k - pos)
            prev = gains[r, player]
            expected[player] = running
        assert np.allclose(got[r], expected, atol=1e-12)
        assert got[r].sum() == pytest.approx(gains[r].max())
    assert (got[gains == 0] == 0).all()
    assert np.unique(got[0, : k // 2]).size == 1  # ties: exactly equal credit


def sorted_formula(gains: np.ndarray) -> np.ndarray:
    """The max-game closed form row by row in plain Python (stable argsort, running sum): the reference."""
    out = np.zeros_like(gains)
    k = gains.shape[1]
    for r, row in enumerate(gains):
        prev, running = 0.0, 0.0
        for pos, player in enumerate(np.argsort(row, kind="stable")):
            running += (row[player] - prev) / (k - pos)
            prev = row[player]
            out[r, player] = running
    return out


def hard_gains(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """Gains >= 0 with ties, zeros, -0.0, values one ulp apart and tiny/huge ones: the packed sort's traps."""
    pool = np.array([0.0, -0.0, 1.0, np.nextafter(1.0, 2.0), np.nextafter(1.0, 0.0), 0.5, 3.0, 1e-300, 1e300])
    gains = np.where(rng.random((rows, k)) < 0.6, rng.choice(pool, (rows, k)), rng.random((rows, k)))
    gains[0] = 1.0  # a row of exact ties
    if k > 1:
        gains[1, :2] = [np.nextafter(1.0, 2.0), 1.0]  # equal once the index bits are cleared, then swapped
    return gains


@pytest.mark.parametrize("k", [1, 2, 3, 8, 9, 33, 40, 60])
def test_max_game_kernel_fast_path_equals_general_path(k, monkeypatch):
    """Packed-key sort, chunking and row fix-up give exactly what an argsort of every row gives."""
    import shapegrpo_core.shapley as shapley_module

    gains = hard_gains(np.random.default_rng(k), 300, k)
    fast = shapley_max_games(gains)
    monkeypatch.setattr(shapley_module, "_KERNEL_CHUNK_ELEMENTS", 7 * k)  # 7 rows a chunk, a partial last one
    chunked = shapley_max_games(gains)
    monkeypatch.setattr(shapley_module, "_MAX_INDEX_BITS", 0)  # every row through np.argsort instead
    monkeypatch.setattr(shapley_module, "_COLUMN_LOOP_MAX_PLAYERS", 100 if k > 48 else 1)  # the other sum
    general = shapley_max_games(gains)
    assert np.array_equal(fast, general) and np.array_equal(chunked, general)
    scale = np.maximum(np.abs(gains).max(axis=1, keepdims=True), 1e-300)  # rows span 1e-300 .. 1e300
    reference = sorted_formula(gains)
    assert np.allclose(fast / scale, reference / scale, atol=1e-12, rtol=0)
    assert (fast[gains == 0] == 0).all()
    assert np.unique(fast[0]).size == 1  # a row of ties: exactly equal credit


def test_max_game_kernel_one_ulp_apart():
    a, b = np.nextafter(1.0, 2.0), 1.0  # identical but for the lowest mantissa bit, the larger one first
    got = shapley_max_games(np.array([[a, b], [b, a]]))
    assert got.tolist() == [[b / 2 + (a - b), b / 2], [b / 2, b / 2 + (a - b)]]


def test_max_game_kernel_negative_gains_match_general_path(monkeypatch):
    # Outside the documented y >= 0 the kernel still returns what the sort-based formula gives.
    import shapegrpo_core.shapley as shapley_module

    gains = np.random.default_rng(3).normal(size=(50, 6))
    fast = shapley_max_games(gains)
    monkeypatch.setattr(shapley_module, "_MAX_INDEX_BITS", 0)
    assert np.array_equal(fast, shapley_max_games(gains))
    assert np.allclose(fast, sorted_formula(gains), atol=1e-12)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=seeds, k=st.integers(1, 6), t=st.integers(1, 3), batch=st.integers(1, 4))
def test_public_closed_form_equals_brute_force(seed, k, t, batch):
    """shapley_values on batched games (ties, masks, floors, weights, T >= 1) vs the textbook formula."""
    rng = np.random.default_rng(seed)
    game = random_sum_of_max(rng, k, t=t, batch=batch, masked=True)
    bos = best_of_set(random_scores(rng, (batch, k)), floor=rng.choice([0.0, 0.5], batch), mask=game.mask)
    for g in (game, bos):
        phi = shapley_values(g).values  # (B, K)
        for r in range(batch):
            row = g.take_batch(slice(r, r + 1))

            def value(s, row=row):
                return float(row.value(np.isin(np.arange(k), list(s))[None])[0, 0])

            assert np.allclose(phi[r], brute_force(value, k), atol=TOL)


def test_public_best_of_set_shortcut_equals_general_route():
    """Non-negative scores, no floor, no weights, no mask: the no-copy gains shortcut changes nothing."""
    u = hard_gains(np.random.default_rng(7), 500, 8)
    u[u > 1e299] = 7.0  # keep 2·u finite
    fast = shapley_values(best_of_set(u))
    assert fast.engine == "closed_form"
    # The same gains through the general route: weights (0.5 · 2u = u exactly), then a masked-out pad column.
    weighted = SumOfMaxGame(2.0 * u[:, None, :], weights=np.full((500, 1), 0.5))
    assert not weighted._gains_are_scores
    assert np.array_equal(fast.values, shapley_values(weighted).values)
    padded = np.concatenate([u, np.full((500, 1), np.nan)], axis=1)
    mask = np.concatenate([np.ones((500, 8), bool), np.zeros((500, 1), bool)], axis=1)
    phi_padded = shapley_values(best_of_set(padded, mask=mask)).values
    assert (phi_padded[:, 8] == 0).all()
    assert np.allclose(fast.values, phi_padded[:, :8], atol=1e-12, rtol=1e-12)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=seeds, kind=KINDS, k=st.integers(1, 7))
def test_monte_carlo_within_four_standard_errors(seed, kind, k):
    game = random_game(np.random.default_rng(seed), kind, k)
    exact = shapley_exact(game)
    est, se = shapley_monte_carlo(game, num_permutations=200, seed=seed)
    assert est.sum() == pytest.approx(game.grand_value - game.u0, abs=TOL)  # exactly efficient
    assert (np.abs(est - exact) <= 4 * se + 1e-9).all()


def test_monte_carlo_batched_masked_and_deterministic():
    rng = np.random.default_rng(7)
    game = random_sum_of_max(rng, 6, t=2, batch=4)
    exact = shapley_exact(game)
    est, se = shapley_monte_carlo(game, num_permutations=400, seed=3)
    assert est.shape == se.shape == (4, 6)
    assert (np.abs(est - exact) <= 4 * se + 1e-9).all()
    assert (est[~game.mask] == 0).all() and (se[~game.mask] == 0).all()
    again, _ = shapley_monte_carlo(game, num_permutations=400, seed=3)
    other, _ = shapley_monte_carlo(game, num_permutations=400, seed=4)
    assert np.array_equal(est, again) and not np.array_equal(est, other)
    # More permutations, smaller error.
    _, se_big = shapley_monte_carlo(game, num_permutations=4000, seed=3)
    assert se_big[game.mask].mean() < se[game.mask].mean()


def test_antithetic_pairs_are_reverses():
    perms = antithetic_permutations(5, 8, seed=0)
    assert perms.shape == (8, 5)
    assert (np.sort(perms, axis=1) == np.arange(5)).all()
    assert (perms[1::2] == perms[0::2, ::-1]).all()
    for bad in (0, 2, 7):
        with pytest.raises(ValueError, match="even"):
            antithetic_permutations(5, bad, seed=0)


# ---- engine choice and bad input -----------------------------------------------------------------


def test_engine_selection_and_reporting():
    assert shapley_values(best_of_set([1.0, 2.0])).engine == "closed_form"
    choice = ChoiceGame([1.0, 2.0], [0.0, 0.0])
    assert shapley_values(choice).engine == "exact"
    assert shapley_values(choice).stderr is None
    big = CallableGame(lambda s: float(len(s) > 10), 20)
    res = shapley_values(big, num_permutations=64, seed=1)
    assert res.engine == "monte_carlo" and res.stderr is not None and res.values.shape == (20,)
    assert res.values.sum() == pytest.approx(1.0)
    assert (np.abs(res.values - 1 / 20) <= 4 * res.stderr + 1e-9).all()  # symmetric game: exact phi = 1/20
    small = CallableGame(lambda s: float(len(s)), 4)
    assert shapley_values(small, max_exact_players=3, num_permutations=8).engine == "monte_carlo"
    assert shapley_values(best_of_set([1.0, 2.0]), engine="exact").engine == "exact"


def test_bad_engine_requests():
    with pytest.raises(ValueError, match="monte_carlo"):
        shapley_exact(CallableGame(lambda s: 0.0, 17))
    with pytest.raises(ValueError, match="monte_carlo"):
        shapley_values(best_of_set(np.zeros(17)), engine="exact")
    with pytest.raises(ValueError, match="closed form"):
        shapley_values(ChoiceGame([1.0], [0.0]), engine="closed_form")
    with pytest.raises(ValueError, match="unknown engine"):
        shapley_values(best_of_set([1.0]), engine="fast")
    with pytest.raises(ValueError, match="max_exact_players"):
        shapley_values(best_of_set([1.0]), max_exact_players=20)
    with pytest.raises(ValueError, match="SumOfMaxGame"):
        shapley_values(np.zeros(3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="even"):
        shapley_values(CallableGame(lambda s: 0.0, 3), engine="monte_carlo", num_permutations=5)


def test_closed_form_scales_to_many_players():
    rng = np.random.default_rng(0)
    u = rng.random(200)
    phi = shapley_values(best_of_set(u)).values  # far beyond exact enumeration
    assert phi.sum() == pytest.approx(u.max())
    assert np.argmax(phi) == np.argmax(u) and (np.diff(phi[np.argsort(u)]) >= -1e-15).all()


# ---- leave-one-out -------------------------------------------------------------------------------


@SETTINGS
@given(seed=seeds, k=st.integers(0, 6), batch=st.integers(1, 3))
def test_leave_one_out_fast_path_matches_definition(seed, k, batch):
    game = random_sum_of_max(np.random.default_rng(seed), k, t=2, batch=batch)
    values = game.all_values()  # (B, 2^K)
    full = (1 << k) - 1
    expected = np.zeros((batch, k))
    for i in range(k):
        expected[:, i] = values[:, full] - values[:, full & ~(1 << i)]
    expected = np.where(game.mask, expected, 0.0)
    assert np.allclose(leave_one_out(game), expected, atol=TOL)
    generic = CallableGame(
        lambda s: float(game.take_batch(slice(0, 1)).value(np.isin(np.arange(k), list(s))[None])[0, 0]), k
    )
    assert np.allclose(leave_one_out(generic), expected[0], atol=TOL)


def test_leave_one_out_is_blind_to_duplicates():
    assert leave_one_out(best_of_set([0.9, 0.9, 0.3, 0.0])).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert np.allclose(leave_one_out(best_of_set([1.0, 3.0])), [0.0, 2.0])


def test_coalition_matrix_drives_exact_engine():
    # The exact engine reads game.all_values() in bitmask order; check that order against value().
    game = random_choice(np.random.default_rng(1), 4)
    assert np.allclose(game.all_values(), game.value(coalition_matrix(4)))


def test_closed_form_spanning_several_blocks_equals_exact_with_ties_masks_and_floors() -> None:
    """Large batches go through the blocked kernel; every block (and the ragged last one) must be exact."""
    from shapegrpo_core.shapley import _KERNEL_CHUNK_ELEMENTS as _BLOCK_ELEMENTS

    rng = np.random.default_rng(7)
    k, t = 5, 2
    b = 3 * (_BLOCK_ELEMENTS // (k * t)) + 17  # several blocks and a partial one
    scores = rng.choice([0.0, 0.25, 0.5, 1.0], size=(b, t, k))  # many ties
    floors = rng.choice([0.0, 0.25], size=(b, t))
    mask = rng.uniform(size=(b, k)) < 0.8
    game = SumOfMaxGame(scores, weights=rng.uniform(0, 2, size=(b, t)), floors=floors, mask=mask)
    phi = shapley_closed_form(game)
    rows = np.r_[0:40, b - 40 : b]  # the first block and the ragged last one
    np.testing.assert_allclose(phi[rows], shapley_exact(game.take_batch(rows)), atol=1e-12)
    np.testing.assert_allclose(phi.sum(axis=1), game.grand_value - game.u0, atol=1e-9)
    assert (phi[~mask] == 0).all()
