"""Held-out evaluation of a policy on a task: sample K-candidate answers, score them with the task's game.

``evaluate_policy`` samples ``num_samples`` responses per held-out prompt (``task.build_dataset("eval",
seed)``) with ``transformers`` ``generate`` under a fixed seed, scores every response exactly as the trainer
does (:func:`score_response`: the first K parsed candidates are the players, the set utility is U(all of
them)), and reports each metric with a seeded bootstrap 95% interval. Resampling is over *prompts* (a prompt's
samples are averaged first) because samples of one prompt are not independent.

Metrics (per response, then averaged):
    set_utility             U(first K candidates)                            (u0 when nothing parses)
    candidate_utility       mean_i U({i}) over the scored candidates          (u0 when nothing parses)
    best_candidate_utility  max_i U({i})                                      (u0 when nothing parses)
    duplicate_rate          share of scored candidates repeating an earlier one in the same response
    format_valid_rate       task.format_valid(completion) (exactly K distinct, non-empty candidates)
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from shapegrpo_core.candidates import Candidate
from shapegrpo_core.games import Game, game_from_dict, game_to_dict
from shapegrpo_core.tasks.base import Task

logger = logging.getLogger(__name__)

SCORER_ERRORS = ("raise", "nan")
# Extra columns of score_completions(keep_games=True): enough to rebuild each ResponseScore.
GAME_COLUMNS = ("candidates", "spans", "singleton_utilities", "num_duplicates", "format_valid", "game")
METRICS = (
    "set_utility",
    "candidate_utility",
    "best_candidate_utility",
    "duplicate_rate",
    "format_valid_rate",
)


# ----------------------------------------------------------------------------------------------------------
# Scoring one response (shared with the trainer, so train-time and eval-time metrics mean the same thing)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponseScore:
    """A response scored by its task's game.

    ``candidates`` are the first K parsed candidates (the players); ``num_parsed`` counts all parsed ones
    (more than K is a format violation). ``singleton_utilities[i]`` = U({i}). ``set_utility`` is NaN when the
    scorer could not value the set (the trainer then gives the response advantage 0).
    """

    candidates: tuple[Candidate, ...]
    num_parsed: int
    game: Game
    set_utility: float
    u0: float
    singleton_utilities: np.ndarray  # (K_g,)
    num_duplicates: int
    format_valid: bool

    @property
    def num_scored(self) -> int:
        return len(self.candidates)

    @property
    def candidate_utility(self) -> float:
        # A response with no candidate shows the user nothing: its "candidate" is worth u0, not excluded
        # (excluding it would make garbage look no worse than a well-formed answer).
        return float(self.singleton_utilities.mean()) if self.num_scored else self.u0

    @property
    def best_candidate_utility(self) -> float:
        return float(self.singleton_utilities.max()) if self.num_scored else self.u0

    @property
    def duplicate_rate(self) -> float:
        return self.num_duplicates / self.num_scored if self.num_scored else 0.0


def repeat_indices(candidates: Sequence[Candidate]) -> list[int]:
    """Indices of the candidates repeating (whitespace stripped) an earlier one of the same response."""
    seen: set[str] = set()
    repeats = []
    for j, c in enumerate(candidates):
        key = c.text.strip()
        if key in seen:
            repeats.append(j)
        seen.add(key)
    return repeats


def count_duplicates(candidates: Sequence[Candidate]) -> int:
    """How many candidates repeat (after stripping whitespace) an earlier candidate of the same response."""
    return len(repeat_indices(candidates))


def set_and_singleton_values(game: Game) -> tuple[float, np.ndarray]:
    """(U(N), [U({i})]_i) of an unbatched game with one ``value`` call."""
    if tuple(game.batch_shape) != ():
        raise ValueError(f"expected an unbatched game, got batch_shape {game.batch_shape}")
    k = int(game.num_players)
    coalitions = np.concatenate([np.ones((1, k), dtype=bool), np.eye(k, dtype=bool)], axis=0)  # (1 + K, K)
    values = np.asarray(game.value(coalitions), dtype=np.float64).reshape(1 + k)  # (1 + K,)
    return float(values[0]), values[1:]


def _num_candidates(task: Task, num_candidates: int | None) -> int:
    k = task.num_candidates if num_candidates is None else int(num_candidates)
    if k < 1:
        raise ValueError(f"num_candidates must be >= 1, got {k}")
    return k


def _check_scorer_errors(scorer_errors: str) -> None:
    if scorer_errors not in SCORER_ERRORS:
        raise ValueError(f"scorer_errors must be one of {SCORER_ERRORS}, got {scorer_errors!r}")


def score_with_game(
    task: Task, completion: str, parsed: Sequence[Candidate], game: Game, num_candidates: int
) -> ResponseScore:
    """The score of a parsed response whose game (over ``parsed[:num_candidates]``) is already built."""
    candidates = tuple(parsed[:num_candidates])
    if game.num_players != len(candidates):
        raise ValueError(
            f"task {task.name!r} built a game with {game.num_players} players "
            f"for {len(candidates)} candidates"
        )
    set_utility, singles = set_and_singleton_values(game)
    return ResponseScore(
        candidates=candidates,
        num_parsed=len(parsed),
        game=game,
        set_utility=set_utility,
        u0=float(np.asarray(game.u0)),
        singleton_utilities=singles,
        num_duplicates=count_duplicates(candidates),
        format_valid=bool(task.format_valid(completion)),
    )


def score_response(
    task: Task, completion: str, example: Mapping[str, Any], num_candidates: int | None = None
) -> ResponseScore:
    """Parse ``completion``, build its game on the first K candidates and value the set and each singleton."""
    k = _num_candidates(task, num_candidates)
    parsed = task.parse(completion)
    return score_with_game(task, completion, parsed, task.game(tuple(parsed[:k]), example), k)


def _checked(score: ResponseScore, completion: str) -> ResponseScore | None:
    """``score``, or None (logged) when its set utility is not finite."""
    if not math.isfinite(score.set_utility):
        logger.warning("non-finite set utility %s for completion %r", score.set_utility, completion[:200])
        return None
    return score


def try_score_response(
    task: Task,
    completion: str,
    example: Mapping[str, Any],
    num_candidates: int | None = None,
    scorer_errors: str = "nan",
) -> ResponseScore | None:
    """:func:`score_response`, or None when the scorer fails and ``scorer_errors == "nan"``.

    A failure is a ``ValueError``/``ArithmeticError`` from parsing or scoring, or a non-finite set utility; it
    is logged as a warning. Callers record it as a NaN set utility (advantage 0 in training, counted in
    metrics).
    """
    _check_scorer_errors(scorer_errors)
    if scorer_errors == "raise":
        return score_response(task, completion, example, num_candidates)
    try:
        score = score_response(task, completion, example, num_candidates)
    except (ValueError, ArithmeticError) as err:  # a failed scorer: a recorded NaN, not a crash
        logger.warning("scoring failed for completion %r: %s", completion[:200], err)
        return None
    return _checked(score, completion)


def score_responses(
    task: Task,
    completions: Sequence[str],
    examples: Sequence[Mapping[str, Any]],
    num_candidates: int | None = None,
    scorer_errors: str = "nan",
) -> list[ResponseScore | None]:
    """:func:`try_score_response` of ``completions[i]`` for ``examples[i]``, every game built by *one*
    ``task.games`` call (a task with a per-call cost, e.g. the ``code`` sandbox pool, pays it once).

    Same results and error semantics as scoring one by one: with ``scorer_errors="nan"`` a response whose
    scoring fails is None and the others are scored. When the batch call itself raises (it cannot say which
    response broke it), every response is scored again on its own with ``task.game``, which isolates the
    failure. With ``"raise"`` the first error propagates.
    """
    _check_scorer_errors(scorer_errors)
    if len(completions) != len(examples):
        raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
    k = _num_candidates(task, num_candidates)
    if not completions:
        return []
    try:
        parsed = [task.parse(text) for text in completions]
        games = task.games([(tuple(p[:k]), ex) for p, ex in zip(parsed, examples, strict=True)])
    except (ValueError, ArithmeticError) as err:
        if scorer_errors == "raise":
            raise
        logger.warning("batch scoring of %d responses failed (%s); scoring one by one", len(examples), err)
        return [
            try_score_response(task, text, ex, k, scorer_errors)
            for text, ex in zip(completions, examples, strict=True)
        ]
    if len(games) != len(completions):  # a broken override of Task.games, not a bad response
        raise RuntimeError(f"task {task.name!r} returned {len(games)} games for {len(completions)} responses")
    out: list[ResponseScore | None] = []
    for text, p, game in zip(completions, parsed, games, strict=True):
        if scorer_errors == "raise":
            out.append(score_with_game(task, text, p, game, k))
            continue
        try:
            score = score_with_game(task, text, p, game, k)
        except (ValueError, ArithmeticError) as err:  # as in try_score_response
            logger.warning("scoring failed for completion %r: %s", text[:200], err)
            out.append(None)
            continue
        out.append(_checked(score, text))
    return out


# ----------------------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a bootstrap confidence interval."""

    value: float
    low: float
    high: float


