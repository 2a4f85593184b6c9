"""The decisive study: GRPO vs ShapE-GRPO vs leave-one-out vs Winner-Takes-All on recsys worlds where the
prompt decides, each method tuned alike, compared with paired statistics. Measured in one run.

    python benchmarks/convergence.py                 # the default study (see README "Convergence")
    python benchmarks/convergence.py --quick         # 2 seeds, 40 steps, no tuning: a smoke look (minutes)
    python benchmarks/convergence.py --seeds 20 --steps 300 --workers 2   # scale up

Protocol (docs/statistics.md, "The decisive study"); the same for every method:

1. Arms: the recsys presets ``interests`` (K = 4) and ``interests_k8`` (K = 8, the free-rider arm: more slots
   than the user has good items), each with the ``best_of_set`` and the ``coverage`` game. One SFT warm start
   per K (format only: K distinct items that ignore the user), shared by both games and all methods.
2. Reference lines per arm, on the reporting users: a random policy, the warm start (step 0), the best
   prompt-independent set, the per-user top-K oracle (``shapegrpo_core.tasks.recsys.reference_levels``).
3. Credit options, then tuning. The options of per-candidate credit (``missing_slots``: are empty slots null
   players; ``repeats``: do copies split or is a copy a null player) are chosen by ShapE-GRPO's mean score
   over arms on the tuning seed and users, and then used by every credit method (GRPO has no such option).
   Then a grid per method and per arm, on a tuning seed and tuning users never used for reporting: a grid of
   learning rate x format penalty at the full step budget; the score is the mean eval set utility of the last
   three evaluations. The chosen values are printed next to the results.
4. Reporting: seeds 0..N-1 for every (arm, method), each from the same warm start with its tuned values;
   eval every 10 steps up to step 50, then every ``--eval-every`` steps, on the reporting users
   (``--eval-samples`` samples, eval seed 0 everywhere: common random numbers); then a final evaluation of
   the trained policy on all reporting users x ``--final-samples`` samples (again common random numbers).
5. Statistics (``shapegrpo_core.stats``, scipy.stats): per-seed finals; IQM with a bootstrap CI; the paired
   bootstrap CI of each method minus GRPO over seeds, P(improvement), Wilcoxon signed-rank p; wins and
   losses; collapse rate (a run whose last tenth of training had most groups identical); steps to 90% of
   GRPO's gain. An arm *decides* when the paired CI of ShapE-GRPO − GRPO excludes 0 or is narrower than
   ±0.01.

Outputs in ``--results`` (default ``benchmarks/results``): ``convergence.csv`` (one row per run and
evaluation:
``method, game, K, seed, step, eval_set_utility, ...``; ``eval = "curve"`` for the in-training evaluations,
``"final"`` for the final one), ``convergence_runs.csv`` (one row per run: tuned values, collapse, wall time),
``convergence_tuning.csv``, ``convergence.png`` and ``convergence_summary.txt`` (the printed summary).
"""

from __future__ import annotations

import os

# One thread per run and portable CPU kernels: the same seed gives the same numbers on any x86 machine
# (docs/statistics.md, "Determinism"). Set before torch is imported, in this process and in the workers.
for _var, _value in (
    ("OMP_NUM_THREADS", "1"),
    ("MKL_NUM_THREADS", "1"),
    ("OPENBLAS_NUM_THREADS", "1"),
    ("MKL_CBWR", "COMPATIBLE"),
    ("ATEN_CPU_CAPABILITY", "default"),
):
    os.environ.setdefault(_var, _value)

import argparse  # noqa: E402
import csv  # noqa: E402
import itertools  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

RESULTS = Path(__file__).parent / "results"
METHODS = ("grpo", "shapegrpo", "loo", "wta")
ARMS = (
    ("interests", "best_of_set"),
    ("interests", "coverage"),
    ("interests_k8", "best_of_set"),
    ("interests_k8", "coverage"),
)
TUNING_SEED = 1000
DECISIVE_HALF_WIDTH = 0.01
WARM_START = {
    "num_demos": 3000,
    "epochs": 2.0,
    "batch_size": 32,
    "learning_rate": 3e-3,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 2,
    "seed": 0,
}


