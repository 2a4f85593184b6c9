"""Credit domain: Shapley (and leave-one-out) credit per candidate, candidate rewards and advantages under
each allocation, and free-rider statistics."""

from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from pipelines.config import CreditConfig
from pipelines.reporting import figure_png, histogram, md_preview, png_md
from pipelines.resources import MLflowResource, StorageResource
from pipelines.taskio import load_rows, load_task
from pipelines.tracking import log_file, log_metrics, log_table, stage_run
from shapegrpo_core.credit import ALLOCATIONS, allocate_credit, group_advantages
from shapegrpo_core.evaluation import try_score_response


def _padded(values: list[np.ndarray], width: int, fill: float) -> np.ndarray:
    out = np.full((len(values), width), fill)  # (N, K)
    for row, v in enumerate(values):
        out[row, : len(v)] = v
    return out


@dg.asset(
    group_name="credit",
    kinds={"python", "parquet"},
    description="Per candidate: Shapley value phi, efficient leave-one-out credit, and the candidate reward "
    "rho and group-relative advantage under each allocation (uniform = GRPO, shapley, loo). Free riders are "
    "candidates with phi = 0 in a set worth more than u0: GRPO pays them the full set reward.",
)
def shapley_credits(
    context: dg.AssetExecutionContext,
    config: CreditConfig,
    task_dataset: dict[str, Any],
    candidate_sets: pd.DataFrame,
    candidate_utilities: pd.DataFrame,
    mlflow: MLflowResource,
    storage: StorageResource,
) -> dg.Output[pd.DataFrame]:
    task = load_task(task_dataset)
    sets = candidate_sets.sort_values(["prompt_index", "generation"]).reset_index(drop=True)
    group_sizes = sets.groupby("prompt_index").size()
    if group_sizes.nunique() != 1:
        raise ValueError(
            f"every prompt needs the same number of responses G, got sizes {group_sizes.unique()}"
        )
    num_generations = int(group_sizes.iloc[0])
    examples = load_rows(task_dataset, "train", limit=int(sets["prompt_index"].max()) + 1)
    scores = [
        try_score_response(task, r["completion"], examples[int(r["prompt_index"])])
        for _, r in sets.iterrows()
    ]
    scored = np.array([s is not None for s in scores])  # (N,) False: the scorer failed, R is NaN
    games = [s.game for s in scores if s is not None]
    k_g = np.array([s.num_scored if s is not None else 0 for s in scores])  # (N,)
    width = max(1, int(k_g.max()))
    mask = np.arange(width)[None, :] < k_g[:, None]  # (N, K)

    per_alloc: dict[str, dict[str, np.ndarray]] = {}
    engines: dict[str, str] = {}
    for allocation in ALLOCATIONS:
        credit = iter(allocate_credit(games, allocation, config.lam, engine=config.engine, seed=config.seed))
        rows = [next(credit) if ok else None for ok in scored]
        nan = np.full(0, np.nan)
        rho = _padded([c.rho if c else nan for c in rows], width, np.nan)  # (N, K)
        reward = np.array([c.set_reward if c else np.nan for c in rows])  # (N,)
        adv = group_advantages(rho, mask, reward, num_generations, scale_rewards=config.scale_rewards)
        per_alloc[allocation] = {
            "phi": _padded([c.phi if c else nan for c in rows], width, 0.0),
            "rho": rho,
            "advantage": adv.candidate,
            "set_advantage": adv.set,
            "set_reward": reward,
            "u0": np.array([c.u0 if c else np.nan for c in rows]),
        }
        engines[allocation] = ",".join(sorted({c.engine for c in rows if c}))

    shap, loo = per_alloc["shapley"], per_alloc["loo"]
    # Hand-off guard: the set rewards credited here are the utilities recorded upstream.
    keys = ["prompt_index", "generation"]
    upstream = candidate_utilities.drop_duplicates(keys).set_index(keys)["set_utility"]
    recorded = upstream.reindex(pd.MultiIndex.from_frame(sets[keys])).to_numpy(dtype=float)
    if not np.allclose(recorded, shap["set_reward"], equal_nan=True):
        raise ValueError("set rewards differ from candidate_utilities: rematerialize candidate_utilities")
    records = []
    for n, row in sets.iterrows():
        k = int(k_g[n])
        base = {
            "prompt_index": int(row["prompt_index"]),
            "generation": int(row["generation"]),
            "num_scored": k,
            "set_reward": float(shap["set_reward"][n]),
            "u0": float(shap["u0"][n]),
        }
        # A response without candidates is one pseudo-candidate carrying the set reward (DESIGN §2).
        indices = range(k) if k else [-1]
        for i in indices:
            rec = base | {
                "candidate_index": i,
                "candidate": scores[n].candidates[i].text if i >= 0 else "",
                "phi": float(shap["phi"][n, i]) if i >= 0 else 0.0,
                "phi_loo": float(loo["phi"][n, i]) if i >= 0 else 0.0,
            }
            for allocation, a in per_alloc.items():
                rec[f"rho_{allocation}"] = float(a["rho"][n, i]) if i >= 0 else base["set_reward"]
                rec[f"advantage_{allocation}"] = float(
                    a["advantage"][n, i] if i >= 0 else a["set_advantage"][n]
                )
                rec[f"set_advantage_{allocation}"] = float(a["set_advantage"][n])
            records.append(rec)
    df = pd.DataFrame.from_records(records)

    real = df[df["candidate_index"] >= 0]
    tol = config.free_rider_tol
    free = real[(real["phi"] <= tol) & (real["set_reward"] > real["u0"] + tol)]
    stats = {
        "num_sets": len(sets),
        "num_nan_sets": int((~scored).sum()),
        "num_candidates": len(real),
        "num_generations": num_generations,
        "free_rider_rate": float(len(free) / max(1, len(real))),
        "free_rider_grpo_reward": float(free["rho_uniform"].mean()) if len(free) else 0.0,
        "free_rider_shapley_reward": float(free["rho_shapley"].mean()) if len(free) else 0.0,
        "free_rider_grpo_advantage": float(free["advantage_uniform"].mean()) if len(free) else 0.0,
        "free_rider_shapley_advantage": float(free["advantage_shapley"].mean()) if len(free) else 0.0,
        "tied_group_rate": float(
            sets.assign(r=shap["set_reward"]).groupby("prompt_index")["r"].nunique().eq(1).mean()
        ),
        "mean_abs_advantage_uniform": float(real["advantage_uniform"].abs().mean()),
        "mean_abs_advantage_shapley": float(real["advantage_shapley"].abs().mean()),
    }
    out_dir = storage.run_dir(context, "shapley_credits")
    png = figure_png(
        histogram(
            {"phi (Shapley)": real["phi"], "phi (LOO, efficient)": real["phi_loo"]},
            f"Candidate credit ({stats['free_rider_rate']:.0%} free riders)",
            "credit",
        ),
        out_dir / "credit_histogram.png",
    )
    adv_png = figure_png(
        histogram(
            {f"advantage ({a})": real[f"advantage_{a}"] for a in ALLOCATIONS},
            "Candidate advantages",
            "advantage",
        ),
        out_dir / "advantage_histogram.png",
    )
    params = config.model_dump() | {f"engine_{a}": e for a, e in engines.items()}
    with stage_run(mlflow, context, "credit", params=params) as rid:
        log_metrics(mlflow, rid, stats)
        log_table(mlflow, rid, df, "shapley_credits", out_dir)
        for name in ("credit_histogram.png", "advantage_histogram.png"):
            log_file(mlflow, rid, out_dir / name, "plots")
    return dg.Output(
        df,
        metadata={
            **stats,
            "engines": str(engines),
            "dagster/row_count": len(df),
            "mlflow_run_id": rid,
            "credit_histogram": png_md(png, "credit histogram"),
            "advantage_histogram": png_md(adv_png, "advantage histogram"),
            "preview": md_preview(df),
        },
    )
