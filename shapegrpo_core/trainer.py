"""ShapE-GRPO as a TRL GRPOTrainer variant (the pattern of ``trl.experimental.gmpo``: a config subclass that
documents its new fields and a trainer subclass that overrides the narrowest hook).

Per generation batch (DESIGN.md §2):

1. TRL generates G responses per prompt and calls the reward function built from the task,
   :class:`SetUtilityReward`: each response is parsed, its first K candidates become the players of the task's
   game (all responses of the batch in one ``task.games`` call), and the reward handed to TRL is the set
   utility R_g = U_g(all K_g candidates). The scored responses (candidates, games) are kept for step 3, so
   nothing is parsed or scored twice.
2. TRL computes its own 1-D GRPO advantages, logs and returns the batch (unchanged TRL code).
3. :meth:`ShapEGRPOTrainer._generate_and_score_completions` (the one overridden TRL hook on the training path)
   replaces ``output["advantages"]`` (B,) with a (B, T) per-token tensor: the credit engine splits each set's
   reward among its candidates (rho_{g,i} = (1−lam) R_g + lam (u0 + K_g phi_{g,i})), group advantages are
   computed over the *gathered* batch (all processes: groups may straddle them), and each local completion's
   tokens get the advantage of the candidate whose characters they cover (the set advantage elsewhere).

TRL's ``_compute_loss`` unsqueezes only 1-D advantages (``if advantages.dim() == 1``), so (B, T) advantages
flow into the same clipped surrogate, KL term and loss normalisation as GRPO; generation (including vLLM) is
TRL's. With ``allocation="uniform"`` (or ``lam=0``) every token gets A_g, which equals TRL's advantage to
~1e-6; uniform credit therefore keeps TRL's (B,) tensor as is (``lam=0`` with another allocation goes through
the whole token path, which is how the equivalence is tested).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from accelerate.utils import gather_object
from trl import GRPOConfig, GRPOTrainer

from shapegrpo_core.candidates import Candidate
from shapegrpo_core.checkpoints import COMPLETION_MARKER, write_completion_marker
from shapegrpo_core.credit import ALLOCATIONS, FREE_RIDER_TOL, allocate_credit, group_advantages
from shapegrpo_core.evaluation import SCORER_ERRORS, ResponseScore, score_responses, try_score_response
from shapegrpo_core.shapley import DEFAULT_NUM_PERMUTATIONS, ENGINES, MAX_EXACT_PLAYERS
from shapegrpo_core.tasks.base import Task
from shapegrpo_core.tokens import decode_completion, token_advantages

logger = logging.getLogger(__name__)

# Keyword arguments TRL passes to reward functions that are not dataset columns.
_TRL_REWARD_KWARGS = frozenset({"trainer_state", "log_extra", "log_metric", "environments"})
METRIC_PREFIX = "shapegrpo"
KNOWN_ENGINES = ("closed_form", "exact", "monte_carlo", "loo")


@dataclass
class ShapEGRPOConfig(GRPOConfig):
    r"""
    Configuration class for [`ShapEGRPOTrainer`].

    Inherits every parameter of TRL's `GRPOConfig` (batch sizes, `num_generations`, `beta`, `epsilon`,
    `loss_type`, `scale_rewards`, vLLM options, ...) unchanged and adds the credit-allocation fields below.

    Parameters:
        allocation (`str`, *optional*, defaults to `"shapley"`):
            How a response's set reward R_g is split among its candidates: `"uniform"` (every candidate gets
            R_g: plain GRPO), `"shapley"` (Shapley values of the task's game) or `"loo"` (leave-one-out
            marginals rescaled to be efficient; an ablation that is blind to redundancy).
        lam (`float`, *optional*, defaults to `1.0`):
            Mix lambda in [0, 1] between GRPO and per-candidate credit: rho = (1 − lam) R + lam (u0 + K phi).
            `lam=0` is GRPO whatever the allocation.
        num_candidates (`int` or `None`, *optional*, defaults to `None`):
            K, the number of parsed candidates that are scored (the first K; extra ones are a format violation
            and their tokens get the set advantage). `None` uses `task.num_candidates`.
        shapley_engine (`str`, *optional*, defaults to `"auto"`):
            Shapley engine: `"auto"` (closed form for sum-of-max games, exact enumeration up to
            `max_exact_players`, Monte Carlo beyond), `"closed_form"`, `"exact"` or `"monte_carlo"`.
        mc_permutations (`int`, *optional*, defaults to `512`):
            Number of (antithetic) permutations of the Monte-Carlo engine.
        max_exact_players (`int`, *optional*, defaults to `16`):
            Largest K for which `"auto"` enumerates all 2^K coalitions exactly.
        shapley_seed (`int`, *optional*, defaults to `0`):
            Seed of the Monte-Carlo engine; the engine at global step s uses `shapley_seed + s`, so runs are
            reproducible and successive steps draw fresh permutations.
        format_penalty (`float`, *optional*, defaults to `0.0`):
            Subtracted from the set reward R_g of a response that is not format-valid (`task.format_valid`:
            exactly K distinct, well-formed candidates). Only the first K candidates are scored, so without it
            extra candidates cost nothing and a policy drifts into emitting more than K. The penalty is a
            constant shift of that response's game (U' = U − p, so u0' = u0 − p): Shapley values are
            unchanged, every candidate's rho drops by p, efficiency still holds, and GRPO and ShapE-GRPO see
            the same set rewards. The `shapegrpo/set_utility` metric stays the unpenalised utility.
        scorer_errors (`str`, *optional*, defaults to `"nan"`):
            What a `ValueError`/`ArithmeticError` raised while scoring one response does: `"nan"` records the
            set utility as NaN (advantage 0, counted in the `shapegrpo/nan_sets` metric, warning logged; a
            batch where *every* response fails still raises, since that is a broken scorer, not a bad
            response) or `"raise"`.
    """

    allocation: str = field(
        default="shapley",
        metadata={
            "help": "Credit allocation: 'uniform' (GRPO), 'shapley' or 'loo'.",
            "choices": list(ALLOCATIONS),
        },
    )
    lam: float = field(
        default=1.0,
        metadata={"help": "Mix lambda in [0, 1]: rho = (1 - lam) R + lam (u0 + K phi). 0 is GRPO."},
    )
    num_candidates: int | None = field(
        default=None,
        metadata={
            "help": "K, the number of parsed candidates scored per response. None: task.num_candidates."
        },
    )
    shapley_engine: str = field(
        default="auto",
        metadata={
            "help": "Shapley engine: auto, closed_form, exact or monte_carlo.",
            "choices": list(ENGINES),
        },
    )
    mc_permutations: int = field(
        default=DEFAULT_NUM_PERMUTATIONS,
        metadata={"help": "Number of antithetic permutations of the Monte-Carlo Shapley engine."},
    )
    max_exact_players: int = field(
        default=MAX_EXACT_PLAYERS,
        metadata={"help": "Largest K for which engine 'auto' enumerates coalitions exactly."},
    )
    shapley_seed: int = field(
        default=0,
        metadata={"help": "Seed of the Monte-Carlo engine (step s uses shapley_seed + s)."},
    )
    format_penalty: float = field(
        default=0.0,
        metadata={
            "help": "Subtracted from the set reward of a response that is not format-valid (not exactly K "
            "distinct candidates). A constant shift of that response's game: phi unchanged, every rho - p."
        },
    )
    scorer_errors: str = field(
        default="nan",
        metadata={"help": "A scorer ValueError/ArithmeticError: 'nan' (advantage 0, counted) or 'raise'."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if not (math.isfinite(self.lam) and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")
        if self.num_candidates is not None and self.num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1 (or None), got {self.num_candidates}")
        if self.shapley_engine not in ENGINES:
            raise ValueError(f"shapley_engine must be one of {ENGINES}, got {self.shapley_engine!r}")
        if self.mc_permutations < 1:
            raise ValueError(f"mc_permutations must be >= 1, got {self.mc_permutations}")
        if not 0 <= self.max_exact_players <= MAX_EXACT_PLAYERS:
            raise ValueError(
                f"max_exact_players must be in [0, {MAX_EXACT_PLAYERS}], got {self.max_exact_players}"
            )
        if self.scorer_errors not in SCORER_ERRORS:
            raise ValueError(f"scorer_errors must be one of {SCORER_ERRORS}, got {self.scorer_errors!r}")
        if not (math.isfinite(self.format_penalty) and self.format_penalty >= 0.0):
            raise ValueError(f"format_penalty must be finite and >= 0, got {self.format_penalty}")


# ----------------------------------------------------------------------------------------------------------
# The reward function TRL sees
# ----------------------------------------------------------------------------------------------------------


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """The text of a TRL completion: a string, or (conversational prompts) a one-message assistant turn."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        content = completion[-1].get("content", "")
        if isinstance(content, str):
            return content
        # Content blocks: keep the text parts, in order.
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    raise ValueError(f"cannot read a completion of type {type(completion).__name__}")


