"""ShapE-GRPO core: games over candidate sets, Shapley engines, credit allocation and advantages.

A plain library (no dagster/mlflow): usable from a notebook, a test or ``accelerate launch``.

    from shapegrpo_core import best_of_set, shapley_values
    shapley_values(best_of_set([1.0, 3.0])).values   # array([0.5, 2.5])
"""

import os

# The same seed gives the same numbers on any x86-64 machine with AVX2 (docs/statistics.md, "Determinism").
# MKL and ATen choose kernels by the CPU's instruction set, and an AVX-512 kernel rounds differently from an
# AVX2 one: measured here, MKL_CBWR=AVX2 vs the AVX-512 default gives different warm-start weights from one
# seed. Both are read once, when torch first computes, so they are pinned on import (before any torch op);
# set either variable yourself to choose otherwise.
os.environ.setdefault("MKL_CBWR", "AVX2")
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

from shapegrpo_core.candidates import Candidate, parse_candidates
from shapegrpo_core.credit import (
    ALLOCATIONS,
    GroupAdvantages,
    SetCredit,
    allocate_credit,
    candidate_rewards,
    group_advantages,
)
from shapegrpo_core.games import CallableGame, ChoiceGame, Game, SumOfMaxGame, best_of_set, coverage
from shapegrpo_core.shapley import (
    ShapleyResult,
    leave_one_out,
    shapley_closed_form,
    shapley_exact,
    shapley_monte_carlo,
    shapley_values,
)

__all__ = [
    "ALLOCATIONS",
    "CallableGame",
    "Candidate",
    "ChoiceGame",
    "Game",
    "GroupAdvantages",
    "SetCredit",
    "ShapleyResult",
    "SumOfMaxGame",
    "allocate_credit",
    "best_of_set",
    "candidate_rewards",
    "coverage",
    "group_advantages",
    "leave_one_out",
    "parse_candidates",
    "shapley_closed_form",
    "shapley_exact",
    "shapley_monte_carlo",
    "shapley_values",
]
