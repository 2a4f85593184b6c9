"""Jobs and the retraining schedule.

Both jobs carry run tags that cover every method partition, so one run trains and evaluates all methods
(same warm start, seed and budget) in one process and the comparison sees them together.
"""

import dagster as dg

from pipelines.partitions import ALL_METHODS_TAGS
from pipelines.reporting import comparison_summary


@dg.success_hook(name="print_comparison")
def print_comparison(context: dg.HookContext) -> None:
    """Print the comparison table and the report's path once ``method_comparison`` succeeds, so that
    `dagster job execute` ends with them instead of only Dagster's event log."""
    if context.op.name != "method_comparison":
        return
    result = context.op_output_values.get("result")
    if result:
        print(comparison_summary(result), flush=True)


# Runs that train: a queued run coordinator can limit how many of them run at once (deploy/dagster.yaml).
TRAINING_TAGS = {**ALL_METHODS_TAGS, "shapegrpo/trains": "true"}

compare_methods = dg.define_asset_job(
    name="compare_methods",
    selection=dg.AssetSelection.all(),
    tags=TRAINING_TAGS,
    hooks={print_comparison},
    description="The full chain: dataset, base policy, rollouts, their scores, credits, fine-tuning per "
    "method, evaluation and the comparison (champion alias).",
)

retrain = dg.define_asset_job(
    name="retrain",
    selection=dg.AssetSelection.assets("fine_tuned_policy", "policy_evaluation", "method_comparison"),
    tags=TRAINING_TAGS,
    hooks={print_comparison},
    description="Fine-tune every method from the current base policy, evaluate and compare.",
)

weekly_retrain = dg.ScheduleDefinition(
    name="weekly_retrain",
    job=retrain,
    cron_schedule="0 3 * * 1",  # Mondays 03:00
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Retrain and re-compare weekly (turn on in the UI or with `dagster schedule start`).",
)

all_jobs = [compare_methods, retrain]
all_schedules = [weekly_retrain]