@dataclass
class ScoredBatch:
    """The local responses of one reward call: their token ids (as TRL passed them) and their scores."""

    completion_ids: list[list[int]]
    texts: list[str]
    scores: list[ResponseScore | None]  # None: the scorer failed (set utility NaN)
    num_parsed: list[int]  # also known when the scorer failed: format metrics count every response
    format_valid: list[bool]


class SetUtilityReward:
    """TRL reward function: R_g = U_g(first K parsed candidates) of the task's game, minus ``format_penalty``
    when the response is not format-valid.

    Keeps the scored responses of its latest call (:attr:`last`) so that :class:`ShapEGRPOTrainer` reuses the
    parsed candidates and games instead of scoring again. TRL calls reward functions on the *local* slice of
    the generation batch (each process its own completions), so the cache is local too. Also usable on its own
    as a reward function for stock ``GRPOTrainer`` (the GRPO baseline with the same reward).
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
        self.last: ScoredBatch | None = None

    def score(self, text: str, example: Mapping[str, Any]) -> ResponseScore | None:
        """One response's score, None when the scorer failed (see ``evaluation.try_score_response``)."""
        return try_score_response(self.task, text, example, self.num_candidates, self.scorer_errors)

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
        examples = []
        for i in range(len(texts)):
            example = {k: v[i] for k, v in columns.items()}
            example["prompt"] = prompts[i]
            examples.append(example)
        scores = self.score_batch(texts, examples)
        ids = [list(map(int, x)) for x in completion_ids] if completion_ids is not None else []
        pairs = list(zip(texts, scores, strict=True))
        num_parsed = [len(self.task.parse(t)) if s is None else s.num_parsed for t, s in pairs]
        valid = [self.task.format_valid(t) if s is None else s.format_valid for t, s in pairs]
        self.last = ScoredBatch(ids, texts, scores, num_parsed, valid)
        return [
            float("nan") if s is None else s.set_utility - self.format_penalty * (not ok)
            for s, ok in zip(scores, valid, strict=True)
        ]

    def pop(self) -> ScoredBatch:
        """The cached batch of the latest call, removed so that a stale batch is never reused."""
        if self.last is None:
            raise RuntimeError(
                "SetUtilityReward has no scored batch: was it called by the trainer for this batch?"
            )
        batch, self.last = self.last, None
        return batch


