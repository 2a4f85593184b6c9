"""Shapley values of candidate-set games (docs/method.md): closed form, exact enumeration, Monte Carlo.

phi_i = sum_{S ⊆ N∖{i}} |S|!(K−|S|−1)!/K! · (U(S∪{i}) − U(S)).

* ``shapley_closed_form`` — sum-of-max games only. By additivity phi = sum_t phi(max game of target t),
  and a max game with gains sorted ascending 0 = v(0) <= v(1) <= … <= v(K) has

      phi_(k) = sum_{j<=k} (v(j) − v(j−1)) / (K−j+1)

  (player (k) shares each increment with the K−j+1 players at least as good). O(T·K log K), vectorised.
* ``shapley_exact`` — any game, all 2^K coalitions at once (K <= 16).
* ``shapley_monte_carlo`` — any game, antithetic permutation sampling, with a standard error.
* ``shapley_values`` — picks the engine and says which one it used.

Absent (masked) players get phi = 0 in every engine. Every engine takes batched games ((B, K) results).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from shapegrpo_core.games import CallableGame, ChoiceGame, Game, SumOfMaxGame, coalition_matrix

ENGINES = ("auto", "closed_form", "exact", "monte_carlo")
MAX_EXACT_PLAYERS = 16
DEFAULT_NUM_PERMUTATIONS = 512
# Element budget (float64 entries) of one vectorised chunk of games; keeps the exact and Monte-Carlo engines
# around a few hundred MB at most whatever the batch size.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True, eq=False)
class ShapleyResult:
    """Shapley values (K,) or (B, K), the engine that computed them, and a standard error (Monte Carlo)."""

    values: np.ndarray
    engine: str
    stderr: np.ndarray | None = None


def _check_game(game: object) -> None:
    if not isinstance(game, (SumOfMaxGame, ChoiceGame, CallableGame)):
        raise ValueError(f"expected a SumOfMaxGame, ChoiceGame or CallableGame, got {type(game).__name__}")


def _zero_absent(phi: np.ndarray, game: Game) -> np.ndarray:
    mask = game.mask
    if not mask.all():
        phi = np.where(mask, phi, 0.0)
    return phi


# --------------------------------------------------------------------------------------------------
# Closed form (sum-of-max games)
# --------------------------------------------------------------------------------------------------


# The sort carries each player's index in the low mantissa bits of its gain (see _sort_rows); this many
# index bits at most, so that the order is exact for all but values within 2^-(52 - bits) of each other.
_MAX_INDEX_BITS = 16
# Rows of one chunk of the max-game kernel, in float64 entries: four such buffers (keys, sorted gains,
# increments, the output slice) stay in the per-core cache, where each elementwise pass is several times
# faster than over main memory, and are reused from chunk to chunk instead of faulting in fresh pages.
_KERNEL_CHUNK_ELEMENTS = 1 << 15
# Up to this many players the running sum over sorted positions is a loop over columns; beyond, np.cumsum
# along the rows is faster (both add in the same order, so the results are identical).
_COLUMN_LOOP_MAX_PLAYERS = 48


@functools.lru_cache(maxsize=16)
def _chunk_patterns(num_rows: int, num_players: int) -> tuple[np.ndarray, np.ndarray]:
    """(column index, row offset) of every entry of a flat (R·K,) chunk, read-only int64.

    Full-length operands instead of broadcast (K,) / (R, 1) ones: numpy then runs one contiguous inner loop
    over the chunk rather than one short loop per row.
    """
    columns = np.tile(np.arange(num_players, dtype=np.int64), num_rows)
    offsets = np.repeat(np.arange(0, num_rows * num_players, num_players, dtype=np.int64), num_players)
    columns.setflags(write=False)
    offsets.setflags(write=False)
    return columns, offsets


def _sort_rows(gains: np.ndarray, flat: np.ndarray) -> None:
    """Write into ``flat`` (R·K,) the flat indices into ``gains.ravel()`` that list each row (R, K) ascending.

    One in-place integer sort instead of an argsort (about twice the cost of a sort): for y >= 0 the int64
    view of a float64 is ordered like the float, so replacing its low ``bits`` mantissa bits by the column
    index and sorting the integers yields the permutation directly. Two gains that differ only in those low
    bits may come out swapped; the caller checks that the gathered values are non-decreasing and re-sorts
    such rows exactly (``_fix_unsorted_rows``), so the result is always a true ascending order.
    """
    num_rows, k = gains.shape
    columns, offsets = _chunk_patterns(num_rows, k)
    bits = max(1, (k - 1).bit_length())
    if bits > _MAX_INDEX_BITS:
        flat.reshape(num_rows, k)[...] = np.argsort(gains, axis=1)
    else:
        np.bitwise_and(gains.view(np.int64).reshape(-1), np.int64(-(1 << bits)), out=flat)  # value bits only
        flat |= columns  # the column index in the cleared low bits
        flat.reshape(num_rows, k).sort(axis=1)
        flat &= (1 << bits) - 1  # -> the column of the j-th smallest gain
    flat += offsets  # -> flat indices


def _fix_unsorted_rows(
    gains: np.ndarray, flat: np.ndarray, sorted_gains: np.ndarray, rows: np.ndarray
) -> None:
    """Re-sort ``rows`` exactly (argsort): their packed-key order swapped near-equal gains; in place."""
    k = gains.shape[1]
    order = np.argsort(gains[rows], axis=1) + (rows * k)[:, None]  # (r, K) flat indices
    flat.reshape(-1, k)[rows] = order
    sorted_gains.reshape(-1, k)[rows] = gains.ravel()[order]


@functools.lru_cache(maxsize=16)
def _shares(num_rows: int, num_players: int) -> np.ndarray:
    """(R·K,): K − j at sorted position j of every row, the number of players sharing that increment."""
    out = np.tile(num_players - np.arange(num_players, dtype=np.float64), num_rows)
    out.setflags(write=False)
    return out


def _increments(sorted_gains: np.ndarray, k: int, out: np.ndarray) -> None:
    """v_j − v_{j−1} along each row of the flat sorted gains (R·K,), with v_{−1} = 0."""
    # One contiguous subtraction over the flat array, then each row's first entry. Exact differences keep
    # ties and floor players at exactly equal / zero credit.
    np.subtract(sorted_gains[1:], sorted_gains[:-1], out=out[1:])
    out[::k] = sorted_gains[::k]


def _max_games_chunk(
    y: np.ndarray, out: np.ndarray, flat: np.ndarray, sv: np.ndarray, inc: np.ndarray
) -> None:
    """Shapley values of the max games y (n, K) into out (n, K); flat, sv, inc: scratch of n·K entries."""
    n, k = y.shape
    _sort_rows(y, flat)
    np.take(y.ravel(), flat, out=sv, mode="clip")  # exact sorted gains; indices in range by construction
    _increments(sv, k, inc)
    inc_2d = inc.reshape(n, k)
    # One contiguous min over all increments (each row's first entry is its smallest gain, >= 0 for y >= 0);
    # only if it is negative, find the rows that are out of order: near-equal gains swapped by the packed
    # sort (rare), or rows with more than one negative gain (outside the documented y >= 0).
    if inc.min() < 0:
        bad = np.flatnonzero((inc_2d[:, 1:] < 0).any(axis=1))
        if bad.size:
            _fix_unsorted_rows(y, flat, sv, bad)
            _increments(sv, k, inc)
    inc /= _shares(n, k)  # the K − j players at least as good share the increment at position j equally
    # Running sum over positions, one column at a time: the same additions in the same order for every game
    # whatever the chunk or batch (a matrix product would not: BLAS rounds edge rows differently), and no
    # per-row inner loop (np.cumsum along a short axis is several times slower).
    credit = sv.reshape(n, k)  # reuse the buffer: the sorted gains are no longer needed
    if k > _COLUMN_LOOP_MAX_PLAYERS:  # long rows: cumsum's per-row loop is amortised (same sums, same order)
        np.cumsum(inc_2d, axis=1, out=credit)
    else:
        credit[:, 0] = inc_2d[:, 0]
        for j in range(1, k):
            np.add(credit[:, j - 1], inc_2d[:, j], out=credit[:, j])
    out.reshape(-1)[flat] = sv  # scatter back: the player at sorted position j gets credit[:, j]


def shapley_max_games(gains: np.ndarray) -> np.ndarray:
    """Shapley values of R independent max games U(S) = max(0, max_{j∈S} y_j); gains (R, K), y >= 0 -> (R, K).

    In 0-based sorted positions, phi_(k) = sum_{j<=k} (v_j − v_{j−1}) / (K − j) with v_{−1} = 0. A player with
    gain 0 (at the floor, or absent) sorts first and gets exactly 0; tied players get equal credit (their
    increments are exactly 0). Absent players need no special care: placed first at gain 0, the denominator
    K − j at padded position j equals K_eff − j' at the player's position j' among the K_eff present ones.
    """
    num_rows, k = gains.shape
    phi = np.empty((num_rows, k))
    if k == 0 or num_rows == 0:
        phi[...] = 0.0
        return phi
    y = np.ascontiguousarray(gains, dtype=np.float64)
    rows = max(1, _KERNEL_CHUNK_ELEMENTS // k)
    size = min(rows, num_rows) * k
    flat, sv, inc = np.empty(size, dtype=np.int64), np.empty(size), np.empty(size)
    for start in range(0, num_rows, rows):
        stop = min(num_rows, start + rows)
        n = (stop - start) * k
        _max_games_chunk(y[start:stop], phi[start:stop], flat[:n], sv[:n], inc[:n])
    return phi


def shapley_closed_form(game: SumOfMaxGame) -> np.ndarray:
    """Exact Shapley values of a sum-of-max game in O(T·K log K) per game; (K,) or (B, K)."""
    if not isinstance(game, SumOfMaxGame):
        raise ValueError(
            f"the closed form exists only for SumOfMaxGame, got {type(game).__name__}; use engine='exact' or "
            "'monte_carlo'"
        )
    y = game.gains()  # (..., T, K); weights are folded in: w·max(b, s) − w·b = max(0, w·(s − b)) for w >= 0
    k, t = game.num_players, game.num_targets
    per_target = shapley_max_games(y.reshape(math.prod(y.shape[:-1]), k))  # (prod(batch)·T, K)
    if t == 1:
        phi = per_target.reshape(*game.batch_shape, k)
    else:
        phi = per_target.reshape(*game.batch_shape, t, k).sum(axis=-2)  # additivity over targets
    if not game._all_present:
        assert (phi[~game.mask] == 0).all(), "absent players must get zero credit"
    return phi


# --------------------------------------------------------------------------------------------------
# Exact enumeration (any game, K <= 16)
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _exact_weights(num_players: int) -> np.ndarray:
    """(2^(K−1),): w[r] = |S|!(K−|S|−1)!/K! for the subset S with index r of the K−1 players other than i."""
    k = num_players
    sizes = coalition_matrix(k - 1).sum(axis=1)  # |S| for every subset of the other K−1 players
    per_size = np.array([1.0 / (k * math.comb(k - 1, s)) for s in range(k)])
    w = per_size[sizes]
    w.setflags(write=False)
    return w


def _batch_chunks(game: Game, per_game_elements: int) -> list[tuple[slice, Game]]:
    if not game.batch_shape:
        return [(slice(None), game)]
    batch = game.batch_shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(1, per_game_elements))
    return [(slice(i, i + step), game.take_batch(slice(i, i + step))) for i in range(0, batch, step)]


def shapley_exact(game: Game) -> np.ndarray:
    """Shapley values by enumerating all 2^K coalitions; (K,) or (B, K). K <= 16, else ValueError."""
    _check_game(game)
    k = game.num_players
    if k > MAX_EXACT_PLAYERS:
        raise ValueError(
            f"exact enumeration needs K <= {MAX_EXACT_PLAYERS} players (2^K coalitions), got K={k}; use "
            "engine='monte_carlo' (shapley_monte_carlo) or, for a SumOfMaxGame, engine='closed_form'"
        )
    out = np.zeros((*game.batch_shape, k))
    if k == 0:
        return out
    weights = _exact_weights(k)  # (2^(K−1),)
    targets = game.num_targets if isinstance(game, SumOfMaxGame) else 1
    for where, chunk in _batch_chunks(game, 2 * (2**k) * max(1, targets)):
        u = chunk.all_values().reshape(-1, 2**k)  # (b, 2^K) in bitmask order
        rows = u.shape[0]
        phi = np.empty((rows, k))
        for i in range(k):  # loop over players, not games: pair each S ∌ i with S ∪ {i}
            pairs = u.reshape(rows, 2 ** (k - 1 - i), 2, 2**i)  # axis 2 = bit i
            marginal = (pairs[:, :, 1, :] - pairs[:, :, 0, :]).reshape(rows, -1)  # (b, 2^(K−1))
            phi[:, i] = marginal @ weights  # remaining-bit index order = subset index of the other players
        out[where] = phi.reshape(out[where].shape)
    return _zero_absent(out, game)


# --------------------------------------------------------------------------------------------------
# Permutation Monte Carlo (any game, any K)
# --------------------------------------------------------------------------------------------------


def antithetic_permutations(num_players: int, num_permutations: int, seed: int) -> np.ndarray:
    """(P, K) permutations; rows 2p and 2p+1 are a random permutation and its reverse."""
    if num_permutations < 4 or num_permutations % 2:
        raise ValueError(
            "num_permutations must be even and >= 4 (antithetic pairs; the standard error needs >= 2 "
            f"pairs), got {num_permutations}"
        )
    rng = np.random.default_rng(seed)
    half = rng.permuted(np.tile(np.arange(num_players), (num_permutations // 2, 1)), axis=1)  # (P/2, K)
    perms = np.empty((num_permutations, num_players), dtype=np.int64)
    perms[0::2] = half
    perms[1::2] = half[:, ::-1]
    return perms


def shapley_monte_carlo(
    game: Game, num_permutations: int = DEFAULT_NUM_PERMUTATIONS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Permutation-sampling estimate of the Shapley values and its standard error, each (K,) or (B, K).

    Antithetic sampling: each permutation is paired with its reverse (a player early in one is late in the
    other, which cancels much of the variance of max-like games). The standard error is that of the mean of
    the P/2 pair means. Every permutation's marginals sum to U(N) − u0, so the estimate is exactly efficient.
    The same permutations serve every game of a batch.
    """
    _check_game(game)
    k = game.num_players
    perms = antithetic_permutations(k, num_permutations, seed)  # (P, K)
    values = np.zeros((*game.batch_shape, k))
    stderr = np.zeros((*game.batch_shape, k))
    if k == 0:
        return values, stderr
    p = num_permutations
    position = np.argsort(perms, axis=1)  # (P, K): position of player j in permutation p
    # Prefix coalitions: prefix m of permutation p holds the players at positions < m, for m = 0..K.
    prefixes = position[:, None, :] < np.arange(k + 1)[None, :, None]  # (P, K+1, K)
    prefixes = prefixes.reshape(p * (k + 1), k)
    targets = game.num_targets if isinstance(game, SumOfMaxGame) else 1
    for where, chunk in _batch_chunks(game, p * (k + 1) * k * max(1, targets)):
        u = chunk.value(prefixes).reshape(-1, p, k + 1)  # (b, P, K+1)
        step = np.diff(u, axis=-1)  # (b, P, K): marginal of the player at each position
        marginal = np.take_along_axis(step, np.broadcast_to(position, step.shape), axis=-1)  # per player
        pair_means = marginal.reshape(-1, p // 2, 2, k).mean(axis=2)  # (b, P/2, K)
        est = pair_means.mean(axis=1)
        se = pair_means.std(axis=1, ddof=1) / math.sqrt(p // 2)
        values[where] = est.reshape(values[where].shape)
        stderr[where] = se.reshape(stderr[where].shape)
    return _zero_absent(values, game), _zero_absent(stderr, game)


# --------------------------------------------------------------------------------------------------
# Leave-one-out marginals (the "loo" ablation)
# --------------------------------------------------------------------------------------------------


def leave_one_out(game: Game) -> np.ndarray:
    """Raw marginals m_i = U(N) − U(N∖{i}), (K,) or (B, K), 0 for absent players; not efficient."""
    _check_game(game)
    k = game.num_players
    if isinstance(game, SumOfMaxGame):
        # Only the best player of a target loses anything when removed: best − second best (0 when tied).
        y = game.gains()  # (..., T, K)
        if k == 0:
            return np.zeros((*game.batch_shape, 0))
        top = np.sort(y, axis=-1)[..., -2:] if k > 1 else np.concatenate([np.zeros_like(y), y], axis=-1)
        best, second = top[..., -1:], top[..., :1]
        m = np.where(y == best, best - second, 0.0).sum(axis=-2)
        return _zero_absent(m, game)
    full = np.ones((k + 1, k), dtype=bool)
    full[np.arange(1, k + 1), np.arange(k)] = False  # row 0: N; row i+1: N∖{i}
    u = game.value(full)  # (..., K+1)
    return _zero_absent(u[..., :1] - u[..., 1:], game)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def resolve_engine(game: Game, engine: str = "auto", max_exact_players: int = MAX_EXACT_PLAYERS) -> str:
    """The engine ``shapley_values`` uses: closed form if the game has one, exact for small K, else MC."""
    _check_game(game)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    if not 0 <= max_exact_players <= MAX_EXACT_PLAYERS:
        raise ValueError(f"max_exact_players must be in [0, {MAX_EXACT_PLAYERS}], got {max_exact_players}")
    if engine != "auto":
        return engine
    if isinstance(game, SumOfMaxGame):
        return "closed_form"
    return "exact" if game.num_players <= max_exact_players else "monte_carlo"


def shapley_values(
    game: Game,
    engine: str = "auto",
    max_exact_players: int = MAX_EXACT_PLAYERS,
    num_permutations: int = DEFAULT_NUM_PERMUTATIONS,
    seed: int = 0,
) -> ShapleyResult:
    """Shapley values of ``game``, (K,) or (B, K), with the engine used and (Monte Carlo) the stderr."""
    chosen = resolve_engine(game, engine, max_exact_players)
    if chosen == "closed_form":
        return ShapleyResult(shapley_closed_form(game), "closed_form", None)  # type: ignore[arg-type]
    if chosen == "exact":
        return ShapleyResult(shapley_exact(game), "exact", None)
    values, stderr = shapley_monte_carlo(game, num_permutations=num_permutations, seed=seed)
    return ShapleyResult(values, "monte_carlo", stderr)
