"""Cooperative games over a set of K candidates (docs/method.md).

A game is a set function U(S) for S ⊆ {0..K-1}: the set-level utility of showing the candidates in S.
Three kinds:

* :class:`SumOfMaxGame` — U(S) = sum_t w_t · max(b_t, max_{j∈S} s_tj). Covers best-of-set (T = 1), coverage
  (binary scores) and facility location (soft coverage). Its Shapley values have a closed form (shapley.py).
* :class:`ChoiceGame` — a multinomial-logit user with an outside option; U(S) is the expected value of
  what the user picks from S ∪ {outside}.
* :class:`CallableGame` — any Python function of a frozenset of candidate indices.

Every game exposes the same small interface, which the Shapley engines rely on:

* ``num_players`` (K; for batched games the padded K), ``batch_shape`` (``()`` or ``(B,)``), ``mask`` (which
  players are present: a player that is masked out is *absent* from the game and never changes its value),
* ``u0`` (value of the empty set), ``grand_value`` (value of all present players, the set reward R),
* ``value(coalitions)``: bool coalitions ``(..., M, K)`` -> values ``(..., M)``,
* ``all_values()``: the values of all 2^K coalitions ``(..., 2^K)`` in bitmask order (bit i of the
  index = player i), computed without materialising the (2^K, K) coalition matrix where the structure
  allows it.

Sum-of-max and choice games can be batched (a leading B axis, with a (B, K) mask padding responses that have
fewer than K candidates); callable games are not.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Attraction spread (in nats) beyond which exp() of the MNL weights would underflow/overflow in float64.
MAX_ATTRACTION_SPAN = 700.0


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def coalition_matrix(num_players: int) -> np.ndarray:
    """All 2^K coalitions as a read-only bool matrix (2^K, K); row m holds player i iff bit i of m is set."""
    if num_players < 0 or num_players > 24:
        raise ValueError(f"coalition_matrix needs 0 <= K <= 24, got K={num_players}")
    m = np.arange(2**num_players, dtype=np.int64)[:, None]  # (2^K, 1)
    bits = (m >> np.arange(num_players, dtype=np.int64)[None, :]) & 1  # (2^K, K)
    out = bits.astype(bool)
    out.setflags(write=False)
    return out


def _is_frozen(arr: np.ndarray) -> bool:
    """True if ``arr`` and every array it views are read-only and own no writable memory.

    Such an array cannot change under a game that shares it (short of someone re-enabling writes on purpose),
    so a game may keep it without a private copy: other games' fields, and the copies our own constructors
    already made, are never copied twice.
    """
    a: object = arr
    while isinstance(a, np.ndarray):
        if a.flags.writeable:
            return False
        a = a.base
    return a is None


def _float_array(name: str, x: object) -> np.ndarray:
    """A float64 array of ``x`` that nobody else can write: a private copy unless ``x`` already is frozen."""
    if isinstance(x, np.ndarray) and x.dtype == np.float64 and _is_frozen(x):
        return x
    try:
        arr = np.array(x, dtype=np.float64)  # a private copy: games are immutable
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numeric, got {type(x).__name__}: {err}") from err
    return arr


def _finite_range(arr: np.ndarray) -> tuple[float, float] | None:
    """(min, max) of ``arr`` if all entries are finite, else None; one reduction each (they propagate NaN)."""
    if arr.size == 0:
        return (0.0, 0.0)
    lo, hi = float(arr.min()), float(arr.max())
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


def _target_array(name: str, x: object, scores_shape: tuple[int, ...]) -> np.ndarray:
    """Per-target weights or floors: finite, of shape ``scores_shape[:-1]``."""
    arr = _float_array(name, x)
    if arr.shape != scores_shape[:-1]:
        raise ValueError(
            f"{name} has shape {arr.shape}, expected {scores_shape[:-1]} (scores are {scores_shape})"
        )
    if _finite_range(arr) is None:
        raise ValueError(f"{name} must be finite")
    return arr


def _mask_array(mask: object, shape: tuple[int, ...]) -> np.ndarray:
    """A bool mask of ``shape`` (all True when ``mask`` is None)."""
    if mask is None:
        out = np.ones(shape, dtype=bool)
    else:
        raw = np.asarray(mask)
        if raw.dtype != bool:
            if raw.size and not np.isin(raw, (0, 1)).all():
                raise ValueError("mask must be boolean (or 0/1)")
            raw = raw.astype(bool)
        if raw.shape != shape:
            raise ValueError(f"mask has shape {raw.shape}, expected {shape}")
        out = raw.copy()
    out.setflags(write=False)
    return out


def _per_row(name: str, x: object, batch_shape: tuple[int, ...], fill: float) -> np.ndarray:
    """A scalar, or an array of shape ``batch_shape`` -> float array of shape ``batch_shape``."""
    arr = _float_array(name, fill if x is None else x)
    if arr.ndim == 0:
        arr = np.full(batch_shape, float(arr))
    if arr.shape != batch_shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected a scalar or {batch_shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {arr}")
    return arr


def _check_coalitions(coalitions: object, num_players: int) -> np.ndarray:
    c = np.asarray(coalitions)
    if c.dtype != bool:
        if c.size and not np.isin(c, (0, 1)).all():
            raise ValueError("coalitions must be boolean (or 0/1) arrays")
        c = c.astype(bool)
    if c.ndim < 1 or c.shape[-1] != num_players:
        raise ValueError(f"coalitions must have shape (..., K={num_players}), got {c.shape}")
    return c


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


# --------------------------------------------------------------------------------------------------
# Sum-of-max games
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SumOfMaxGame:
    """U(S) = sum_t w_t · max(b_t, max_{j∈S} s_tj), u0 = sum_t w_t b_t.

    scores: (T, K) or batched (B, T, K); weights w: (T,) or (B, T), >= 0, default 1; floors b: (T,) or (B, T),
    default 0 (scores below the floor count as the floor); mask: (K,) or (B, K) bool, default all present.
    Scores of masked (absent) players are ignored, so padding may hold anything, NaN included; scores of
    present players must be finite. After construction every field is a read-only float64/bool array of full
    shape.
    """

    scores: np.ndarray
    weights: np.ndarray | None = None
    floors: np.ndarray | None = None
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        s = _float_array("scores", self.scores)
        if s.ndim not in (2, 3):
            raise ValueError(f"scores must have shape (T, K) or (B, T, K), got {s.shape}")
        batch, num_players = s.shape[:-2], s.shape[-1]
        default_weights, default_floors = self.weights is None, self.floors is None
        # Defaults need no checks (and no passes over them): unit weights, zero floors.
        w = np.ones(s.shape[:-1]) if default_weights else _target_array("weights", self.weights, s.shape)
        b = np.zeros(s.shape[:-1]) if default_floors else _target_array("floors", self.floors, s.shape)
        if not default_weights and (w < 0).any():
            raise ValueError("weights must be >= 0 (a negative weight would reward *removing* value)")
        mask = _mask_array(self.mask, (*batch, num_players))
        all_present = self.mask is None or bool(mask.all())
        # One min and one max over the scores check finiteness and give the sign; masked scores may be
        # padding (NaN included), so with absent players only the present ones are checked.
        score_range = _finite_range(s if all_present else s[np.broadcast_to(mask[..., None, :], s.shape)])
        if score_range is None:
            raise ValueError("scores of present candidates must be finite (NaN/inf found)")
        object.__setattr__(self, "scores", _readonly(s))
        object.__setattr__(self, "weights", _readonly(w))
        object.__setattr__(self, "floors", _readonly(b))
        object.__setattr__(self, "mask", mask)
        # Flags that let gains() skip whole-array passes in the common case (no floor, unit weights, no
        # padding): the closed form on a batch of best-of-set games is only a few passes over the scores.
        object.__setattr__(self, "_zero_floors", default_floors or bool((b == 0).all()))
        object.__setattr__(self, "_unit_weights", default_weights or bool((w == 1).all()))
        object.__setattr__(self, "_all_present", all_present)
        gains_are_scores = self._zero_floors and self._unit_weights and all_present
        object.__setattr__(self, "_gains_are_scores", gains_are_scores and score_range[0] >= 0)

    # ---- interface -------------------------------------------------------------------------------

    @property
    def num_players(self) -> int:
        return self.scores.shape[-1]

    @property
    def num_targets(self) -> int:
        return self.scores.shape[-2]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.scores.shape[:-2]

    @property
    def u0(self) -> float | np.ndarray:
        u0 = (self.weights * self.floors).sum(axis=-1)  # () or (B,)
        return float(u0) if u0.ndim == 0 else u0

    @property
    def grand_value(self) -> float | np.ndarray:
        """U(N), the set reward: value of all present players."""
        out = self.u0 + self.gains().max(axis=-1, initial=0.0).sum(axis=-1)
        return float(out) if np.ndim(out) == 0 else out

    def gains(self) -> np.ndarray:
        """y_tj = w_t · (max(s_tj, b_t) − b_t) >= 0, zero for absent players; (T, K) or (B, T, K), read-only.

        Since w_t >= 0, U(S) = u0 + sum_t max(0, max_{j∈S} y_tj): every engine works on these non-negative
        gains.
        """
        s = self.scores
        if self._gains_are_scores:  # non-negative scores, no floor, unit weights, nothing masked: no copy
            return s
        if self._zero_floors:
            y = np.maximum(s, 0.0)
        else:
            b = self.floors[..., None]
            y = np.maximum(s, b)
            y -= b
        if not self._unit_weights:
            y *= self.weights[..., None]
        if not self._all_present:
            # Masked scores may be NaN padding; np.where drops them.
            y = np.where(self.mask[..., None, :], y, 0.0)
        return _readonly(y)

    def value(self, coalitions: np.ndarray) -> np.ndarray:
        """U(S) for bool coalitions: unbatched (..., K) -> (...); batched (M, K) or (B, M, K) -> (B, M)."""
        c = _check_coalitions(coalitions, self.num_players)
        y = self.gains()  # (T, K) or (B, T, K)
        if not self.batch_shape:
            picked = np.where(c[..., None, :], y, 0.0)  # (..., T, K)
            return self.u0 + picked.max(axis=-1, initial=0.0).sum(axis=-1)
        c = _batched_coalitions(c, self.batch_shape[0])  # (B, M, K)
        picked = np.where(c[:, :, None, :], y[:, None, :, :], 0.0)  # (B, M, T, K)
        return self.u0[:, None] + picked.max(axis=-1, initial=0.0).sum(axis=-1)

    def all_values(self) -> np.ndarray:
        """Values of all 2^K coalitions in bitmask order: (2^K,) or (B, 2^K)."""
        y = self.gains()  # (..., T, K)
        best = np.zeros((*y.shape[:-1], 1))  # (..., T, 1): max gain of the empty coalition
        for i in range(self.num_players):  # doubling: coalitions with player i = those without, plus i
            best = np.concatenate([best, np.maximum(best, y[..., i : i + 1])], axis=-1)
        u0 = self.u0
        return (u0 if np.ndim(u0) == 0 else u0[:, None]) + best.sum(axis=-2)

    def take_batch(self, index: np.ndarray | slice) -> SumOfMaxGame:
        """The sub-batch ``index`` of a batched game (still batched)."""
        if not self.batch_shape:
            raise ValueError("take_batch needs a batched game")
        return SumOfMaxGame(self.scores[index], self.weights[index], self.floors[index], self.mask[index])


def without_players(game: Game, players: Sequence[int]) -> SumOfMaxGame:
    """The game with ``players`` made null (absent: they add nothing to any coalition, Shapley value 0).

    Used for repeated candidates (docs/method.md, "Repeated candidates"): a copy of an item already in the set
    adds nothing to a set of distinct items, so it should earn nothing instead of halving its original's
    credit. Only sum-of-max games, whose value of a coalition depends on its best score per target, are
    supported: there a repeat's column equals its original's and U(N) is unchanged.
    """
    if not isinstance(game, SumOfMaxGame) or game.batch_shape:
        raise ValueError(
            f"without_players needs an unbatched SumOfMaxGame, got {type(game).__name__}: only there is a "
            "repeated candidate's column its original's"
        )
    idx = np.asarray(list(players), dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= game.num_players):
        raise ValueError(f"players {idx.tolist()} out of range for {game.num_players} players")
    mask = game.mask.copy()
    mask[idx] = False
    return SumOfMaxGame(scores=game.scores, weights=game.weights, floors=game.floors, mask=mask)


def best_of_set(
    utilities: np.ndarray, floor: float | np.ndarray = 0.0, mask: np.ndarray | None = None
) -> SumOfMaxGame:
    """The user takes the best candidate: U(S) = max(floor, max_{j∈S} u_j). utilities (K,) or (B, K)."""
    u = _float_array("utilities", utilities)
    if u.ndim not in (1, 2):
        raise ValueError(f"utilities must have shape (K,) or (B, K), got {u.shape}")
    # The default floor is SumOfMaxGame's default: no per-row floor array to build and check.
    no_floor = isinstance(floor, (int, float)) and floor == 0
    b = None if no_floor else _readonly(_per_row("floor", floor, u.shape[:-1], 0.0))[..., None]
    # A frozen private copy: SumOfMaxGame keeps this view instead of copying the scores a second time.
    return SumOfMaxGame(scores=_readonly(u)[..., None, :], floors=b, mask=mask)


def coverage(
    hits: np.ndarray, weights: np.ndarray | None = None, mask: np.ndarray | None = None
) -> SumOfMaxGame:
    """Target t (weight w_t) counts once if any candidate in S hits it; hits (T, K) or (B, T, K), 0/1."""
    h = _float_array("hits", hits)
    if h.ndim not in (2, 3):
        raise ValueError(f"hits must have shape (T, K) or (B, T, K), got {h.shape}")
    m = _mask_array(mask, (*h.shape[:-2], h.shape[-1]))
    present = np.broadcast_to(m[..., None, :], h.shape)
    if not np.isin(h[present], (0.0, 1.0)).all():
        raise ValueError("coverage hits must be boolean or 0/1")
    return SumOfMaxGame(scores=h, weights=weights, mask=m)


# --------------------------------------------------------------------------------------------------
# Choice-model games
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ChoiceGame:
    """Multinomial-logit user with an outside option.

    U(S) = (v0·e^{a0} + sum_{j∈S} v_j e^{a_j}) / (e^{a0} + sum_{j∈S} e^{a_j}), u0 = v0.
    values v, attraction a (log-attractions): (K,) or (B, K); outside_attraction a0 and outside_value v0:
    scalars or (B,). Unlike sum-of-max games U is not monotone (a poor candidate can draw the user away from a
    good one), so Shapley values may be negative. Attractions of present players must lie within 700 nats of
    each other and of a0 (beyond that e^a under/overflows float64) — a ValueError otherwise.
    """

    values: np.ndarray
    attraction: np.ndarray
    outside_attraction: float | np.ndarray = 0.0
    outside_value: float | np.ndarray = 0.0
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        v = _float_array("values", self.values)
        a = _float_array("attraction", self.attraction)
        if v.ndim not in (1, 2):
            raise ValueError(f"values must have shape (K,) or (B, K), got {v.shape}")
        if a.shape != v.shape:
            raise ValueError(f"attraction has shape {a.shape}, expected {v.shape} (same as values)")
        batch = v.shape[:-1]
        a0 = _per_row("outside_attraction", self.outside_attraction, batch, 0.0)
        v0 = _per_row("outside_value", self.outside_value, batch, 0.0)
        mask = _mask_array(self.mask, v.shape)
        if not (np.isfinite(v[mask]).all() and np.isfinite(a[mask]).all()):
            raise ValueError("values and attraction of present candidates must be finite (NaN/inf found)")
        a_present = np.where(mask, a, a0[..., None])
        span = np.maximum(a_present.max(axis=-1, initial=-np.inf), a0) - np.minimum(
            a_present.min(axis=-1, initial=np.inf), a0
        )
        if (span > MAX_ATTRACTION_SPAN).any():
            raise ValueError(f"attractions span more than {MAX_ATTRACTION_SPAN} nats; exp() would overflow")
        for name, arr in (
            ("values", v),
            ("attraction", a),
            ("outside_attraction", a0),
            ("outside_value", v0),
        ):
            object.__setattr__(self, name, _readonly(arr))
        object.__setattr__(self, "mask", mask)

    @property
    def num_players(self) -> int:
        return self.values.shape[-1]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.values.shape[:-1]

    @property
    def u0(self) -> float | np.ndarray:
        return float(self.outside_value) if not self.batch_shape else self.outside_value.copy()

    @property
    def grand_value(self) -> float | np.ndarray:
        out = self.value(self.mask[..., None, :] if self.batch_shape else self.mask)
        return float(out) if not self.batch_shape else out[:, 0]

    def _weights(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Stabilised MNL weights: e0 (…,), e (…, K) (0 when absent), and the value-weighted n0, n."""
        a0 = self.outside_attraction
        amax = np.maximum(np.where(self.mask, self.attraction, -np.inf).max(axis=-1, initial=-np.inf), a0)
        e0 = np.exp(a0 - amax)
        e = np.where(self.mask, np.exp(np.where(self.mask, self.attraction, 0.0) - amax[..., None]), 0.0)
        v = np.where(self.mask, self.values, 0.0)
        return e0, e, self.outside_value * e0, v * e

    def value(self, coalitions: np.ndarray) -> np.ndarray:
        """U(S) for bool coalitions: unbatched (..., K) -> (...); batched (M, K) or (B, M, K) -> (B, M)."""
        c = _check_coalitions(coalitions, self.num_players).astype(np.float64)
        e0, e, n0, n = self._weights()
        if not self.batch_shape:
            return (n0 + c @ n) / (e0 + c @ e)
        c = _batched_coalitions(c, self.batch_shape[0])  # (B, M, K)
        num = n0[:, None] + np.einsum("bmk,bk->bm", c, n)
        den = e0[:, None] + np.einsum("bmk,bk->bm", c, e)
        return num / den

    def all_values(self) -> np.ndarray:
        e0, e, n0, n = self._weights()
        num, den = np.asarray(n0)[..., None], np.asarray(e0)[..., None]  # (..., 1)
        for i in range(self.num_players):
            num = np.concatenate([num, num + n[..., i : i + 1]], axis=-1)
            den = np.concatenate([den, den + e[..., i : i + 1]], axis=-1)
        return num / den

    def take_batch(self, index: np.ndarray | slice) -> ChoiceGame:
        if not self.batch_shape:
            raise ValueError("take_batch needs a batched game")
        return ChoiceGame(
            self.values[index],
            self.attraction[index],
            self.outside_attraction[index],
            self.outside_value[index],
            self.mask[index],
        )