@dataclass(frozen=True)
class Run:
    """One training run: what a worker process needs (plain values, picklable)."""

    preset: str
    game: str
    method: str
    seed: int
    lr: float
    format_penalty: float
    policy: str
    work_dir: str
    eval_rows: tuple[int, int]
    steps: int
    eval_every: int
    eval_samples: int
    final_samples: int  # 0: no final evaluation (tuning runs)
    num_generations: int
    prompts_per_step: int
    missing_slots: str
    repeats: str
    dense: bool  # also evaluate every 10 steps up to step 50 (reporting runs)


def make_task(preset: str, game: str) -> Any:
    from shapegrpo_core.tasks.recsys import RecsysTask

    return RecsysTask.from_preset(preset, game=game, seed=0)


def completion_length(k: int) -> int:
    """Tokens of an exactly-K answer: K items, K − 1 commas and EOS. A longer answer is cut here, so a
    policy cannot pad past K items and the length never drifts (docs/statistics.md, "Format")."""
    return 2 * k


def run_one(run: Run) -> dict[str, Any]:
    """Train one run and evaluate it; returns its curve, its final evaluation and run facts."""
    import torch

    from shapegrpo_core.batch_credit import collapsed
    from shapegrpo_core.evaluation import evaluate_policy
    from shapegrpo_core.policy import load_policy
    from shapegrpo_core.training import train_policy

    torch.set_num_threads(1)
    task = make_task(run.preset, run.game)
    eval_dataset = task.build_dataset("eval", 0).select(range(*run.eval_rows))
    out = Path(run.work_dir)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = train_policy(
        task,
        run.policy,
        out,
        method=run.method,
        max_steps=run.steps,
        seed=run.seed,
        num_generations=run.num_generations,
        prompts_per_step=run.prompts_per_step,
        learning_rate=run.lr,
        max_completion_length=completion_length(task.num_candidates),
        temperature=1.0,
        beta=0.0,
        format_penalty=run.format_penalty,
        missing_slots=run.missing_slots,
        repeats=run.repeats,
        save_steps=run.steps,  # one checkpoint at the end: the benchmark does not need resumability
        save_total_limit=1,
        eval_every=run.eval_every,
        eval_also_at=tuple(range(10, min(50, run.steps) + 1, 10)) if run.dense else (),
        eval_dataset=eval_dataset,
        eval_num_prompts=None,
        eval_num_samples=run.eval_samples,
        eval_seed=0,
        resume=False,
        logging_steps=1,
        log_level="error",
    )
    train_wall = time.perf_counter() - start
    logged = [h for h in result.history if "shapegrpo/identical_group_rate" in h]
    rates = [h["shapegrpo/identical_group_rate"] for h in logged]
    tail = logged[-max(1, len(logged) // 10) :]  # the window collapsed() looks at
    identical = float(np.mean([h["shapegrpo/identical_group_rate"] for h in tail]))
    entropy = float(np.mean([h.get("entropy", np.nan) for h in tail]))
    final: dict[str, float] = {}
    if run.final_samples:
        model, tokenizer = load_policy(result.final_checkpoint)
        report = evaluate_policy(
            model,
            tokenizer,
            task,
            dataset=eval_dataset,
            num_samples=run.final_samples,
            max_new_tokens=completion_length(task.num_candidates),
            temperature=1.0,
            seed=0,
            num_bootstrap=200,
        )
        final = {f"eval_{k}": v for k, v in report.to_dict().items() if not k.endswith(("_low", "_high"))}
    shutil.rmtree(out, ignore_errors=True)
    return {
        "run": run,
        "curve": result.eval_curve,
        "final": final,
        "identical_group_rate": identical,
        "entropy": entropy,
        "collapsed": collapsed(rates),
        "train_wall_s": train_wall,
        "seconds_per_step": result.seconds_per_step,
    }


def tuning_row(run: Run, score: float, phase: str) -> dict[str, Any]:
    return {
        "phase": phase,
        "preset": run.preset,
        "game": run.game,
        "method": run.method,
        "lr": run.lr,
        "format_penalty": run.format_penalty,
        "missing_slots": run.missing_slots,
        "repeats": run.repeats,
        "score": score,
    }


def tail_score(curve: list[dict[str, float]], last: int = 3) -> float:
    return float(np.mean([e["eval_set_utility"] for e in curve[-last:]]))


def steps_to_reach(curve: dict[int, float], threshold: float) -> int | None:
    """First evaluated step whose seed-mean eval set utility is >= threshold; None if never."""
    return next((s for s in sorted(curve) if curve[s] >= threshold), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=10, help="reported seeds 0..N-1 (default 10)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default 100)")
    p.add_argument("--eval-every", type=int, default=25, help="eval interval after step 50 (default 25)")
    p.add_argument("--eval-prompts", type=int, default=64, help="reporting eval users (first eval rows)")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per user, in-training evaluations")
    p.add_argument("--final-samples", type=int, default=16, help="samples per user, final evaluation")
    p.add_argument("--tune-prompts", type=int, default=32, help="tuning users (the next eval rows)")
    p.add_argument("--lrs", type=str, default="1e-3,2e-3", help="learning-rate grid, tuned per method")
    p.add_argument("--penalties", type=str, default="0.1,0.5", help="format-penalty grid, tuned per method")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument(
        "--missing-slots",
        choices=("auto", "ignore", "null"),
        default="auto",
        help="credit of empty slots; auto: chosen by the credit-options phase",
    )
    p.add_argument(
        "--repeats",
        choices=("auto", "shared", "null"),
        default="auto",
        help="credit of repeated candidates; auto: chosen by the credit-options phase",
    )
    p.add_argument("--arms", type=str, default=",".join(f"{a}:{g}" for a, g in ARMS), help="preset:game,...")
    p.add_argument("--methods", type=str, default=",".join(METHODS), help="grpo first")
    p.add_argument("--workers", type=int, default=2, help="parallel runs (one CPU thread each)")
    p.add_argument("--quick", action="store_true", help="2 seeds, 40 steps, first grid values: a smoke look")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/shapegrpo-convergence"))
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps, args.eval_every = 2, 40, 20
        args.lrs, args.penalties = args.lrs.split(",")[0], args.penalties.split(",")[0]
        args.missing_slots = "null" if args.missing_slots == "auto" else args.missing_slots
        args.repeats = "shared" if args.repeats == "auto" else args.repeats
    arms = [tuple(a.split(":")) for a in args.arms.split(",") if a]
    methods = tuple(m for m in args.methods.split(",") if m)
    if not methods or methods[0] != "grpo":
        p.error("--methods must start with grpo (the reference every difference is taken against)")
    grid = list(
        itertools.product(
            [float(x) for x in args.lrs.split(",")], [float(x) for x in args.penalties.split(",")]
        )
    )
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    from shapegrpo_core.policy import warm_start
    from shapegrpo_core.tasks.recsys import reference_levels

    num_eval = len(make_task(*arms[0]).build_dataset("eval", 0))
    if args.eval_prompts + args.tune_prompts > num_eval:
        raise SystemExit(f"--eval-prompts + --tune-prompts must be <= {num_eval} (eval users)")
    report_rows = (0, args.eval_prompts)
    tune_rows = (args.eval_prompts, args.eval_prompts + args.tune_prompts)
    policies: dict[str, Path] = {}
    references: dict[tuple[str, str], dict[str, float]] = {}
    for preset, game in arms:
        task = make_task(preset, game)
        if preset not in policies:
            policies[preset] = args.work_dir / f"warm_start_{preset}"
            if not (policies[preset] / "config.json").is_file():
                warm_start(task, policies[preset], **WARM_START)
        references[(preset, game)] = reference_levels(
            task, task.build_dataset("eval", 0).select(range(*report_rows))
        )
    print(f"warm starts ready ({time.perf_counter() - t0:.0f} s)", flush=True)

    def make_run(
        preset: str,
        game: str,
        method: str,
        seed: int,
        lr: float,
        pen: float,
        tuning: bool,
        options: tuple[str, str],
    ) -> Run:
        tag = f"{preset}-{game}-{method}-{seed}-{lr:g}-{pen:g}-{'-'.join(options)}"
        return Run(
            preset,
            game,
            method,
            seed,
            lr,
            pen,
            str(policies[preset]),
            str(args.work_dir / tag),
            tune_rows if tuning else report_rows,
            args.steps,
            args.eval_every,
            args.eval_samples,
            0 if tuning else args.final_samples,
            args.num_generations,
            args.prompts_per_step,
            *options,
            dense=not tuning,
        )

    tuning_rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        # -- credit options: ShapE-GRPO with each (missing_slots, repeats) left "auto", on the tuning seed and
        # users at the first grid point; the best mean over arms becomes every credit method's setting
        slot_choices = ("ignore", "null") if args.missing_slots == "auto" else (args.missing_slots,)
        repeat_choices = ("shared", "null") if args.repeats == "auto" else (args.repeats,)
        combos = list(itertools.product(slot_choices, repeat_choices))
        options = combos[0]
        if len(combos) > 1:
            lr0, pen0 = grid[0]
            option_runs = [
                make_run(a, g, "shapegrpo", TUNING_SEED, lr0, pen0, True, c) for a, g in arms for c in combos
            ]
            option_score: dict[tuple[str, str], list[float]] = defaultdict(list)
            for r in pool.map(run_one, option_runs):
                run = r["run"]
                score = tail_score(r["curve"])
                option_score[(run.missing_slots, run.repeats)].append(score)
                tuning_rows.append(tuning_row(run, score, "credit_options"))
                print(
                    f"  options {run.preset}/{run.game} missing_slots={run.missing_slots} "
                    f"repeats={run.repeats}: {score:.4f}",
                    flush=True,
                )
            options = max(combos, key=lambda c: float(np.mean(option_score[c])))
        args.missing_slots, args.repeats = options
        # -- tuning: every (arm, method, grid point) on the tuning seed and tuning users -----------
        tuning_runs = [
            make_run(a, g, m, TUNING_SEED, lr, pen, True, options)
            for a, g in arms
            for m in methods
            for lr, pen in grid
        ]
        tuned: dict[tuple[str, str, str], tuple[float, float]] = {}
        for r in pool.map(run_one, tuning_runs if len(grid) > 1 else []):
            run = r["run"]
            score = tail_score(r["curve"])
            tuning_rows.append(tuning_row(run, score, "grid"))
            print(
                f"  tune {run.preset}/{run.game} {run.method} lr={run.lr:g} pen={run.format_penalty:g}: "
                f"{score:.4f}",
                flush=True,
            )
        for a, g in arms:
            for m in methods:
                rows = [
                    t
                    for t in tuning_rows
                    if t["phase"] == "grid" and (t["preset"], t["game"], t["method"]) == (a, g, m)
                ]
                best = max(rows, key=lambda t: t["score"]) if rows else None
                tuned[(a, g, m)] = (best["lr"], best["format_penalty"]) if best else grid[0]
        tune_wall = time.perf_counter() - t0
        # -- reporting: interleaved (arm, seed, method) so load drift hits every method alike ------
        runs = [
            make_run(a, g, m, s, *tuned[(a, g, m)], False, options)
            for a, g in arms
            for s in range(args.seeds)
            for m in methods
        ]
        results = []
        for r in pool.map(run_one, runs):
            run = r["run"]
            results.append(r)
            print(
                f"  {run.preset}/{run.game} seed={run.seed} {run.method}: final "
                f"{r['final']['eval_set_utility']:.4f} collapsed={r['collapsed']} "
                f"({r['train_wall_s']:.0f} s)",
                flush=True,
            )

    write_outputs(args, arms, methods, references, tuned, tuning_rows, results, t0, tune_wall)


def k_of(preset: str) -> int:
    return make_task(preset, "best_of_set").num_candidates


def write_outputs(
    args: argparse.Namespace,
    arms: list[tuple[str, ...]],
    methods: tuple[str, ...],
    references: dict[tuple[str, str], dict[str, float]],
    tuned: dict[tuple[str, str, str], tuple[float, float]],
    tuning_rows: list[dict[str, Any]],
    results: list[dict[str, Any]],
    t0: float,
    tune_wall: float,
) -> None:
    from shapegrpo_core.stats import bootstrap_iqm_ci, paired_difference

    ks = {a: k_of(a) for a, _ in arms}
    rows, run_rows = [], []
    for r in results:
        run: Run = r["run"]
        key = {
            "method": run.method,
            "game": run.game,
            "K": ks[run.preset],
            "preset": run.preset,
            "seed": run.seed,
        }
        for e in r["curve"]:
            rows.append(
                key
                | {
                    "eval": "curve",
                    "step": e["step"],
                    "eval_set_utility": e["eval_set_utility"],
                    "eval_candidate_utility": e["eval_candidate_utility"],
                    "eval_format_valid_rate": e["eval_format_valid_rate"],
                    "eval_duplicate_rate": e["eval_duplicate_rate"],
                }
            )
        f = r["final"]
        rows.append(
            key
            | {
                "eval": "final",
                "step": run.steps,
                "eval_set_utility": f["eval_set_utility"],
                "eval_candidate_utility": f["eval_candidate_utility"],
                "eval_format_valid_rate": f["eval_format_valid_rate"],
                "eval_duplicate_rate": f["eval_duplicate_rate"],
            }
        )
        run_rows.append(
            key
            | {
                "lr": run.lr,
                "format_penalty": run.format_penalty,
                "collapsed": r["collapsed"],
                "identical_group_rate": r["identical_group_rate"],
                "entropy": r["entropy"],
                "train_wall_s": r["train_wall_s"],
                "seconds_per_step": r["seconds_per_step"],
            }
        )
    write_csv(args.results / "convergence.csv", rows)
    write_csv(args.results / "convergence_runs.csv", run_rows)
    if tuning_rows:
        write_csv(args.results / "convergence_tuning.csv", tuning_rows)

    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    say("ShapE-GRPO decisive study (recsys presets; benchmarks/convergence.py)")
    say(
        f"budget per run: {args.steps} steps, G={args.num_generations}, "
        f"{args.prompts_per_step} prompts/step, "
        f"max_completion_length=2K; {args.seeds} paired seeds per method and arm; missing_slots="
        f"{args.missing_slots}, repeats={args.repeats}"
    )
    say(
        f"evaluation: curves on {args.eval_prompts} users x {args.eval_samples} samples "
        "(every 10 steps to 50, "
        f"then every {args.eval_every}); final on {args.eval_prompts} users x {args.final_samples} samples; "
        "common random numbers everywhere"
    )
    say(
        f"tuning per method and arm: lr in {{{args.lrs}}} x format penalty in {{{args.penalties}}}, seed "
        f"{TUNING_SEED}, {args.tune_prompts} tuning users disjoint from the reporting ones"
    )
    option_rows = [t for t in tuning_rows if t["phase"] == "credit_options"]
    if option_rows:
        by_option: dict[str, list[float]] = defaultdict(list)
        for t in option_rows:
            by_option[f"missing_slots={t['missing_slots']}, repeats={t['repeats']}"].append(t["score"])
        tried = "; ".join(f"{k}: {np.mean(v):.4f}" for k, v in by_option.items())
        say(f"credit options (ShapE-GRPO, tuning seed and users, mean over arms): {tried}")
    finals: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    curves: dict[tuple[str, str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        k = (row["preset"], row["game"], row["method"])
        if row["eval"] == "final":
            finals[k][row["seed"]] = row["eval_set_utility"]
        else:
            curves[k][row["step"]].append(row["eval_set_utility"])
    facts = {(r["preset"], r["game"], r["method"], r["seed"]): r for r in run_rows}
    quality = defaultdict(list)
    for row in rows:
        if row["eval"] == "final":
            quality[(row["preset"], row["game"], row["method"])].append(row)
    for preset, game in arms:
        ref = references[(preset, game)]
        grpo_curve = {s: float(np.mean(v)) for s, v in curves[(preset, game, "grpo")].items()}
        start = grpo_curve[0]
        grpo_final = float(np.mean(list(finals[(preset, game, "grpo")].values())))
        gain_threshold = start + 0.9 * (grpo_curve[max(grpo_curve)] - start)
        say()
        say(
            f"arm {preset} / {game} (K={ks[preset]}): reference lines random {ref['random']:.3f}, "
            f"warm start {start:.3f}, best prompt-independent set {ref['prompt_independent']:.3f}, "
            f"top-K oracle {ref['oracle']:.3f}; GRPO final {grpo_final:.3f} "
            f"(gain over warm start {grpo_final - start:+.3f})"
        )
        say(
            f"  {'method':<10} {'lr':>6} {'pen':>4} {'mean':>7} {'IQM [95% CI]':>24} "
            f"{'vs GRPO [95% paired CI]':>30} {'P(impr)':>7} {'wilcoxon':>8} {'W/L':>5} {'collapsed':>9} "
            f"{'valid':>6} {'dup':>5} {'90%gain@':>8}"
        )
        seeds = sorted(finals[(preset, game, "grpo")])
        base = np.array([finals[(preset, game, "grpo")][s] for s in seeds])
        for m in methods:
            x = np.array([finals[(preset, game, m)][s] for s in seeds])
            q, qlo, qhi = bootstrap_iqm_ci(x, seed=0)
            lr, pen = tuned[(preset, game, m)]
            collapsed = sum(facts[(preset, game, m, s)]["collapsed"] for s in seeds)
            valid = np.mean([r["eval_format_valid_rate"] for r in quality[(preset, game, m)]])
            dup = np.mean([r["eval_duplicate_rate"] for r in quality[(preset, game, m)]])
            curve = {s: float(np.mean(v)) for s, v in curves[(preset, game, m)].items()}
            reach = steps_to_reach(curve, gain_threshold)
            if m == "grpo":
                versus = f"{'(reference)':>30} {'':>7} {'':>8} {'':>5}"
            else:
                d = paired_difference(x, base, seed=0)
                wins, losses = int((x > base).sum()), int((x < base).sum())
                versus = (
                    f"{f'{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]':>30} {d.p_improvement:>7.2f} "
                    f"{d.wilcoxon_p:>8.3f} {f'{wins}/{losses}':>5}"
                )
            say(
                f"  {m:<10} {lr:>6g} {pen:>4g} {x.mean():>7.4f} "
                f"{f'{q:.4f} [{qlo:.4f}, {qhi:.4f}]':>24} {versus} "
                f"{f'{collapsed}/{len(seeds)}':>9} {valid:>6.2f} {dup:>5.2f} "
                f"{('never' if reach is None else reach):>8}"
            )
        say("  per-seed finals (seed: " + " ".join(str(s) for s in seeds) + ")")
        for m in methods:
            say(f"    {m:<10} " + " ".join(f"{finals[(preset, game, m)][s]:.3f}" for s in seeds))
        if "shapegrpo" in methods:
            x = np.array([finals[(preset, game, "shapegrpo")][s] for s in seeds])
            d = paired_difference(x, base, seed=0)
            if d.excludes_zero:
                verdict = f"decides: ShapE-GRPO {'beats' if d.mean > 0 else 'loses to'} GRPO (CI excludes 0)"
            elif max(d.high - d.mean, d.mean - d.low) < DECISIVE_HALF_WIDTH:
                verdict = f"decides: no difference larger than ±{DECISIVE_HALF_WIDTH} (CI narrower than that)"
            else:
                verdict = (
                    "does NOT decide: the paired CI includes 0 and is wider than ±0.01 (more seeds needed)"
                )
            say(f"  verdict: {verdict}")
    wall = time.perf_counter() - t0
    say()
    say(
        f"total wall-clock: {wall / 60:.1f} min on {args.workers} workers (tuning {tune_wall / 60:.1f} min); "
        f"raw rows in {args.results / 'convergence.csv'}"
    )
    (args.results / "convergence_summary.txt").write_text("\n".join(lines) + "\n")
    plot(rows, arms, methods, references, ks, args.results / "convergence.png")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(
    rows: list[dict[str, Any]],
    arms: list[tuple[str, ...]],
    methods: tuple[str, ...],
    references: dict[tuple[str, str], dict[str, float]],
    ks: dict[str, int],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats as sps

    colors = {"grpo": "tab:gray", "shapegrpo": "tab:blue", "loo": "tab:orange", "wta": "tab:green"}
    cols = 2 if len(arms) > 1 else 1
    fig, axes = plt.subplots(
        (len(arms) + 1) // 2, cols, figsize=(6.5 * cols, 4.2 * ((len(arms) + 1) // 2)), squeeze=False
    )
    for ax, (preset, game) in zip(axes.flat, arms, strict=False):
        warm = []
        for m in methods:
            per_step: dict[int, list[float]] = defaultdict(list)
            for r in rows:
                if (r["preset"], r["game"], r["method"], r["eval"]) == (preset, game, m, "curve"):
                    per_step[r["step"]].append(r["eval_set_utility"])
            steps = sorted(per_step)
            mean = np.array([np.mean(per_step[s]) for s in steps])
            half = np.array([sps.sem(per_step[s]) * sps.t.ppf(0.975, len(per_step[s]) - 1) for s in steps])
            ax.plot(steps, mean, label=m, color=colors.get(m), marker="o", ms=2.5)
            ax.fill_between(steps, mean - half, mean + half, color=colors.get(m), alpha=0.2)
            warm.append(mean[0])
        ref = references[(preset, game)]
        for name, level, style in (
            ("random", ref["random"], ":"),
            ("warm start", float(np.mean(warm)), "-."),
            ("prompt-independent", ref["prompt_independent"], "--"),
            ("oracle", ref["oracle"], "-"),
        ):
            ax.axhline(level, color="black", lw=0.8, ls=style, alpha=0.6)
            ax.annotate(name, (0, level), fontsize=7, va="bottom", alpha=0.7)
        ax.set_title(f"{game}, K={ks[preset]} ({preset})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out eval set utility")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center right")
    fig.suptitle(
        "mean over seeds with 95% t-band; reference lines: random, warm start, prompt-independent, oracle"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
