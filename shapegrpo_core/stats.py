"""Paired statistics for comparing methods on the same evaluation units (docs/statistics.md).

Two methods evaluated with common random numbers (the same prompts, the same sampling seeds) give paired
scores; their difference has far less variance than either score, so the paired interval is the one that
decides. Intervals come from ``scipy.stats.bootstrap`` (BCa), tests from ``scipy.stats.wilcoxon``.

    d = paired_difference(scores["shapegrpo"], scores["grpo"], seed=0)
    d.mean, d.low, d.high, d.p_improvement, d.wilcoxon_p
    decide_champion(scores, seed=0).winner  # None unless one method beats every other with a CI above 0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 10_000


@dataclass(frozen=True)
class PairedDifference:
    """a − b over n paired units: mean, its bootstrap CI [low, high], P(a > b) over pairs (ties count one
    half) and the two-sided Wilcoxon signed-rank p-value (1.0 when every difference is 0)."""

    n: int
    mean: float
    low: float
    high: float
    p_improvement: float
    wilcoxon_p: float
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0.0 or self.high < 0.0)


def _as_pairs(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[np.ndarray, ...]:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"paired scores need two 1-D arrays of one length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError(f"a paired comparison needs at least 2 units, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired scores must be finite (drop or zero failed units before comparing)")
    return x, y


def _sample(values: Sequence[float] | np.ndarray, confidence: float) -> np.ndarray:
    """The checked input of a bootstrap interval: >= 2 finite values, a confidence in (0, 1)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) < 2 or not np.isfinite(v).all():
        raise ValueError(f"need at least 2 finite values, got shape {v.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return v


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    num_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean, low, high): the BCa bootstrap CI of a mean; a constant sample has the degenerate CI [m, m]."""
    v = _sample(values, confidence)
    mean = float(v.mean())
    if np.ptp(v) == 0.0:  # BCa is undefined on a constant sample; its sampling distribution is a point
        return mean, mean, mean
    res = sps.bootstrap(
        (v,),
        np.mean,
        confidence_level=confidence,
        n_resamples=num_resamples,
        method="BCa",
        rng=np.random.default_rng(seed),
    )
    return mean, float(res.confidence_interval.low), float(res.confidence_interval.high)


def iqm(values: Sequence[float] | np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50% (scipy's 25% trimmed mean), robust to a collapsed seed
    or a lucky one while using more of the sample than the median."""
    return float(sps.trim_mean(np.asarray(values, dtype=np.float64), 0.25))


def bootstrap_iqm_ci(
    values: Sequence[float] | np.ndarray,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    num_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(IQM, low, high): percentile bootstrap CI of the IQM over runs (rliable's estimator for one task, where
    its stratified bootstrap is a plain one; rliable itself does not import with pandas 3)."""
    v = _sample(values, confidence)
    point = iqm(v)
    if np.ptp(v) == 0.0:
        return point, point, point
    res = sps.bootstrap(
        (v,),
        lambda x, axis=-1: sps.trim_mean(x, 0.25, axis=axis),
        confidence_level=confidence,
        n_resamples=num_resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return point, float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    num_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> PairedDifference:
    """Paired comparison of a and b (unit i of a is paired with unit i of b)."""
    x, y = _as_pairs(a, b)
    d = x - y
    mean, low, high = bootstrap_mean_ci(d, confidence=confidence, num_resamples=num_resamples, seed=seed)
    p_imp = float(np.mean(d > 0) + 0.5 * np.mean(d == 0))
    wilcoxon_p = 1.0 if not d.any() else float(sps.wilcoxon(x, y, zero_method="zsplit").pvalue)
    return PairedDifference(len(d), mean, low, high, p_imp, wilcoxon_p, confidence)


@dataclass(frozen=True)
class ChampionDecision:
    """The method whose paired CI against every other method lies above 0, or None, with the reason and the
    table of pairwise differences (winner candidate − other)."""

    winner: str | None
    reason: str
    pairs: pd.DataFrame


def decide_champion(
    scores: Mapping[str, Sequence[float] | np.ndarray],
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    num_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> ChampionDecision:
    """A champion only on evidence: the method with the highest mean wins iff its paired CI against each
    other method excludes 0 on the positive side; otherwise ``winner`` is None ("no significant winner")."""
    if len(scores) < 2:
        raise ValueError(f"a champion needs at least 2 methods, got {list(scores)}")
    means = {m: float(np.mean(np.asarray(v, dtype=np.float64))) for m, v in scores.items()}
    best = max(means, key=lambda m: (means[m], m))  # ties broken by name so the choice is deterministic
    rows = []
    for other in scores:
        if other == best:
            continue
        d = paired_difference(
            scores[best], scores[other], confidence=confidence, num_resamples=num_resamples, seed=seed
        )
        rows.append(
            {
                "method": best,
                "versus": other,
                "n": d.n,
                "mean_difference": d.mean,
                "ci_low": d.low,
                "ci_high": d.high,
                "p_improvement": d.p_improvement,
                "wilcoxon_p": d.wilcoxon_p,
                "significant": d.low > 0.0,
            }
        )
    pairs = pd.DataFrame(rows)
    losers = pairs.loc[~pairs["significant"], "versus"].tolist()
    if losers:
        reason = (
            f"no significant winner: {best} has the highest mean but its {confidence:.0%} paired CI against "
            f"{', '.join(losers)} includes 0"
        )
        return ChampionDecision(None, reason, pairs)
    return ChampionDecision(best, f"{best} beats every other method ({confidence:.0%} paired CI > 0)", pairs)


__all__ = [
    "ChampionDecision",
    "PairedDifference",
    "bootstrap_iqm_ci",
    "bootstrap_mean_ci",
    "decide_champion",
    "iqm",
    "paired_difference",
]
