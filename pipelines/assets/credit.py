"""Credit domain: Shapley (and leave-one-out) credit per candidate, candidate rewards and advantages under
each allocation, and free-rider statistics."""

import dagster as dg
import pandas as pd

from pipelines.config import CreditConfig
from pipelines.reporting import figure_png, histogram, md_preview, png_md
from pipelines.resources import MLflowResource, StorageResource
from pipelines.tracking import log_file, log_metrics, log_table, stage_run
from shapegrpo_core import evaluation
from shapegrpo_core.credit import ALLOCATIONS
from shapegrpo_core.credit_table import credit_table, free_rider_stats


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
    rollout_scores: pd.DataFrame,
    mlflow: MLflowResource,
    storage: StorageResource,
) -> dg.Output[pd.DataFrame]:
    # Credit from the stored games: the rollouts were scored once, by rollout_scores (no task, no sandbox).
    scores = evaluation.scores_from_table(rollout_scores)
    # The format penalty is applied, so rho and the advantages are the ones training would assign to these
    # rollouts (the penalty shifts an invalid response's whole game: phi and the efficiency check are
    # unchanged). format_penalty=0 shows the unpenalised credit.
    df = credit_table(
        scores,
        rollout_scores["prompt_index"].to_numpy(),
        rollout_scores["generation"].to_numpy(),
        lam=config.lam,
        scale_rewards=config.scale_rewards,
        engine=config.engine,
        seed=config.seed,
        format_penalty=config.format_penalty,
    )
    stats = free_rider_stats(df, config.free_rider_tol)
    real = df[df["candidate_index"] >= 0]
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
    engines = ",".join(sorted(set(df["shapley_engine"]) - {""}))
    params = config.model_dump() | {"shapley_engines": engines}
    with stage_run(mlflow, context, "credit", params=params) as rid:
        log_metrics(mlflow, rid, stats)
        log_table(mlflow, rid, df, "shapley_credits", out_dir)
        for name in ("credit_histogram.png", "advantage_histogram.png"):
            log_file(mlflow, rid, out_dir / name, "plots")
    return dg.Output(
        df,
        metadata={
            **stats,
            "shapley_engines": engines,
            "dagster/row_count": len(df),
            "mlflow_run_id": rid,
            "credit_histogram": png_md(png, "credit histogram"),
            "advantage_histogram": png_md(adv_png, "advantage histogram"),
            "preview": md_preview(df),
        },
    )