# --------------------------------------------------------------------------------------------------
# Callable games
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CallableGame:
    """Any set function: ``fn(frozenset_of_player_indices) -> float``. Unbatched, all players present.

    ``value`` calls ``fn`` once per *distinct* coalition it is asked about; a non-finite or non-numeric return
    value is a ValueError naming the coalition.
    """

    fn: Callable[[frozenset[int]], float]
    num_players: int

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ValueError("CallableGame.fn must be callable")
        if isinstance(self.num_players, bool) or not isinstance(self.num_players, (int, np.integer)):
            raise ValueError(f"num_players must be an int, got {self.num_players!r}")
        if self.num_players < 0:
            raise ValueError(f"num_players must be >= 0, got {self.num_players}")
        object.__setattr__(self, "num_players", int(self.num_players))

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return ()

    @property
    def mask(self) -> np.ndarray:
        return np.ones(self.num_players, dtype=bool)

    @property
    def u0(self) -> float:
        return self._call(frozenset())

    @property
    def grand_value(self) -> float:
        return self._call(frozenset(range(self.num_players)))

    def _call(self, coalition: frozenset[int]) -> float:
        out = self.fn(coalition)
        try:
            val = float(out)
        except (TypeError, ValueError) as err:
            raise ValueError(f"game function returned {out!r} for coalition {sorted(coalition)}") from err
        if not math.isfinite(val):
            raise ValueError(f"game function returned {val} for coalition {sorted(coalition)}")
        return val

    def value(self, coalitions: np.ndarray) -> np.ndarray:
        c = _check_coalitions(coalitions, self.num_players)
        lead = c.shape[:-1]
        flat = c.reshape(math.prod(lead), self.num_players)
        if flat.shape[0] == 0:
            return np.zeros(lead)
        if self.num_players == 0:  # every coalition is the empty one
            return np.full(lead, self.u0)
        # Evaluate each distinct coalition once (Monte Carlo asks for the same prefixes many times).
        uniq, inverse = np.unique(np.packbits(flat, axis=-1), axis=0, return_inverse=True)
        uniq_bool = np.unpackbits(uniq, axis=-1, count=self.num_players).astype(bool)
        vals = np.array([self._call(frozenset(np.flatnonzero(row).tolist())) for row in uniq_bool])
        return vals[inverse.reshape(-1)].reshape(lead)

    def all_values(self) -> np.ndarray:
        return self.value(coalition_matrix(self.num_players))


