"""The reward function TRL sees: the set utility of a response's candidates (docs/trainer.md).

It scores every response of a reward call with one ``task.games`` call and keeps the scores, keyed by the
batch's completion ids, so the trainer's credit step reuses them instead of scoring again. The key makes the
hand-off independent of how often TRL calls reward functions: the trainer asks for the scores of exactly the
ids in its batch (TRL's right-padded tensor) and gets a loud error if they were never scored.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shapegrpo_core.evaluation import SCORER_ERRORS, ResponseScore, score_responses
from shapegrpo_core.tasks.base import Task

# Keyword arguments TRL passes to reward functions that are not dataset columns.
_TRL_REWARD_KWARGS = frozenset({"trainer_state", "log_extra", "log_metric", "environments"})
_CACHE_SIZE = 4  # scored batches kept: a train and an eval batch in flight are at most two


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """The text of a TRL completion: a string, or (conversational prompts) a one-message assistant turn."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        content = completion[-1].get("content", "")
        if isinstance(content, str):
            return content
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    raise ValueError(f"cannot read a completion of type {type(completion).__name__}")


@dataclass
class ScoredBatch:
    """The local responses of one reward call: token ids (as TRL passed them), texts and scores."""

    completion_ids: list[list[int]]
    texts: list[str]
    scores: list[ResponseScore | None]  # None: the scorer failed (set utility NaN)
    num_parsed: list[int]  # also known when the scorer failed: format metrics count every response
    format_valid: list[bool]


def _key(completion_ids: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(t) for t in ids) for ids in completion_ids)


class SetUtilityReward:
    """TRL reward function: R_g = U_g(first K parsed candidates) − ``format_penalty`` if format-invalid.

    Also usable alone as the reward of a stock ``GRPOTrainer`` (the GRPO baseline with the same reward).
    """

    __name__ = "set_utility"  # TRL names the reward metric after it: rewards/set_utility/mean

    def __init__(
        self,
        task: Task,
        num_candidates: int | None = None,
        scorer_errors: str = "nan",
        format_penalty: float = 0.0,
    ) -> None:
        if scorer_errors not in SCORER_ERRORS:
            raise ValueError(f"scorer_errors must be one of {SCORER_ERRORS}, got {scorer_errors!r}")
        self.task = task
        self.num_candidates = task.num_candidates if num_candidates is None else int(num_candidates)
        if self.num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {self.num_candidates}")
        self.scorer_errors = scorer_errors
        self.format_penalty = float(format_penalty)
        self._cache: OrderedDict[tuple, ScoredBatch] = OrderedDict()

    def score_batch(
        self, texts: Sequence[str], examples: Sequence[Mapping[str, Any]]
    ) -> list[ResponseScore | None]:
        """Scores of many responses with one ``task.games`` call (see ``evaluation.score_responses``)."""
        return score_responses(self.task, texts, examples, self.num_candidates, self.scorer_errors)

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        columns = {k: v for k, v in kwargs.items() if k not in _TRL_REWARD_KWARGS}
        texts = [completion_text(c) for c in completions]
        examples = [
            {**{k: v[i] for k, v in columns.items()}, "prompt": prompts[i]} for i in range(len(texts))
        ]
        scores = self.score_batch(texts, examples)
        pairs = list(zip(texts, scores, strict=True))
        num_parsed = [len(self.task.parse(t)) if s is None else s.num_parsed for t, s in pairs]
        valid = [self.task.format_valid(t) if s is None else s.format_valid for t, s in pairs]
        ids = [list(map(int, x)) for x in completion_ids] if completion_ids is not None else []
        if ids:
            self._cache[_key(ids)] = ScoredBatch(ids, texts, scores, num_parsed, valid)
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return [
            float("nan") if s is None else s.set_utility - self.format_penalty * (not ok)
            for s, ok in zip(scores, valid, strict=True)
        ]

    def pop(self, padded_ids: Sequence[Sequence[int]], pad_token_id: int) -> ScoredBatch:
        """The scores of exactly the completions in ``padded_ids`` (TRL's (B, T) completion ids, right-padded
        with ``pad_token_id``), removed from the cache."""
        rows = _key(padded_ids)
        width = len(rows[0]) if rows else 0
        for key in reversed(self._cache):
            if len(key) == len(rows) and all(
                len(ids) <= width and ids + (pad_token_id,) * (width - len(ids)) == row
                for ids, row in zip(key, rows, strict=True)
            ):
                return self._cache.pop(key)
        raise RuntimeError(
            f"SetUtilityReward never scored this batch of {len(rows)} completions: TRL must call the reward "
            "function with completion_ids for every batch the trainer credits"
        )
