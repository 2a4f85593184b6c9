"""Credit of one batch of scored responses: the one object the trainer, the pipeline and the metrics use.

    rows = credit_responses(scores, "shapley", format_penalty=0.1)      # per response, picklable (gatherable)
    credit = BatchCredit.from_responses(rows, num_generations=8, allocation="shapley", lam=1.0, num_slots=4)
    credit.advantages.candidate      # (N, S) A_{g,i};  credit.advantages.set  (N,) A_g
    credit.metrics()                 # shapegrpo/* training metrics (free riders, collapse, format, engines)
    credit.table()                   # one row per candidate slot
    credit.token_advantages(owners, loss_mask)   # (B, T) what the loss sees (docs/method.md, "Tokens")

Computation happens in two phases because GRPO groups may straddle processes: ``credit_responses`` needs only
a response's own game (run on each process's local slice), ``BatchCredit.from_responses`` needs the whole
gathered batch (group means and standard deviations).

Slots. A response scores its first K_g <= K parsed candidates. ``missing_slots="ignore"`` makes those K_g
candidates the only players (rho = (1 − lam) R + lam (u0 + K_g phi)). ``missing_slots="null"`` adds the
K − K_g empty slots as null players (phi = 0, rho = (1 − lam) R + lam u0): their (negative, when the set is
worth more than u0) credit lands on the response's tokens outside candidates, so dropping a candidate in
favour of separators is never free (docs/method.md, "Missing slots").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from shapegrpo_core.credit import (
    FREE_RIDER_TOL,
    SCALE_REWARDS,
    TRL_EPSILON,
    GroupAdvantages,
    allocate_credit,
    group_advantages,
    mix_credit,
)
from shapegrpo_core.credit import (
    _check_allocation as check_allocation,
)
from shapegrpo_core.evaluation import ResponseScore, repeat_indices
from shapegrpo_core.games import SumOfMaxGame, without_players
from shapegrpo_core.shapley import DEFAULT_NUM_PERMUTATIONS, MAX_EXACT_PLAYERS

MISSING_SLOTS = ("ignore", "null")
REPEATS = ("shared", "null")
TOKEN_WEIGHTINGS = ("length_aware", "broadcast")
KNOWN_ENGINES = ("closed_form", "exact", "monte_carlo", "loo", "wta")
NO_CANDIDATE = -1  # candidate_index of the pseudo-candidate row of a response without slots


@dataclass
class ResponseCredit:
    """One response's own credit (plain values, so ``gather_object`` can pickle it).

    set_utility: U(scored candidates), unpenalised; NaN when the scorer failed.
    penalty: the format penalty subtracted from this response's game (set reward, u0 and every rho).
    phi: the allocation's efficient credit of the K_g scored candidates; shapley_phi: their Shapley values
    (the free-rider metric uses them whatever the allocation, so it means one thing for every method).
    """

    set_utility: float
    penalty: float
    u0: float
    phi: list[float]
    shapley_phi: list[float]
    engine: str  # the allocation's engine ("loo", "wta", or the Shapley engine)
    shapley_engine: str
    singleton_utilities: list[float]
    candidates: list[str]
    num_duplicates: int
    num_parsed: int
    format_valid: bool
    text: str = ""

    @property
    def num_scored(self) -> int:
        return len(self.phi)


def credit_responses(
    scores: Sequence[ResponseScore | None],
    allocation: str,
    *,
    engine: str = "auto",
    seed: int = 0,
    num_permutations: int = DEFAULT_NUM_PERMUTATIONS,
    max_exact_players: int = MAX_EXACT_PLAYERS,
    num_parsed: Sequence[int] | None = None,
    format_valid: Sequence[bool] | None = None,
    format_penalty: float = 0.0,
    texts: Sequence[str] | None = None,
    repeats: str = "shared",
) -> list[ResponseCredit]:
    """Per-response credit of scored responses (None = the scorer failed: NaN utility, no candidates; its
    format statistics come from ``num_parsed`` / ``format_valid`` when given).

    ``repeats="shared"`` values the game as scored: a candidate and its copy are symmetric players and split
    their credit. ``repeats="null"`` makes every repeat of an earlier candidate a null player (credit 0, the
    original keeps the full credit); U(N) is unchanged (docs/method.md, "Repeated candidates"). It applies to
    sum-of-max games whose repeats score exactly as their originals (every built-in task); any other
    response keeps the game as scored."""
    check_allocation(allocation, 1.0)
    if repeats not in REPEATS:
        raise ValueError(f"repeats must be one of {REPEATS}, got {repeats!r}")
    if not (math.isfinite(format_penalty) and format_penalty >= 0.0):
        raise ValueError(f"format_penalty must be finite and >= 0, got {format_penalty}")
    n = len(scores)
    for name, seq in (("num_parsed", num_parsed), ("format_valid", format_valid), ("texts", texts)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} responses")
    live = [i for i, s in enumerate(scores) if s is not None]
    games = [scores[i].game for i in live]  # type: ignore[union-attr]
    if repeats == "null":
        games = [_null_repeats(g, scores[i]) for g, i in zip(games, live, strict=True)]  # type: ignore[arg-type]
    opts: dict[str, Any] = {"engine": engine, "seed": seed, "num_permutations": num_permutations}
    opts["max_exact_players"] = max_exact_players
    shapley = allocate_credit(games, "shapley", 1.0, **opts) if games else []
    own = shapley if allocation in ("uniform", "shapley") else allocate_credit(games, allocation, 1.0, **opts)
    by_index = dict(zip(live, range(len(live)), strict=True))
    out = []
    for i, s in enumerate(scores):
        text = texts[i] if texts is not None else ""
        if s is None:
            parsed = 0 if num_parsed is None else int(num_parsed[i])
            valid = False if format_valid is None else bool(format_valid[i])
            nan = float("nan")
            out.append(ResponseCredit(nan, 0.0, nan, [], [], "none", "", [], [], 0, parsed, valid, text))
            continue
        sh, c = shapley[by_index[i]], own[by_index[i]]
        if not math.isclose(sh.set_reward, s.set_utility, rel_tol=1e-9, abs_tol=1e-9):
            raise RuntimeError(
                f"credit engine set reward {sh.set_reward} != scored set utility {s.set_utility}"
            )
        out.append(
            ResponseCredit(
                set_utility=float(s.set_utility),
                penalty=float(format_penalty) * (not s.format_valid),
                u0=float(sh.u0),
                phi=[float(x) for x in c.phi],
                shapley_phi=[float(x) for x in sh.phi],
                engine=c.engine,
                shapley_engine=sh.engine,
                singleton_utilities=[float(x) for x in s.singleton_utilities],
                candidates=[cand.text for cand in s.candidates],
                num_duplicates=int(s.num_duplicates),
                num_parsed=int(s.num_parsed),
                format_valid=bool(s.format_valid),
                text=text,
            )
        )
    return out


def _null_repeats(game: Any, score: ResponseScore) -> Any:
    """The game with repeated candidates as null players; the game as scored when a "repeat" is not a copy
    in it (a different column, or a game type that is not sum-of-max): credit then stays shared."""
    repeated = repeat_indices(score.candidates)
    if not repeated or not isinstance(game, SumOfMaxGame) or game.batch_shape:
        return game
    first: dict[str, int] = {}
    for j, c in enumerate(score.candidates):
        first.setdefault(c.text.strip(), j)
    y = game.gains()  # (T, K)
    originals = [first[score.candidates[j].text.strip()] for j in repeated]
    if not np.allclose(y[:, repeated], y[:, originals], rtol=1e-9, atol=1e-12):
        return game
    return without_players(game, repeated)


COLLAPSE_TAIL = 0.1  # the last tenth of training
COLLAPSE_RATE = 0.5  # ... where most groups were one identical text


def collapsed(identical_group_rates: Sequence[float]) -> bool:
    """A run collapsed when, over the last tenth of its steps (at least one), the mean share of prompt groups
    whose G completions are one identical text (``identical_group_rate``) exceeds one half: such groups have
    all advantages 0, so the run has stopped learning and does not recover (docs/statistics.md)."""
    rates = [float(r) for r in identical_group_rates if math.isfinite(r)]
    if not rates:
        return False
    tail = rates[-max(1, int(len(rates) * COLLAPSE_TAIL)) :]
    return float(np.mean(tail)) > COLLAPSE_RATE


def _mean(xs: Sequence[float] | np.ndarray) -> float:
    """Mean, NaN (never a fake 0) when there is nothing to average."""
    return float(np.mean(xs)) if len(xs) else float("nan")


@dataclass(frozen=True, eq=False)
class BatchCredit:
    """Credit and group advantages of N = P · G responses (groups of G contiguous rows).

    Arrays, S = num_slots columns: set_reward (N,) R − penalty (NaN: failed scorer); u0 (N,) penalised;
    mask (N, S) players; scored (N, S) slots holding a real candidate (the rest of ``mask`` are null slots);
    phi (N, S) the allocation's efficient credit, 0 off-mask; shapley (N, S); rho (N, S), NaN off-mask;
    advantages: :class:`~shapegrpo_core.credit.GroupAdvantages`.
    """

    responses: tuple[ResponseCredit, ...]
    num_generations: int
    allocation: str
    lam: float
    num_slots: int
    missing_slots: str
    scale_rewards: str
    set_reward: np.ndarray = field(repr=False)
    u0: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    scored: np.ndarray = field(repr=False)
    phi: np.ndarray = field(repr=False)
    shapley: np.ndarray = field(repr=False)
    rho: np.ndarray = field(repr=False)
    advantages: GroupAdvantages = field(repr=False)

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def from_responses(
        cls,
        rows: Sequence[ResponseCredit],
        num_generations: int,
        *,
        allocation: str,
        lam: float = 1.0,
        num_slots: int | None = None,
        missing_slots: str = "ignore",
        scale_rewards: str = "group",
        eps: float = TRL_EPSILON,
    ) -> BatchCredit:
        """Group advantages of the gathered batch; ``num_slots`` is K (default: the most scored)."""
        check_allocation(allocation, lam)
        if missing_slots not in MISSING_SLOTS:
            raise ValueError(f"missing_slots must be one of {MISSING_SLOTS}, got {missing_slots!r}")
        if scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
        if not rows:
            raise ValueError("a batch needs at least one response")
        k_g = np.array([r.num_scored for r in rows])  # (N,)
        width = int(k_g.max()) if num_slots is None else int(num_slots)
        if width < 1 or (k_g > width).any():
            raise ValueError(
                f"num_slots={num_slots} is below a response's {int(k_g.max())} scored candidates"
            )
        n = len(rows)
        utility = np.array([r.set_utility for r in rows])  # (N,)
        penalty = np.array([r.penalty for r in rows])  # (N,)
        set_reward = utility - penalty  # (N,) NaN where the scorer failed
        u0 = np.array([r.u0 for r in rows]) - penalty  # (N,)
        ok = ~np.isnan(set_reward)
        scored = np.arange(width)[None, :] < k_g[:, None]  # (N, S)
        mask = scored.copy()
        if missing_slots == "null":
            mask[ok] = True  # every slot of a scored response is a player; empty ones are null players
        phi = np.zeros((n, width))  # (N, S)
        shapley = np.zeros((n, width))  # (N, S)
        for i, r in enumerate(rows):
            phi[i, : r.num_scored] = r.phi
            shapley[i, : r.num_scored] = r.shapley_phi
        live = np.where(ok, set_reward, u0)  # NaN rows: any finite value, masked out below
        if allocation == "uniform" or lam == 0.0:
            rho = np.where(mask, live[:, None], np.nan)
        else:
            rho = mix_credit(live, np.nan_to_num(u0), phi, mask, lam)
        rho[~ok] = np.nan
        adv = group_advantages(rho, mask, set_reward, num_generations, scale_rewards=scale_rewards, eps=eps)
        return cls(
            tuple(rows),
            int(num_generations),
            allocation,
            float(lam),
            width,
            missing_slots,
            scale_rewards,
            set_reward,
            u0,
            mask,
            scored,
            phi,
            shapley,
            rho,
            adv,
        )

    @classmethod
    def compute(
        cls,
        scores: Sequence[ResponseScore | None],
        num_generations: int,
        *,
        allocation: str,
        lam: float = 1.0,
        num_slots: int | None = None,
        missing_slots: str = "ignore",
        scale_rewards: str = "group",
        eps: float = TRL_EPSILON,
        format_penalty: float = 0.0,
        engine: str = "auto",
        seed: int = 0,
        num_permutations: int = DEFAULT_NUM_PERMUTATIONS,
        max_exact_players: int = MAX_EXACT_PLAYERS,
        texts: Sequence[str] | None = None,
        repeats: str = "shared",
    ) -> BatchCredit:
        """Both phases on one process: :func:`credit_responses`, then :meth:`from_responses`."""
        rows = credit_responses(
            scores,
            allocation,
            engine=engine,
            seed=seed,
            num_permutations=num_permutations,
            max_exact_players=max_exact_players,
            format_penalty=format_penalty,
            texts=texts,
            repeats=repeats,
        )
        return cls.from_responses(
            rows,
            num_generations,
            allocation=allocation,
            lam=lam,
            num_slots=num_slots,
            missing_slots=missing_slots,
            scale_rewards=scale_rewards,
            eps=eps,
        )

    # ------------------------------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self.responses)

    @property
    def ok(self) -> np.ndarray:
        """(N,) responses whose scorer succeeded."""
        return ~np.isnan(self.set_reward)

    def metrics(self) -> dict[str, float]:
        """Per-batch metrics (names without the ``shapegrpo/`` prefix). Means over nothing are NaN.

        free_rider_rate: share of scored candidates, in sets worth more than u0, whose Shapley value is <= 0
        (within FREE_RIDER_TOL) — the candidates GRPO pays the full set reward for nothing.
        identical_group_rate: share of prompt groups whose G completions are one identical text (collapse:
        no advantage signal left); tied_group_rate: share whose set rewards are all equal (no GRPO signal).
        """
        rows = self.responses
        ok = self.ok
        scored = [r for r, good in zip(rows, ok, strict=True) if good]
        surplus = [p for r in scored if r.set_utility - r.u0 > FREE_RIDER_TOL for p in r.shapley_phi]
        has = self.mask.any(axis=1)
        cand = np.where(self.mask, self.advantages.candidate, np.nan)[has]  # (N', S)
        spread = np.sqrt(np.nanmean((cand - np.nanmean(cand, axis=1, keepdims=True)) ** 2, axis=1))
        singles = [np.mean(r.singleton_utilities) if r.num_scored else r.u0 for r in scored]
        best = [np.max(r.singleton_utilities) if r.num_scored else r.u0 for r in scored]
        g = self.num_generations
        texts = np.array([r.text for r in rows], dtype=object).reshape(-1, g)
        rewards = self.set_reward.reshape(-1, g)
        metrics = {
            "set_utility": _mean([r.set_utility for r in scored]),
            "candidate_utility": _mean(singles),
            "best_candidate_utility": _mean(best),
            "free_rider_rate": _mean([float(p <= FREE_RIDER_TOL) for p in surplus]),
            "duplicate_rate": _mean(
                [r.num_duplicates / r.num_scored if r.num_scored else 0.0 for r in scored]
            ),
            "format_valid_rate": _mean([float(r.format_valid) for r in rows]),
            "parse_failure_rate": _mean([float(r.num_parsed == 0) for r in rows]),
            "num_candidates": _mean([float(r.num_parsed) for r in rows]),
            "mean_abs_phi": _mean(np.abs(self.phi[self.scored & ok[:, None]])),
            "nan_sets": float((~ok).sum()),
            "within_set_adv_std": _mean(spread),
            "identical_group_rate": _mean([float(len(set(t)) == 1) for t in texts]),
            "tied_group_rate": _mean(
                [float(np.ptp(r[~np.isnan(r)]) == 0) for r in rewards if (~np.isnan(r)).any()]
            ),
        }
        for name in KNOWN_ENGINES:
            metrics[f"engine/{name}"] = _mean([float(r.engine == name) for r in scored])
        return metrics

    def table(
        self, group_ids: Sequence[int] | None = None, generations: Sequence[int] | None = None
    ) -> pd.DataFrame:
        """One row per slot (a response without slots: one pseudo-candidate row, index -1, rho = R).

        Columns: prompt_index, generation, num_scored, format_valid, set_utility (unpenalised), set_reward,
        u0 (penalised), shapley_engine, candidate_index, candidate ("" for a null slot), candidate_utility,
        phi (Shapley), phi_<allocation> (the allocation's credit), rho, advantage, set_advantage.
        """
        n, g = len(self), self.num_generations
        groups = np.repeat(np.arange(n // g), g) if group_ids is None else np.asarray(group_ids)
        gens = np.tile(np.arange(g), n // g) if generations is None else np.asarray(generations)
        if groups.shape != (n,) or gens.shape != (n,):
            raise ValueError(f"group_ids and generations need one entry per response ({n})")
        adv = self.advantages
        records = []
        for row, r in enumerate(self.responses):
            base = {
                "prompt_index": groups[row].item(),
                "generation": gens[row].item(),
                "num_scored": r.num_scored,
                "format_valid": r.format_valid,
                "set_utility": r.set_utility,
                "set_reward": float(self.set_reward[row]),
                "u0": float(self.u0[row]),
                "shapley_engine": r.shapley_engine,
            }
            slots = np.flatnonzero(self.mask[row])
            for i in slots if len(slots) else [NO_CANDIDATE]:
                real = i != NO_CANDIDATE and i < r.num_scored
                rec = base | {
                    "candidate_index": int(i),
                    "candidate": r.candidates[i] if real else "",
                    "candidate_utility": r.singleton_utilities[i] if real else float(r.u0),
                    "phi": float(self.shapley[row, i]) if real else 0.0,
                    f"phi_{self.allocation}": float(self.phi[row, i]) if real else 0.0,
                    "rho": float(self.rho[row, i]) if i != NO_CANDIDATE else base["set_reward"],
                    "advantage": float(adv.candidate[row, i] if i != NO_CANDIDATE else adv.set[row]),
                    "set_advantage": float(adv.set[row]),
                }
                records.append(rec)
        return pd.DataFrame.from_records(records)

    # ------------------------------------------------------------------------------------------ tokens

    def token_advantages(
        self,
        owners: np.ndarray,
        loss_mask: np.ndarray,
        *,
        start: int = 0,
        weighting: str = "length_aware",
    ) -> np.ndarray:
        """(B, T) per-token advantages of rows ``start .. start + B`` of the batch.

        owners (B, T): the slot whose candidate a token lies in (``tokens.token_owners``), -1 for tokens in no
        candidate or in several (preamble, separators, EOS, a token straddling a boundary), which keep the set
        advantage A_g. loss_mask (B, T): the tokens the loss counts (TRL's completion_mask); the others get 0.

        ``weighting="broadcast"`` (the paper's rule): every token of candidate i carries A_{g,i}.
        ``weighting="length_aware"`` (default): every token starts from GRPO's A_g, and candidate i's n_i
        tokens share its deviation as if every candidate had the mean length: a = A_g + (C_g / S_g)(A_{g,i} −
        A_g) / n_i (C_g = candidate tokens of the response, S_g = its slots). The deviations of a response's
        slots sum to 0 (mean_i A_{g,i} = A_g); a deviation that has no token of its own (a null slot, a
        candidate whose tokens all straddle) is spread over the response's other tokens. So for every response
        the sum of its token advantages is A_g × (its loss tokens) — what GRPO gives it — for any lam and any
        lengths, and GRPO's credit (all A_{g,i} = A_g) maps to A_g on every token (docs/method.md, "Tokens").
        """
        if weighting not in TOKEN_WEIGHTINGS:
            raise ValueError(f"token weighting must be one of {TOKEN_WEIGHTINGS}, got {weighting!r}")
        own = np.asarray(owners, dtype=np.int64)  # (B, T)
        live = np.asarray(loss_mask, dtype=bool)  # (B, T)
        b, t = own.shape
        if live.shape != (b, t) or not 0 <= start <= len(self) - b:
            raise ValueError(
                f"owners {own.shape} / loss_mask {live.shape} do not fit rows {start}..{start + b}"
            )
        s = self.num_slots
        if (own >= s).any() or (own < NO_CANDIDATE).any():
            raise ValueError(f"owners must be -1 or a slot index below {s}")
        rows = slice(start, start + b)
        set_adv = self.advantages.set[rows]  # (B,)
        cand_adv = self.advantages.candidate[rows]  # (B, S), 0 off-mask
        own = np.where(self.scored[rows][np.arange(b)[:, None], np.maximum(own, 0)] & (own >= 0), own, -1)
        in_cand = own >= 0  # (B, T)
        picked = cand_adv[np.arange(b)[:, None], np.maximum(own, 0)]  # (B, T)
        if weighting == "broadcast":
            return np.where(live, np.where(in_cand, picked, set_adv[:, None]), 0.0)
        onehot = (own[..., None] == np.arange(s)) & live[..., None]  # (B, T, S)
        count = onehot.sum(axis=1)  # (B, S): loss tokens of each candidate
        c_tokens = count.sum(axis=1)  # (B,) C_g
        slots = self.mask[rows].sum(axis=1)  # (B,) S_g
        share = np.divide(c_tokens, slots, out=np.zeros(b), where=slots > 0)  # (B,) C_g / S_g
        deviation = np.where(self.mask[rows], cand_adv - set_adv[:, None], 0.0) * share[:, None]  # (B, S)
        per_token = set_adv[:, None] + np.divide(deviation, count, out=np.zeros((b, s)), where=count > 0)
        out = np.where(in_cand, per_token[np.arange(b)[:, None], np.maximum(own, 0)], set_adv[:, None])
        # Deviations that found no token of their own: spread over the other tokens (all, if there are none).
        residual = set_adv * live.sum(axis=1) - (out * live).sum(axis=1)  # (B,)
        others = live & ~in_cand
        target = np.where(others.any(axis=1)[:, None], others, live)  # (B, T)
        n_target = target.sum(axis=1)
        fix = np.divide(residual, n_target, out=np.zeros(b), where=n_target > 0)
        return np.where(live, out + target * fix[:, None], 0.0)


__all__ = [
    "KNOWN_ENGINES",
    "MISSING_SLOTS",
    "NO_CANDIDATE",
    "REPEATS",
    "TOKEN_WEIGHTINGS",
    "BatchCredit",
    "ResponseCredit",
    "collapsed",
    "credit_responses",
]