Game = SumOfMaxGame | ChoiceGame | CallableGame


# --------------------------------------------------------------------------------------------------
# Storage: a game as plain JSON-able values (so a scored response can be stored and credited later)
# --------------------------------------------------------------------------------------------------

# A callable game's function cannot be stored, so its 2^K coalition values are; beyond this K that table
# would be too large (2^16 = 65,536 values) and the game has to be credited where it is built.
MAX_STORED_CALLABLE_PLAYERS = 16


def _stored_array(record: Mapping[str, Any], name: str) -> np.ndarray:
    return np.asarray(record[name], dtype=np.float64).reshape(record[f"{name}_shape"])


def game_to_dict(game: Game) -> dict[str, Any]:
    """A JSON-able description of an unbatched game from which :func:`game_from_dict` rebuilds a game with
    the same fields, hence the same values and the same Shapley values (bit for bit, same engine).

    Sum-of-max and choice games store their arrays; a callable game stores the values of all 2^K coalitions
    (its function cannot be stored), rebuilt as a callable game that looks them up.
    """
    if tuple(game.batch_shape) != ():
        raise ValueError(f"game_to_dict stores unbatched games, got batch_shape {game.batch_shape}")
    if isinstance(game, SumOfMaxGame):
        arrays = {"scores": game.scores, "weights": game.weights, "floors": game.floors}
        out: dict[str, Any] = {"kind": "sum_of_max", "mask": game.mask.tolist()}
    elif isinstance(game, ChoiceGame):
        arrays = {"values": game.values, "attraction": game.attraction}
        out = {
            "kind": "choice",
            "mask": game.mask.tolist(),
            "outside_attraction": float(game.outside_attraction),
            "outside_value": float(game.outside_value),
        }
    elif isinstance(game, CallableGame):
        if game.num_players > MAX_STORED_CALLABLE_PLAYERS:
            raise ValueError(
                f"a callable game of {game.num_players} players is too large to store (2^K coalition values; "
                f"at most {MAX_STORED_CALLABLE_PLAYERS} players)"
            )
        arrays = {"values": game.all_values()}
        out = {"kind": "table", "num_players": game.num_players}
    else:
        raise ValueError(f"cannot store a game of type {type(game).__name__}")
    for name, arr in arrays.items():
        # JSON floats round-trip exactly (repr); shapes are kept because an empty axis cannot be inferred.
        out[name] = np.asarray(arr, dtype=np.float64).ravel().tolist()
        out[f"{name}_shape"] = list(np.shape(arr))
    return out


