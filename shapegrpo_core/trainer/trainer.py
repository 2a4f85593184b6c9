"""`ShapEGRPOTrainer`: TRL's GRPOTrainer with per-candidate credit (docs/method.md, docs/trainer.md).

It overrides one hook on the training path, ``_generate_and_score_completions``: TRL generates, calls the
reward (:class:`SetUtilityReward`, which keeps its scores) and builds its batch with 1-D GRPO advantages; the
hook then computes the batch's credit (:class:`~shapegrpo_core.batch_credit.BatchCredit`, over the gathered
batch: groups may straddle processes) and replaces the advantages by a (B, T) per-token tensor. Every method,
GRPO included, goes through that path; for GRPO (uniform credit, or lam = 0) the hook also checks, on every
step, that its advantages equal TRL's own. TRL's ``_compute_loss`` unsqueezes only 1-D advantages, so loss,
clipping, KL and generation (vLLM too) stay TRL's. ``_save_checkpoint`` is extended only to write a
completion marker (:mod:`shapegrpo_core.checkpoints`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from accelerate.utils import gather_object
from trl import GRPOTrainer

from shapegrpo_core.batch_credit import BatchCredit, credit_responses
from shapegrpo_core.candidates import Candidate
from shapegrpo_core.checkpoints import COMPLETION_MARKER, write_completion_marker
from shapegrpo_core.credit import TRL_EPSILON
from shapegrpo_core.tasks.base import Task
from shapegrpo_core.tokens import decode_completion, token_owners
from shapegrpo_core.trainer.config import ShapEGRPOConfig
from shapegrpo_core.trainer.reward import ScoredBatch, SetUtilityReward

METRIC_PREFIX = "shapegrpo"
GRPO_PARITY_ATOL = 1e-5  # in reward units: float32 TRL advantages vs the float64 credit path


def row_seed(seed: int, step: int, row: int) -> int:
    """The sampling seed of row ``row`` of the global batch at global step ``step`` (``row_seeded_sampling``):
    distinct per (seed, step, row), the same on every process."""
    return int(np.random.SeedSequence([seed, step, row]).generate_state(1)[0])


class ShapEGRPOTrainer(GRPOTrainer):
    """GRPO with per-candidate credit for multi-candidate answers (ShapE-GRPO).

    Args: ``model``, ``task`` (a :class:`~shapegrpo_core.tasks.base.Task`: parses and scores completions),
    ``args`` (a :class:`ShapEGRPOConfig`), ``train_dataset`` (default ``task.build_dataset("train", seed)``);
    the rest goes to ``GRPOTrainer`` (``reward_funcs`` is refused: the reward is the task's set utility).
    """

    _tag_names: ClassVar[list[str]] = ["trl", "shapegrpo"]

    def __init__(
        self,
        model: Any,
        task: Task,
        args: ShapEGRPOConfig | None = None,
        train_dataset: Any = None,
        **kwargs: Any,
    ) -> None:
        if "reward_funcs" in kwargs:
            raise ValueError("ShapEGRPOTrainer builds its reward from the task; do not pass reward_funcs")
        if not isinstance(task, Task):
            raise ValueError(f"task must be a shapegrpo_core Task, got {type(task).__name__}")
        args = ShapEGRPOConfig(output_dir=f"shapegrpo-{task.name}") if args is None else args
        if not isinstance(args, ShapEGRPOConfig):
            raise ValueError(f"args must be a ShapEGRPOConfig, got {type(args).__name__}")
        self.task = task
        self.num_candidates = task.num_candidates if args.num_candidates is None else args.num_candidates
        self.set_utility_reward = SetUtilityReward(
            task, self.num_candidates, args.scorer_errors, args.format_penalty
        )
        train_dataset = task.build_dataset("train", args.seed) if train_dataset is None else train_dataset
        super().__init__(
            model, reward_funcs=[self.set_utility_reward], args=args, train_dataset=train_dataset, **kwargs
        )

    # -------------------------------------------------------------------------------------------- the hook

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's batch with ``advantages`` replaced by (B, T) per-token candidate advantages."""
        output = super()._generate_and_score_completions(inputs)  # generate, reward, GRPO advantages
        start_credit = time.perf_counter()
        args: ShapEGRPOConfig = self.args  # type: ignore[assignment]
        mode = "train" if self.model.training else "eval"
        ids = output["completion_ids"]  # (B_local, T), right-padded
        batch = self.set_utility_reward.pop(
            ids.tolist(), self._tokenizer.pad_token_id
        )  # the scores TRL's reward made

        local = credit_responses(
            batch.scores,
            args.allocation,
            engine=args.shapley_engine,
            seed=args.shapley_seed + self.state.global_step,
            num_permutations=args.mc_permutations,
            max_exact_players=args.max_exact_players,
            num_parsed=batch.num_parsed,
            format_valid=batch.format_valid,
            format_penalty=args.format_penalty,
            texts=batch.texts,
            repeats=args.repeats,
        )
        rows = gather_object(local)  # groups can straddle processes: credit needs every response of a group
        credit = BatchCredit.from_responses(
            rows,
            self.num_generations if mode == "train" else self.num_generations_eval,
            allocation=args.allocation,
            lam=args.lam,
            num_slots=self.num_candidates,
            missing_slots=args.missing_slots,
            scale_rewards=self.scale_rewards,
        )
        if not credit.ok.any():
            raise RuntimeError(
                "every response in the batch failed to score (set utility NaN): the scorer is broken; "
                "set scorer_errors='raise' to see the error"
            )
        start = self.accelerator.process_index * len(local)
        if args.allocation == "uniform" or args.lam == 0.0:
            rows_here = slice(start, start + len(local))
            scale = credit.advantages.std[rows_here] + TRL_EPSILON if self.scale_rewards != "none" else 1.0
            self._check_grpo_parity(credit.advantages.set[rows_here], output["advantages"], scale)

        owners = np.full(tuple(ids.shape), -1)  # (B_local, T): GRPO needs no token map
        fallbacks = 0
        if args.allocation != "uniform" and args.lam > 0.0:
            candidates, fallbacks = self._token_candidates(batch)
            owners = token_owners(batch.completion_ids, self._tokenizer, candidates, max_len=ids.shape[1])
        token_adv = credit.token_advantages(
            owners, output["completion_mask"].cpu().numpy(), start=start, weighting=args.token_weighting
        )  # (B_local, T)
        output["advantages"] = torch.as_tensor(token_adv, dtype=torch.float32, device=ids.device)

        metrics = credit.metrics()
        metrics["token_map_fallbacks"] = float(sum(gather_object([fallbacks])))
        metrics["credit_seconds"] = time.perf_counter() - start_credit
        for name, value in metrics.items():
            self._metrics[mode][f"{METRIC_PREFIX}/{name}"].append(value)
        return output

    @staticmethod
    def _check_grpo_parity(ours: np.ndarray, trl_advantages: torch.Tensor, scale: np.ndarray | float) -> None:
        """GRPO through the credit path must be TRL's GRPO: compare with TRL's own (B,) advantages.

        Compared in reward units (advantage × the std + eps it was divided by): TRL works in float32, whose
        rounding of a reward is magnified by 1/std when a group's rewards barely differ."""
        theirs = trl_advantages.detach().cpu().double().numpy()
        units = np.nan_to_num(np.asarray(scale, dtype=np.float64), nan=1.0)
        gap = np.abs(ours - theirs) * units if theirs.shape == ours.shape else np.array([np.inf])
        if not (gap <= GRPO_PARITY_ATOL).all():
            worst = float(np.max(gap))
            raise RuntimeError(
                f"GRPO advantages differ from TRL's ({worst:.2e} in reward units): a TRL option changed them"
            )

    def _token_candidates(self, batch: ScoredBatch) -> tuple[list[list[Candidate]], int]:
        """Candidates with spans in the text decoded from each completion's ids (what tokens are measured in).

        For plain-text prompts that is the scored text. When it is not (a chat template's response parser
        rewrote it), the decoded text is parsed again and used if it yields the same candidate texts;
        otherwise the response's tokens all get the set advantage (counted as a fallback).
        """
        out: list[list[Candidate]] = []
        fallbacks = 0
        for ids, text, score in zip(batch.completion_ids, batch.texts, batch.scores, strict=True):
            if score is None or not score.candidates:
                out.append([])
                continue
            decoded = decode_completion(ids, self._tokenizer)
            again = (
                list(score.candidates) if decoded == text else self.task.parse(decoded)[: self.num_candidates]
            )
            same = [c.text for c in again] == [c.text for c in score.candidates]
            out.append(again if same else [])
            fallbacks += not same
        return out, fallbacks

    # -------------------------------------------------------------------------------------------- sampling

    def _generate_single_turn(
        self,
        prompt_ids: list[list[int]],
        images: Any,
        multimodal_fields: dict[str, Any],
        num_generations: int,
        has_tool_images: bool = False,
    ) -> tuple[list[list[int]], Any]:
        """TRL's generation; with ``row_seeded_sampling``, one call per completion under its own seed
        (:func:`row_seed`), so a completion depends only on its prompt, the weights, the step and its row in
        the global batch, not on which process samples it or on the other rows of its batch."""
        args: ShapEGRPOConfig = self.args  # type: ignore[assignment]
        if not args.row_seeded_sampling:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        if self.use_transformers_continuous_batching or images is not None or multimodal_fields:
            raise ValueError(
                "row_seeded_sampling supports plain transformers generation of text prompts only "
                "(not continuous batching, images or multimodal fields)"
            )
        start = self.accelerator.process_index * len(prompt_ids)  # this process's rows of the global batch
        device = self.accelerator.device
        cuda = [device] if device.type == "cuda" else []
        completions: list[list[int]] = []
        for offset, ids in enumerate(prompt_ids):
            with torch.random.fork_rng(devices=cuda):  # leaves the trainer's own RNG stream untouched
                torch.manual_seed(row_seed(args.seed, self.state.global_step, start + offset))
                one, _ = super()._generate_single_turn([ids], None, {}, num_generations, has_tool_images)
            completions.extend(one)
        return completions, None

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