# ----------------------------------------------------------------------------------------------------------
# Credit for one batch
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ResponseCredit:
    """What the gathered batch needs of one response (plain lists, so gather_object can pickle it)."""

    set_reward: float  # NaN when the scorer failed; includes the format penalty
    u0: float  # shifted by the format penalty, like set_reward and rho
    phi: list[float]  # Shapley (or loo) credit of the scored candidates, length K_g
    rho: list[float]
    shapley_phi: list[float]  # Shapley values for the metrics (== phi unless allocation is "loo")
    engine: str
    candidate_utility: float
    best_candidate_utility: float
    duplicate_rate: float
    format_valid: bool
    num_parsed: int
    penalty: float = 0.0  # format penalty subtracted from set_reward, u0 and rho


def credit_batch(
    scores: Sequence[ResponseScore | None],
    allocation: str,
    lam: float,
    *,
    engine: str = "auto",
    seed: int = 0,
    num_permutations: int = DEFAULT_NUM_PERMUTATIONS,
    max_exact_players: int = MAX_EXACT_PLAYERS,
    num_parsed: Sequence[int] | None = None,
    format_valid: Sequence[bool] | None = None,
    format_penalty: float = 0.0,
) -> list[ResponseCredit]:
    """Credit for each scored response (None = failed scorer -> NaN set reward, no candidates; its format
    statistics come from ``num_parsed``/``format_valid`` when given). A format-invalid response's game is
    shifted down by ``format_penalty`` (set reward, u0 and every rho; phi is shift-invariant)."""
    live = [i for i, s in enumerate(scores) if s is not None]
    games = [scores[i].game for i in live]  # type: ignore[union-attr]
    opts = {"engine": engine, "seed": seed, "num_permutations": num_permutations}
    opts["max_exact_players"] = max_exact_players
    credits = allocate_credit(games, allocation, lam, **opts) if games else []
    # Free-rider metrics always use Shapley values so that they mean the same thing for every method.
    shapley = allocate_credit(games, "shapley", 1.0, **opts) if games and allocation == "loo" else credits
    out: list[ResponseCredit] = []
    by_index = {i: j for j, i in enumerate(live)}
    for i, s in enumerate(scores):
        if s is None:
            nan = float("nan")
            parsed = 0 if num_parsed is None else int(num_parsed[i])
            valid = False if format_valid is None else bool(format_valid[i])
            out.append(ResponseCredit(nan, nan, [], [], [], "none", nan, nan, nan, valid, parsed))
            continue
        c, sh = credits[by_index[i]], shapley[by_index[i]]
        if not math.isclose(c.set_reward, s.set_utility, rel_tol=1e-9, abs_tol=1e-9):
            raise RuntimeError(
                f"credit engine set reward {c.set_reward} != scored set utility {s.set_utility}"
            )
        penalty = format_penalty * (not s.format_valid)
        out.append(
            ResponseCredit(
                set_reward=float(s.set_utility) - penalty,
                u0=float(c.u0) - penalty,
                phi=[float(x) for x in c.phi],
                rho=[float(x) - penalty for x in c.rho],
                shapley_phi=[float(x) for x in sh.phi],
                engine=c.engine,
                candidate_utility=s.candidate_utility,
                best_candidate_utility=s.best_candidate_utility,
                duplicate_rate=s.duplicate_rate,
                format_valid=s.format_valid,
                num_parsed=s.num_parsed,
                penalty=penalty,
            )
        )
    return out


