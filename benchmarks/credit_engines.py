"""Throughput of the Shapley engines on best-of-set games, one thread, measured in one run.

    python benchmarks/credit_engines.py [--games 100000] [--seed 0] [--repeats 15]

For K in {4, 8, 16} and N random best-of-set games (utilities uniform in [0, 1)), prints games per second
of: the public call ``shapley_values(best_of_set(scores))`` (game construction and validation included);
the closed form on an already built game; exact enumeration (2^K coalitions; fewer games at K = 16, said in
the table); permutation Monte Carlo at a fixed budget; a naive pure-Python brute force (textbook formula,
small sample). It also prints the public call's time over a plain ``numpy.sort`` of the same (N, K) scores —
the floor any exact method pays — and checks that the engines agree (closed form vs exact and brute force,
Monte Carlo within 4 SE).

Timings are CPU seconds of the single thread (``time.process_time``; BLAS/OpenMP pools are pinned to one
thread), best of several repeats, with the public call, the closed form and the sort interleaved so that
all three see the same machine state. CPU time rather than wall time keeps the numbers meaningful on a
shared machine.
"""

from __future__ import annotations

import os

# One core: pin every BLAS/OpenMP pool before numpy is imported.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

from shapegrpo_core.games import best_of_set  # noqa: E402
from shapegrpo_core.shapley import (  # noqa: E402
    shapley_closed_form,
    shapley_exact,
    shapley_monte_carlo,
    shapley_values,
)

MC_PERMUTATIONS = 64
EXACT_GAMES = {4: None, 8: None, 16: 2_000}  # None = all N games
MC_GAMES = {4: 20_000, 8: 20_000, 16: 5_000}
BRUTE_GAMES = {4: 200, 8: 10, 16: 1}


def best_time(fn: Callable[[], object], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def interleaved_best(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.process_time()
            fn()
            best[i] = min(best[i], time.process_time() - start)
    return best


def brute_force_shapley(utilities: list[float]) -> list[float]:
    """Textbook Shapley values of U(S) = max(0, max_{j in S} u_j), pure Python."""
    k = len(utilities)

    def value(coalition: tuple[int, ...]) -> float:
        return max([0.0, *(utilities[j] for j in coalition)])

    phi = [0.0] * k
    for i in range(k):
        others = [j for j in range(k) if j != i]
        for size in range(k):
            weight = math.factorial(size) * math.factorial(k - size - 1) / math.factorial(k)
            for coalition in itertools.combinations(others, size):
                phi[i] += weight * (value((*coalition, i)) - value(coalition))
    return phi


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--games", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    n = args.games

    print(f"numpy {np.__version__}, Python {platform.python_version()}, {platform.machine()}")
    print("one thread (BLAS/OpenMP pinned), CPU time, best of repeats")
    print(f"{n:,} best-of-set games per K; Monte Carlo budget {MC_PERMUTATIONS} permutations (antithetic)\n")
    header = (
        f"{'K':>3} | {'public call':>13} | {'public/sort':>11} | {'closed form':>14} | {'exact':>25} | "
        f"{'monte carlo':>25} | {'brute force (Python)':>25} | {'public/brute':>12}"
    )
    print(header)
    print("-" * len(header))
    checks = []
    for k in (4, 8, 16):
        utilities = rng.random((n, k))
        game = best_of_set(utilities)

        t_public, t_closed, t_sort = interleaved_best(
            [
                lambda u=utilities: shapley_values(best_of_set(u)),
                lambda game=game: shapley_closed_form(game),
                lambda u=utilities: np.sort(u, axis=1),
            ],
            args.repeats,
        )
        public = shapley_values(best_of_set(utilities))
        closed = shapley_closed_form(game)
        if public.engine != "closed_form" or not np.array_equal(public.values, closed):
            raise RuntimeError(f"K={k}: the public call did not reproduce the closed form")
        t_build = best_time(lambda u=utilities: best_of_set(u), args.repeats)

        n_exact = EXACT_GAMES[k] or n
        sub = best_of_set(utilities[:n_exact])
        t_exact = best_time(lambda sub=sub: shapley_exact(sub), 1 if k == 16 else 3)
        exact = shapley_exact(sub)

        n_mc = min(MC_GAMES[k], n)
        mc_game = best_of_set(utilities[:n_mc])
        t_mc = best_time(lambda g=mc_game: shapley_monte_carlo(g, MC_PERMUTATIONS, seed=args.seed), 1)
        mc, se = shapley_monte_carlo(mc_game, MC_PERMUTATIONS, seed=args.seed)

        n_brute = BRUTE_GAMES[k]
        rows = utilities[:n_brute].tolist()
        start = time.process_time()
        brute = np.array([brute_force_shapley(row) for row in rows])
        t_brute = time.process_time() - start

        rate = {
            "public": n / t_public,
            "closed": n / t_closed,
            "exact": n_exact / t_exact,
            "mc": n_mc / t_mc,
            "brute": n_brute / t_brute,
        }
        print(
            f"{k:>3} | {rate['public']:>9,.0f} g/s | {t_public / t_sort:>10.2f}x | "
            f"{rate['closed']:>10,.0f} g/s | "
            f"{rate['exact']:>11,.0f} g/s ({n_exact:>7,}) | {rate['mc']:>11,.0f} g/s ({n_mc:>7,}) | "
            f"{rate['brute']:>11,.1f} g/s ({n_brute:>7,}) | {rate['public'] / rate['brute']:>11,.0f}x"
        )
        checks.append(
            (
                k,
                t_sort,
                t_build,
                t_closed,
                float(np.abs(closed[:n_exact] - exact).max()),
                float(np.abs(closed[:n_brute] - brute).max()),
                float((np.abs(mc - closed[:n_mc]) <= 4 * se + 1e-12).mean()),
            )
        )

    print(
        "\n(g/s = games per second; in parentheses: games measured; public call, closed form and sort: all N;"
        "\n public call = shapley_values(best_of_set(scores)), construction and validation included)"
    )
    print("target: public call >= 3,000,000 g/s at K = 8 and public/sort <= 3x\n")
    print(
        f"{'K':>3} | {'np.sort (ms)':>12} | {'build game (ms)':>15} | {'closed form (ms)':>16} | "
        f"{'|closed-exact|':>14} | {'|closed-brute|':>14} | {'MC within 4 SE':>14}"
    )
    for k, t_sort, t_build, t_closed, d_exact, d_brute, frac in checks:
        print(
            f"{k:>3} | {t_sort * 1e3:>12.2f} | {t_build * 1e3:>15.2f} | {t_closed * 1e3:>16.2f} | "
            f"{d_exact:>14.1e} | {d_brute:>14.1e} | {frac:>13.2%}"
        )
    print("(MC within 4 SE: share of Monte Carlo estimates within 4 standard errors of the exact values)")


if __name__ == "__main__":
    main()