def game_from_dict(record: Mapping[str, Any]) -> Game:
    """The game :func:`game_to_dict` stored."""
    kind = record.get("kind")
    if kind == "sum_of_max":
        return SumOfMaxGame(
            scores=_stored_array(record, "scores"),
            weights=_stored_array(record, "weights"),
            floors=_stored_array(record, "floors"),
            mask=np.asarray(record["mask"], dtype=bool),
        )
    if kind == "choice":
        return ChoiceGame(
            values=_stored_array(record, "values"),
            attraction=_stored_array(record, "attraction"),
            outside_attraction=float(record["outside_attraction"]),
            outside_value=float(record["outside_value"]),
            mask=np.asarray(record["mask"], dtype=bool),
        )
    if kind == "table":
        k = int(record["num_players"])
        table = _stored_array(record, "values")
        if table.shape != (2**k,):
            raise ValueError(f"a stored callable game of {k} players needs 2^{k} values, got {table.shape}")
        bits = 1 << np.arange(k)

        def lookup(coalition: frozenset[int]) -> float:
            return float(table[int(bits[list(coalition)].sum())])

        return CallableGame(lookup, k)
    raise ValueError(f"unknown stored game kind {kind!r} (expected sum_of_max, choice or table)")


def _batched_coalitions(c: np.ndarray, batch: int) -> np.ndarray:
    """(M, K) -> broadcast (B, M, K); (B, M, K) checked."""
    if c.ndim == 2:
        return np.broadcast_to(c[None], (batch, *c.shape))
    if c.ndim == 3 and c.shape[0] == batch:
        return c
    raise ValueError(f"batched game (B={batch}) takes coalitions of shape (M, K) or (B, M, K), got {c.shape}")