def pad_credit(rows: Sequence[ResponseCredit], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(set_reward (N,), rho (N, K) NaN-padded, mask (N, K)) of gathered responses."""
    n = len(rows)
    set_reward = np.array([r.set_reward for r in rows], dtype=np.float64)  # (N,)
    rho = np.full((n, k), np.nan)  # (N, K)
    mask = np.zeros((n, k), dtype=bool)  # (N, K)
    for i, r in enumerate(rows):
        kg = len(r.rho)
        if kg > k:
            raise ValueError(f"response {i} has {kg} scored candidates, more than K={k}")
        rho[i, :kg] = r.rho
        mask[i, :kg] = True
    return set_reward, rho, mask


def credit_metrics(rows: Sequence[ResponseCredit], num_nan_sets: int) -> dict[str, float]:
    """Per-batch metrics of the gathered responses (names without the ``shapegrpo/`` prefix)."""
    scored = [r for r in rows if math.isfinite(r.set_reward)]

    def mean(xs: Sequence[float]) -> float:
        return float(np.mean(xs)) if len(xs) else float("nan")

    surplus_phi = [p for r in scored if r.set_reward - r.u0 > FREE_RIDER_TOL for p in r.shapley_phi]
    all_phi = [p for r in scored for p in r.phi]
    metrics = {
        "set_utility": mean([r.set_reward + r.penalty for r in scored]),
        "candidate_utility": mean([r.candidate_utility for r in scored]),
        "best_candidate_utility": mean([r.best_candidate_utility for r in scored]),
        "free_rider_rate": mean([float(p <= FREE_RIDER_TOL) for p in surplus_phi]),
        "duplicate_rate": mean([r.duplicate_rate for r in scored]),
        "format_valid_rate": mean([float(r.format_valid) for r in rows]),
        "parse_failure_rate": mean([float(r.num_parsed == 0) for r in rows]),
        "num_candidates": mean([float(r.num_parsed) for r in rows]),
        "mean_abs_phi": mean([abs(p) for p in all_phi]),
        "nan_sets": float(num_nan_sets),
    }
    for name in KNOWN_ENGINES:
        metrics[f"engine/{name}"] = mean([float(r.engine == name) for r in scored])
    return metrics


# ----------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------


class ShapEGRPOTrainer(GRPOTrainer):
    """GRPO with per-candidate (Shapley) credit for multi-candidate answers (ShapE-GRPO, DESIGN.md §2).

    The only change to the training computation is in ``_generate_and_score_completions``: after TRL has
    generated, scored (reward = set utility, from :class:`SetUtilityReward`) and built its batch, the 1-D GRPO
    advantages are replaced by (B, T) per-token candidate advantages. Loss, clipping, KL, generation (vLLM
    too) and logging are TRL's. ``_save_checkpoint`` is also extended to write a completion marker after every
    checkpoint (see :mod:`shapegrpo_core.checkpoints`), so a run killed mid-save resumes from the last
    complete one.

    Args:
        model: a model id/path or a loaded ``PreTrainedModel`` (as for ``GRPOTrainer``).
        task: the :class:`~shapegrpo_core.tasks.base.Task` that parses and scores completions.
        args: a :class:`ShapEGRPOConfig`.
        train_dataset: defaults to ``task.build_dataset("train", args.seed)``.
        Other arguments are passed to ``GRPOTrainer`` (``reward_funcs`` is not accepted: the reward is the set
        utility of the task's game).
    """

    _tag_names: ClassVar[list[str]] = ["trl", "shapegrpo"]

    def __init__(
        self,
        model: Any,
        task: Task,
        args: ShapEGRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:
        if "reward_funcs" in kwargs:
            raise ValueError("ShapEGRPOTrainer builds its reward from the task; do not pass reward_funcs")
        if args is None:
            args = ShapEGRPOConfig(output_dir=f"shapegrpo-{task.name}")
        if not isinstance(args, ShapEGRPOConfig):
            raise ValueError(f"args must be a ShapEGRPOConfig, got {type(args).__name__}")
        if not isinstance(task, Task):
            raise ValueError(f"task must be a shapegrpo_core Task, got {type(task).__name__}")
        self.task = task
        self.num_candidates = task.num_candidates if args.num_candidates is None else args.num_candidates
        self.set_utility_reward = SetUtilityReward(
            task, self.num_candidates, args.scorer_errors, args.format_penalty
        )
        if train_dataset is None:
            train_dataset = task.build_dataset("train", args.seed)
        super().__init__(
            model,
            reward_funcs=[self.set_utility_reward],
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
            **kwargs,
        )

    # -------------------------------------------------------------------------------------------- the hook

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's batch with ``advantages`` replaced by (B, T) per-token candidate advantages."""
        output = super()._generate_and_score_completions(inputs)
        start_credit = time.perf_counter()  # what ShapE adds to a GRPO step: credit and token mapping
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        batch = self.set_utility_reward.pop()
        completion_ids = output["completion_ids"]  # (B_local, T), right-padded
        n_local, width = completion_ids.shape
        if len(batch.scores) != n_local or len(batch.completion_ids) != n_local:
            raise RuntimeError(f"reward cache holds {len(batch.scores)} responses, the batch has {n_local}")
        for n, ids in enumerate(batch.completion_ids):
            # The cache is keyed by position; make sure it is this batch, in this order.
            if completion_ids[n, : len(ids)].tolist() != ids:
                raise RuntimeError(f"reward cache out of sync with the batch at row {n}")

        args: ShapEGRPOConfig = self.args  # type: ignore[assignment]
        local = credit_batch(
            batch.scores,
            args.allocation,
            args.lam,
            engine=args.shapley_engine,
            seed=args.shapley_seed + self.state.global_step,
            num_permutations=args.mc_permutations,
            max_exact_players=args.max_exact_players,
            num_parsed=batch.num_parsed,
            format_valid=batch.format_valid,
            format_penalty=args.format_penalty,
        )
        # Group statistics need every response of a group; groups can straddle processes, so gather them all.
        rows: list[ResponseCredit] = gather_object(local)
        set_reward, rho, mask = pad_credit(rows, self.num_candidates)  # (N,), (N, K), (N, K)
        if np.isnan(set_reward).all():
            raise RuntimeError(
                "every response in the batch failed to score (set utility NaN): the scorer is broken; "
                "set scorer_errors='raise' to see the error"
            )
        adv = group_advantages(rho, mask, set_reward, num_generations, scale_rewards=self.scale_rewards)

        fallbacks = 0
        if args.allocation != "uniform":
            # Token advantages only for this process's completions (TRL's process_slice).
            start = self.accelerator.process_index * n_local
            cand_adv = adv.candidate[start : start + n_local]  # (B_local, K)
            set_adv = adv.set[start : start + n_local]  # (B_local,)
            cand_adv = np.where(
                mask[start : start + n_local], cand_adv, np.nan
            )  # NaN marks absent candidates
            candidates, fallbacks = self._token_candidates(batch)
            token_adv = token_advantages(
                batch.completion_ids, self._tokenizer, candidates, cand_adv, set_adv, max_len=width
            )  # (B_local, T)
            if not torch.isfinite(token_adv).all():
                raise RuntimeError("non-finite token advantages")
            output["advantages"] = token_adv.to(device=completion_ids.device, dtype=torch.float32)
        # else: uniform credit gives every token the set advantage, which is TRL's own (B,) advantage (to
        # ~1e-6; tested through the Shapley path at lam = 0), so TRL's tensor is kept and the token mapping
        # skipped: the GRPO baseline pays only for scoring and the credit metrics.

        metrics = credit_metrics(rows, adv.num_nan_sets)
        metrics["token_map_fallbacks"] = float(sum(gather_object([fallbacks])))
        live = mask.any(axis=1) & np.isfinite(set_reward)
        spreads = [np.std(adv.candidate[i][mask[i]]) for i in np.flatnonzero(live)]
        metrics["within_set_adv_std"] = float(np.mean(spreads)) if spreads else float("nan")
        metrics["credit_seconds"] = time.perf_counter() - start_credit
        for name, value in metrics.items():
            self._metrics[mode][f"{METRIC_PREFIX}/{name}"].append(value)
        return output

    def _token_candidates(self, batch: ScoredBatch) -> tuple[list[list[Candidate]], int]:
        """Candidates with spans in the text decoded from each completion's ids (what tokens are measured in).

        For plain-text prompts that is exactly the scored text. When it is not (a chat template's response
        parser rewrote the text), the decoded text is parsed again and used if it yields the same candidate
        texts; otherwise the response's tokens all get the set advantage (counted as a fallback).
        """
        out: list[list[Candidate]] = []
        fallbacks = 0
        for ids, text, score in zip(batch.completion_ids, batch.texts, batch.scores, strict=True):
            if score is None or not score.candidates:
                out.append([])
                continue
            decoded = decode_completion(ids, self._tokenizer)
            if decoded == text:
                out.append(list(score.candidates))
                continue
            again = self.task.parse(decoded)[: self.num_candidates]
            if [c.text for c in again] == [c.text for c in score.candidates]:
                out.append(again)
            else:
                out.append([])
                fallbacks += 1
        return out, fallbacks

    # -------------------------------------------------------------------------------------------- checkpoints

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """TRL's checkpoint, bracketed by the completion marker: removed first (a stale marker must not vouch
        for files being rewritten), written last (so it exists only if every file above was written)."""
        checkpoint = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            (checkpoint / COMPLETION_MARKER).unlink(missing_ok=True)
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            write_completion_marker(checkpoint, self.state.global_step)


__all__ = [
    "FREE_RIDER_TOL",
    "METRIC_PREFIX",
    "ResponseCredit",
    "ScoredBatch",
    "SetUtilityReward",
    "ShapEGRPOConfig",
    "ShapEGRPOTrainer",
    "completion_text",
    "credit_batch",
    "credit_metrics",
    "pad_credit",
]
