"""A worked example of Shapley credit for candidate sets: ``python -m shapegrpo_core.demo``.

1. One best-of-set response with K = 4 candidates: a strong one, a duplicate of it, a weak one and a useless
   one. Shows the set reward R, the Shapley values phi, and the candidate rewards rho under each allocation.
2. A group of G = 3 such responses to one prompt, and the per-candidate advantages under each allocation.
3. A coverage game (which candidate covers which target) and its Shapley values.
"""

from __future__ import annotations

import numpy as np

from shapegrpo_core.credit import ALLOCATIONS, allocate_credit, group_advantages
from shapegrpo_core.games import best_of_set, coverage
from shapegrpo_core.shapley import leave_one_out, shapley_values

NAMES = ("strong", "duplicate", "weak", "useless")
LAM = 1.0  # pure credit; lam = 0 would be GRPO for every allocation


def fmt(values: np.ndarray) -> str:
    return " ".join(f"{v:+9.3f}" for v in values)


def main() -> None:
    np.set_printoptions(precision=3, suppress=True)
    utilities = np.array(
        [0.9, 0.9, 0.3, 0.0]
    )  # the user takes the best candidate; showing nothing is worth 0
    game = best_of_set(utilities)
    phi = shapley_values(game)
    print("1. Best-of-set game, K = 4: U(S) = max(0, max_{j in S} u_j)")
    print(f"   {'':<22}" + " ".join(f"{n:>9}" for n in NAMES))
    print(f"   {'utility u':<22}{fmt(utilities)}")
    print(f"   {'Shapley phi':<22}{fmt(phi.values)}   (engine: {phi.engine}, sum = R - u0)")
    print(f"   {'leave-one-out m':<22}{fmt(leave_one_out(game))}   (blind to the duplicate)")
    print(f"   R = {game.grand_value:.3f}, u0 = {game.u0:.3f}")
    print(f"   candidate rewards rho = (1 - lam) R + lam (u0 + K phi), lam = {LAM}:")
    for allocation in ALLOCATIONS:
        credit = allocate_credit([game], allocation, LAM)[0]
        print(f"   {'rho ' + allocation:<22}{fmt(credit.rho)}   (mean = {credit.rho.mean():.3f} = R)")

    print("\n2. A group of G = 3 responses to one prompt; advantages A = (rho - mu) / (sigma + 1e-4)")
    group = [utilities, np.array([0.9, 0.5, 0.4, 0.2]), np.array([0.2, 0.1, 0.0, 0.0])]
    for g, u in enumerate(group):
        print(f"   response {g}: utilities {fmt(u)}   R = {u.max():.1f}")
    games = [best_of_set(u) for u in group]
    for allocation in ALLOCATIONS:
        credits = allocate_credit(games, allocation, LAM)
        rho = np.stack([c.rho for c in credits])
        r = np.array([c.set_reward for c in credits])
        adv = group_advantages(rho, np.ones_like(rho, dtype=bool), r, num_generations=len(games))
        print(f"   {allocation}:")
        for g in range(len(games)):
            print(f"     response {g}: A = {fmt(adv.candidate[g])}   (set advantage {adv.set[g]:+.3f})")
    print("   uniform (GRPO) gives the useless candidate of response 0 the same push as the strong one;")
    print("   shapley pushes it down, and splits the strong candidate's credit with its duplicate.")

    hits = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])  # 3 targets (rows) x 4 candidates
    weights = np.array([0.5, 0.3, 0.2])
    cov = coverage(hits, weights=weights)
    print("\n3. Coverage game: U(S) = sum_t w_t [some candidate in S hits target t]")
    for t in range(hits.shape[0]):
        print(f"   target {t} (w = {weights[t]:.1f}) hit by candidates {np.flatnonzero(hits[t]).tolist()}")
    print(f"   Shapley phi = {fmt(shapley_values(cov).values)}   (R = {cov.grand_value:.2f})")
    print("   target 0 is split between candidates 0 and 1; candidate 1 alone covers target 1;")
    print("   candidate 3 covers nothing and gets nothing.")


if __name__ == "__main__":
    main()
