"""`ShapEGRPOConfig`: TRL's `GRPOConfig` plus the credit fields (docs/method.md, docs/trainer.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import GRPOConfig

from shapegrpo_core.batch_credit import MISSING_SLOTS, REPEATS, TOKEN_WEIGHTINGS
from shapegrpo_core.credit import ALLOCATIONS
from shapegrpo_core.evaluation import SCORER_ERRORS
from shapegrpo_core.shapley import DEFAULT_NUM_PERMUTATIONS, ENGINES, MAX_EXACT_PLAYERS

# Loss types whose per-token term is (a coefficient that does not depend on the advantage) × the advantage, so
# that a response's total push is the sum of its token advantages and methods differ only in credit.
LINEAR_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "luspo")


def _help(text: str, **extra: object) -> dict:
    return {"help": text, **extra}


@dataclass
class ShapEGRPOConfig(GRPOConfig):
    r"""
    Configuration class for [`ShapEGRPOTrainer`]: every `GRPOConfig` parameter, plus:

    Parameters:
        allocation (`str`, defaults to `"shapley"`):
            How a response's set reward is split among its candidates: `"uniform"` (every candidate gets R:
            GRPO), `"shapley"`, `"loo"` (efficient leave-one-out) or `"wta"` (Winner-Takes-All: the surplus
            R − u0 goes to the best standalone candidate(s)).
        lam (`float`, defaults to `1.0`):
            Mix in [0, 1]: rho = (1 − lam) R + lam (u0 + K phi); 0 is GRPO.
        num_candidates (`int` or `None`, defaults to `None`):
            K, the parsed candidates scored per response (the first K); `None` uses `task.num_candidates`.
        token_weighting (`str`, defaults to `"length_aware"`):
            `"length_aware"` keeps every response's summed token advantage equal to GRPO's whatever its
            candidates' lengths; `"broadcast"` is the paper's rule (each candidate token carries its
            candidate's advantage).
        missing_slots (`str`, defaults to `"null"`):
            `"ignore"` (the K_g scored candidates are the players) or `"null"` (the K − K_g empty slots are
            null players whose credit lands on the non-candidate tokens: emptying a slot is never free).
        repeats (`str`, defaults to `"null"`):
            `"shared"` (a candidate and its copy split their credit) or `"null"` (a repeat of an earlier
            candidate is a null player: credit 0, the original keeps the full credit).
        shapley_engine (`str`, defaults to `"auto"`):
            `"auto"`, `"closed_form"`, `"exact"` or `"monte_carlo"`.
        mc_permutations (`int`, defaults to `512`):
            Antithetic permutations of the Monte-Carlo engine.
        max_exact_players (`int`, defaults to `16`):
            Largest K that `"auto"` enumerates exactly.
        shapley_seed (`int`, defaults to `0`):
            Monte-Carlo seed; global step s uses `shapley_seed + s`.
        format_penalty (`float`, defaults to `0.0`):
            Subtracted from the game of a format-invalid response (not exactly K distinct candidates): phi
            unchanged; set reward, u0 and every rho drop by it.
        scorer_errors (`str`, defaults to `"nan"`):
            A scorer `ValueError`/`ArithmeticError` on one response: `"nan"` (advantage 0, counted in
            `shapegrpo/nan_sets`) or `"raise"`.
        row_seeded_sampling (`bool`, defaults to `False`):
            Sample each completion with its own seed, derived from `seed`, the global step and the
            completion's row in the global batch (one `generate` call per completion, transformers generation
            only). Completions then do not depend on how the batch is split over processes: a run on N
            processes samples exactly what the same run samples on one. Off: TRL's batched sampling, seeded
            per process.

    TRL options under which the methods would differ in more than credit are rejected (see
    `LINEAR_LOSS_TYPES`, `off_policy_mask_threshold`, `multi_objective_aggregation`, `reward_weights`).
    """

    allocation: str = field(
        default="shapley", metadata=_help("Credit allocation.", choices=list(ALLOCATIONS))
    )
    lam: float = field(default=1.0, metadata=_help("Mix lambda in [0, 1]; 0 is GRPO."))
    num_candidates: int | None = field(default=None, metadata=_help("K; None: task.num_candidates."))
    token_weighting: str = field(
        default="length_aware", metadata=_help("Token weighting.", choices=list(TOKEN_WEIGHTINGS))
    )
    # Defaults chosen by benchmarks/convergence.py's credit-options phase (README "Convergence").
    missing_slots: str = field(default="null", metadata=_help("Empty slots.", choices=list(MISSING_SLOTS)))
    repeats: str = field(default="null", metadata=_help("Repeated candidates.", choices=list(REPEATS)))
    shapley_engine: str = field(default="auto", metadata=_help("Shapley engine.", choices=list(ENGINES)))
    mc_permutations: int = field(
        default=DEFAULT_NUM_PERMUTATIONS, metadata=_help("Monte-Carlo permutations.")
    )
    max_exact_players: int = field(default=MAX_EXACT_PLAYERS, metadata=_help("Largest exact K for 'auto'."))
    shapley_seed: int = field(default=0, metadata=_help("Monte-Carlo seed (step s uses seed + s)."))
    format_penalty: float = field(
        default=0.0, metadata=_help("Set-reward penalty of a format-invalid response.")
    )
    scorer_errors: str = field(default="nan", metadata=_help("Scorer errors.", choices=list(SCORER_ERRORS)))
    row_seeded_sampling: bool = field(
        default=False, metadata=_help("One seed per completion row (independent of the process count).")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        choices = {
            "allocation": ALLOCATIONS,
            "token_weighting": TOKEN_WEIGHTINGS,
            "missing_slots": MISSING_SLOTS,
            "repeats": REPEATS,
            "shapley_engine": ENGINES,
            "scorer_errors": SCORER_ERRORS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not (math.isfinite(self.lam) and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")
        if self.num_candidates is not None and self.num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1 (or None), got {self.num_candidates}")
        if self.mc_permutations < 1:
            raise ValueError(f"mc_permutations must be >= 1, got {self.mc_permutations}")
        if not 0 <= self.max_exact_players <= MAX_EXACT_PLAYERS:
            raise ValueError(
                f"max_exact_players must be in [0, {MAX_EXACT_PLAYERS}], got {self.max_exact_players}"
            )
        if not (math.isfinite(self.format_penalty) and self.format_penalty >= 0.0):
            raise ValueError(f"format_penalty must be finite and >= 0, got {self.format_penalty}")
        if self.row_seeded_sampling and self.use_vllm:
            raise ValueError("row_seeded_sampling needs transformers generation, not use_vllm")
        self._reject_unequal_trl_options()

    def _reject_unequal_trl_options(self) -> None:
        """TRL options that would make GRPO and ShapE-GRPO differ in anything but credit."""
        if self.loss_type not in LINEAR_LOSS_TYPES:
            raise ValueError(
                f"loss_type={self.loss_type!r} is not supported: its per-token weight depends on the sign "
                "of the advantage, so per-candidate credit would change more than credit; use one of "
                f"{LINEAR_LOSS_TYPES}"
            )
        if self.off_policy_mask_threshold is not None:
            raise ValueError(
                "off_policy_mask_threshold is not supported: it drops sequences by the sign of their "
                "advantage, which per-candidate credit makes token-dependent"
            )
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                f"multi_objective_aggregation={self.multi_objective_aggregation!r} is not supported: there "
                "is one reward (the set utility), normalised per group as in 'sum_then_normalize'"
            )
        if self.reward_weights is not None and list(self.reward_weights) != [1.0]:
            raise ValueError(
                f"reward_weights={self.reward_weights} is not supported: the one reward has weight 1"
            )