def bootstrap_mean(
    values: np.ndarray, num_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Estimate:
    """Mean of ``values`` (one per independent unit, NaNs dropped), seeded percentile bootstrap interval."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if num_bootstrap < 1:
        raise ValueError(f"num_bootstrap must be >= 1, got {num_bootstrap}")
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"))
    point = float(x.mean())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(num_bootstrap, x.size))  # (B, n)
    means = x[idx].mean(axis=1)  # (B,)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    # The percentile interval of a bootstrapped mean brackets the mean; min/max only absorb float rounding
    # when every resample has the same mean (e.g. all values equal) and summation order shifts it by an ulp.
    return Estimate(point, float(min(low, point)), float(max(high, point)))


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------


def _prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
    """Token ids of one prompt, tokenised the way TRL's GRPOTrainer tokenises it."""
    if isinstance(prompt, str):
        return list(tokenizer(text=prompt)["input_ids"])
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], Mapping):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text=text, add_special_tokens=False)["input_ids"])
    raise ValueError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


def show_progress(progress: bool | None) -> bool:
    """Progress bars: as asked, else when stderr is a terminal (not in a pipeline step's captured log)."""
    return sys.stderr.isatty() if progress is None else bool(progress)


def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool | None = None,
) -> list[list[str]]:
    """``num_samples`` completions per prompt (decoded with special tokens skipped, cut at the first EOS).

    Deterministic for a seed and batch size. The global torch RNG is forked, so evaluating in the middle of a
    training run does not change the run's own random stream. ``progress``: a progress bar over batches
    (None: when stderr is a terminal).
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError("num_samples and batch_size must be >= 1")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = model.generation_config.eos_token_id
    eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    device = next(model.parameters()).device
    flat = [(i, p) for i, p in enumerate(prompts) for _ in range(num_samples)]
    out: list[list[str]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            starts = range(0, len(flat), batch_size)
            for start in tqdm(starts, desc="generation", unit="batch", disable=not show_progress(progress)):
                chunk = flat[start : start + batch_size]
                ids = [_prompt_ids(tokenizer, p) for _, p in chunk]
                width = max(len(x) for x in ids)
                input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], device=device)
                attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
                gen = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    temperature=temperature if do_sample else None,
                    top_p=top_p if do_sample else None,
                    top_k=top_k if do_sample else None,
                    pad_token_id=pad_id,
                    eos_token_id=eos_ids or None,
                )
                completion_ids = gen[:, width:].tolist()
                for (i, _), row in zip(chunk, completion_ids, strict=True):
                    cut = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
                    out[i].append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


@dataclass
class EvalReport:
    """Aggregate metrics with bootstrap intervals plus the per-response table."""

    metrics: dict[str, Estimate]
    responses: pd.DataFrame
    num_prompts: int
    num_responses: int
    num_nan_sets: int
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float]:
        """Flat ``{metric, metric_low, metric_high, ...}`` for logging (MLflow, Dagster metadata)."""
        flat: dict[str, float] = {}
        for name, est in self.metrics.items():
            flat[name] = est.value
            flat[f"{name}_low"] = est.low
            flat[f"{name}_high"] = est.high
        flat["num_prompts"] = float(self.num_prompts)
        flat["num_responses"] = float(self.num_responses)
        flat["num_nan_sets"] = float(self.num_nan_sets)
        return flat


def _stored_score(
    candidates: Sequence[Candidate], singles: Sequence[float], num_duplicates: int, valid: bool, game: str
) -> dict[str, Any]:
    """The GAME_COLUMNS of one response (``game`` = "" for a failed scorer)."""
    return {
        "candidates": [c.text for c in candidates],
        "spans": [[c.start, c.end] for c in candidates],
        "singleton_utilities": [float(u) for u in singles],
        "num_duplicates": int(num_duplicates),
        "format_valid": bool(valid),
        "game": game,
    }


def score_completions(
    task: Task,
    examples: Sequence[Mapping[str, Any]],
    completions: Sequence[Sequence[str]],
    num_candidates: int | None = None,
    scorer_errors: str = "nan",
    *,
    keep_games: bool = False,
) -> pd.DataFrame:
    """Per-response table for ``completions[i][s]`` = sample s for ``examples[i]``.

    All responses are scored in one batch (:func:`score_responses`). A response whose scorer fails (see
    :func:`try_score_response`) has NaN utilities; it still counts in the format and duplicate rates.

    ``keep_games=True`` adds what :func:`scores_from_table` needs to rebuild every :class:`ResponseScore`
    without scoring again (columns in :data:`GAME_COLUMNS`: the scored candidates and their spans, U({i}),
    duplicates, format validity and the game as JSON, ``""`` for a failed scorer), so credit can be computed
    later from the stored table (the pipeline's ``rollout_scores``).
    """
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completion lists")
    k = _num_candidates(task, num_candidates)
    flat = [(i, s, text) for i, samples in enumerate(completions) for s, text in enumerate(samples)]
    scores = score_responses(
        task, [text for _, _, text in flat], [examples[i] for i, _, _ in flat], k, scorer_errors
    )
    rows = []
    for (i, s, text), r in zip(flat, scores, strict=True):
        if r is None:  # failed scorer: utilities NaN, format statistics still measured
            parsed = task.parse(text)
            scored = parsed[:k]
            nan = float("nan")
            stored = _stored_score(scored, [], count_duplicates(scored), task.format_valid(text), "")
            row = {
                "num_parsed": len(parsed),
                "num_scored": len(scored),
                "set_utility": nan,
                "u0": nan,
                "candidate_utility": nan,
                "best_candidate_utility": nan,
                "duplicate_rate": count_duplicates(scored) / len(scored) if scored else 0.0,
                "format_valid_rate": float(task.format_valid(text)),
            }
        else:
            game = json.dumps(game_to_dict(r.game)) if keep_games else ""
            singles = r.singleton_utilities
            stored = _stored_score(r.candidates, singles, r.num_duplicates, r.format_valid, game)
            row = {
                "num_parsed": r.num_parsed,
                "num_scored": r.num_scored,
                "set_utility": r.set_utility,
                "u0": r.u0,
                "candidate_utility": r.candidate_utility,
                "best_candidate_utility": r.best_candidate_utility,
                "duplicate_rate": r.duplicate_rate,
                "format_valid_rate": float(r.format_valid),
            }
        rows.append({"prompt_index": i, "sample": s, "completion": text, **row, **stored})
    columns = [
        "prompt_index",
        "sample",
        "completion",
        "num_parsed",
        "num_scored",
        "set_utility",
        "u0",
        *METRICS[1:],
        *(GAME_COLUMNS if keep_games else ()),
    ]
    return pd.DataFrame(rows, columns=columns)


def scores_from_table(table: pd.DataFrame) -> list[ResponseScore | None]:
    """The :class:`ResponseScore` of every row of a ``score_completions(..., keep_games=True)`` table, in
    row order (None where the scorer had failed), rebuilt from the stored values: no task, no scoring."""
    missing = [c for c in ("completion", "num_parsed", "set_utility", "u0", *GAME_COLUMNS) if c not in table]
    if missing:
        raise ValueError(f"a scores table needs the columns {missing} (score_completions(keep_games=True))")
    out: list[ResponseScore | None] = []
    for row in table.itertuples(index=False):
        if not row.game:
            out.append(None)
            continue
        candidates = tuple(
            Candidate(str(text), int(start), int(end))
            for text, (start, end) in zip(row.candidates, row.spans, strict=True)
        )
        out.append(
            ResponseScore(
                candidates=candidates,
                num_parsed=int(row.num_parsed),
                game=game_from_dict(json.loads(row.game)),
                set_utility=float(row.set_utility),
                u0=float(row.u0),
                singleton_utilities=np.asarray(row.singleton_utilities, dtype=np.float64),
                num_duplicates=int(row.num_duplicates),
                format_valid=bool(row.format_valid),
            )
        )
    return out


def summarize_responses(
    responses: pd.DataFrame, num_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict[str, Estimate]:
    """Bootstrap each metric over prompts (each prompt's samples averaged first)."""
    per_prompt = responses.groupby("prompt_index")[list(METRICS)].mean()  # (P, M), NaN-skipping
    return {
        name: bootstrap_mean(per_prompt[name].to_numpy(), num_bootstrap, confidence, seed + j)
        for j, name in enumerate(METRICS)
    }


def evaluate_policy(
    model: Any,
    tokenizer: Any,
    task: Task,
    *,
    dataset: datasets.Dataset | None = None,
    dataset_seed: int = 0,
    num_prompts: int | None = None,
    num_samples: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
    seed: int = 0,
    batch_size: int = 32,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    num_candidates: int | None = None,
    scorer_errors: str = "nan",
) -> EvalReport:
    """Sample, score and summarise a policy on held-out prompts.

    ``model``/``tokenizer`` are a loaded causal LM and its tokenizer (``policy.load_policy(path)`` gives
    both). ``dataset`` defaults to ``task.build_dataset("eval", dataset_seed)``, truncated to ``num_prompts``
    rows. The same ``seed`` gives the same samples and the same intervals.
    """
    if dataset is None:
        dataset = task.build_dataset("eval", dataset_seed)
    if num_prompts is not None:
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        dataset = dataset.select(range(min(num_prompts, len(dataset))))
    examples = [dict(row) for row in dataset]
    if not examples:
        raise ValueError("evaluation dataset is empty")
    completions = generate_completions(
        model,
        tokenizer,
        [ex["prompt"] for ex in examples],
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        do_sample=do_sample,
        seed=seed,
        batch_size=batch_size,
    )
    responses = score_completions(task, examples, completions, num_candidates, scorer_errors)
    metrics = summarize_responses(responses, num_bootstrap, confidence, seed)
    return EvalReport(
        metrics=metrics,
        responses=responses,
        num_prompts=len(examples),
        num_responses=len(responses),
        num_nan_sets=int(responses["set_utility"].isna().sum()),
        config={
            "num_samples": num_samples,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "do_sample": do_sample,
            "seed": seed,
            "confidence": confidence,
            "num_bootstrap": num_bootstrap,
        },
    )
