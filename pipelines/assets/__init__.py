"""Assets by domain: data, training (policies), rollouts, credit, evaluation."""

from pipelines.assets.credit import shapley_credits
from pipelines.assets.data import task_dataset
from pipelines.assets.evaluation import method_comparison, policy_evaluation
from pipelines.assets.policies import base_policy, fine_tuned_policy
from pipelines.assets.rollouts import candidate_sets, rollout_scores

all_assets = [
    task_dataset,
    base_policy,
    candidate_sets,
    rollout_scores,
    shapley_credits,
    fine_tuned_policy,
    policy_evaluation,
    method_comparison,
]

__all__ = [
    "all_assets",
    "base_policy",
    "candidate_sets",
    "fine_tuned_policy",
    "method_comparison",
    "policy_evaluation",
    "rollout_scores",
    "shapley_credits",
    "task_dataset",
]
