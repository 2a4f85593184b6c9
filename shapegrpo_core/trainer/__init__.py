"""ShapE-GRPO as a TRL variant (the layout of ``trl.experimental.gmpo``): ``config`` (ShapEGRPOConfig),
``reward`` (SetUtilityReward, the reward TRL sees), ``trainer`` (ShapEGRPOTrainer, one overridden hook)."""

from shapegrpo_core.trainer.config import LINEAR_LOSS_TYPES, ShapEGRPOConfig
from shapegrpo_core.trainer.reward import ScoredBatch, SetUtilityReward, completion_text
from shapegrpo_core.trainer.trainer import METRIC_PREFIX, ShapEGRPOTrainer

__all__ = [
    "LINEAR_LOSS_TYPES",
    "METRIC_PREFIX",
    "ScoredBatch",
    "SetUtilityReward",
    "ShapEGRPOConfig",
    "ShapEGRPOTrainer",
    "completion_text",
]
