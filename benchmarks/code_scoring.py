"""Throughput of the ``code`` task's scorer, and the sandbox's overhead per candidate.

Runs the HumanEval canonical solutions (every one passes all its assertion units) three ways, in one run:

* sandboxed: ``sandbox.run_jobs`` (referee + candidate under bubblewrap and seccomp in its own cgroup,
  rlimits, per-unit verdicts), ``--workers`` threads;
* plain subprocess: ``python -c <prompt + solution + test + check(entry_point)>``, no isolation, same
  number of worker threads;
* in-process: ``exec`` of the same program in this interpreter, one at a time (the GIL would serialise
  threads anyway).

Prints candidates per second for each, and the sandbox's time per candidate as a ratio to the other two
(wall time per candidate at equal parallelism; in-process per-candidate time is single-threaded). The machine
may be shared: the load average is printed with the numbers, and ratios are only compared within one run.

    python benchmarks/code_scoring.py [--problems 164] [--workers 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import os
import subprocess
import sys
import time

from shapegrpo_core.tasks.code import candidate_program, checker_source, load_problems
from shapegrpo_core.tasks.sandbox import SandboxJob, SandboxLimits, capabilities, run_jobs


def plain_program(problem: dict) -> str:
    program = candidate_program(problem["prompt"], problem["entry_point"], problem["canonical_solution"])
    return f"{program}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def run_plain_subprocess(programs: list[str], workers: int) -> list[bool]:
    def one(program: str) -> bool:
        r = subprocess.run(
            [sys.executable, "-I", "-S", "-c", program], capture_output=True, timeout=60, check=False
        )
        return r.returncode == 0

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, programs))


def run_in_process(programs: list[str]) -> list[bool]:
    ok = []
    for program in programs:
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                exec(compile(program, "<candidate>", "exec"), {"__name__": "__candidate__"})
                ok.append(True)
            except AssertionError:
                ok.append(False)
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=164)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    problems = load_problems()[: args.problems]
    n = len(problems)
    caps = capabilities()  # probe once, outside the timed region
    print(
        f"machine: {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}; sandbox capabilities: {caps}"
    )

    jobs = []
    for p in problems:
        source, units = checker_source(p["prompt"], p["test"])
        program = candidate_program(p["prompt"], p["entry_point"], p["canonical_solution"])
        jobs.append(SandboxJob(program, p["entry_point"], source, units))
    plain = [plain_program(p) for p in problems]
    limits = SandboxLimits(timeout_s=30, call_timeout_s=10)

    t0 = time.perf_counter()
    results = run_jobs(jobs, limits, max_workers=args.workers)
    t_sandbox = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain_ok = run_plain_subprocess(plain, args.workers)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    inproc_ok = run_in_process(plain)
    t_inproc = time.perf_counter() - t0

    units = sum(j.num_units for j in jobs)
    passed = sum(all(r.passed) for r in results)
    print(f"candidates: {n} HumanEval canonical solutions, {units} assertion units")
    print(f"all units passed (sandboxed): {passed}/{n}; plain subprocess: {sum(plain_ok)}/{n}; ", end="")
    print(f"in-process: {sum(inproc_ok)}/{n}")
    print(f"{'mode':<34}{'wall s':>9}{'cand/s':>9}{'ms/cand':>10}")
    for name, t in [
        (f"sandboxed ({args.workers} workers)", t_sandbox),
        (f"plain subprocess ({args.workers} workers)", t_plain),
        ("in-process (1 thread)", t_inproc),
    ]:
        print(f"{name:<34}{t:>9.2f}{n / t:>9.1f}{1000 * t / n:>10.1f}")
    print(f"sandbox overhead per candidate: {t_sandbox / t_plain:.2f}x plain subprocess, ", end="")
    print(f"{t_sandbox / t_inproc:.1f}x in-process")
    per_job = sorted(r.wall_s for r in results)
    print(f"sandboxed wall per candidate (its own clock): median {1000 * per_job[n // 2]:.0f} ms, ", end="")
    print(f"max {1000 * per_job[-1]:.0f} ms")


if __name__ == "__main__":
    main()
