"""One call to fine-tune a policy with GRPO, ShapE-GRPO or the leave-one-out ablation (used by the pipeline
and the benchmarks).

    result = train_policy(task, "data/policy/warm_start", "runs/shapegrpo-seed0", method="shapegrpo",
                          max_steps=80, seed=0, eval_every=10)
    result.eval_curve  # [{"step": 0, "eval_set_utility": ...}, {"step": 10, ...}, ...]

All three methods run the same trainer (:class:`~shapegrpo_core.trainer.ShapEGRPOTrainer`) with the same
settings; only the credit allocation differs (``METHODS``), so a comparison is on equal terms, wall-clock
included. A run killed at any point resumes from its last complete checkpoint when called again with the same
``output_dir`` (``resume=True``). Held-out evaluation during training (:class:`HeldOutEvalCallback`) is logged
through the trainer, so it lands in ``trainer_state.json`` (and survives a resume) and in whatever
``report_to``/callbacks (e.g. MLflow) the caller attaches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from shapegrpo_core.checkpoints import find_last_complete_checkpoint, list_checkpoints
from shapegrpo_core.evaluation import evaluate_policy, show_progress
from shapegrpo_core.policy import LoraSettings, completion_cap, format_dataset, load_policy
from shapegrpo_core.tasks.base import Task
from shapegrpo_core.trainer import ShapEGRPOConfig, ShapEGRPOTrainer

# method -> (allocation, lam)
METHODS: dict[str, tuple[str, float]] = {
    "grpo": ("uniform", 0.0),
    "shapegrpo": ("shapley", 1.0),
    "loo": ("loo", 1.0),
    "wta": ("wta", 1.0),
}
EVAL_PREFIX = "heldout"  # held-out metrics are logged as heldout/set_utility, heldout/candidate_utility, ...
RESULT_FILE = "train_result.json"


# ------------------------------------------------------------------------------------------------------------
# Held-out evaluation during training
# ------------------------------------------------------------------------------------------------------------


class HeldOutEvalCallback(TrainerCallback):
    """Evaluate the policy on held-out prompts at step 0 and every ``every`` optimizer steps (and the last).

    Uses :func:`~shapegrpo_core.evaluation.evaluate_policy` on the model being trained, with a fixed eval seed
    (the same prompts and random numbers at every evaluation, so curves compare like with like) and a forked
    RNG (evaluating does not change the training run). Results are logged through ``Trainer.log`` as
    ``heldout/<metric>`` (+ ``_low``/``_high`` interval bounds) at the current global step, and kept in
    :attr:`results`. Call :meth:`bind` with the trainer before training.
    """

    def __init__(
        self,
        task: Task,
        every: int,
        *,
        dataset: datasets.Dataset | None = None,
        dataset_seed: int = 0,
        num_prompts: int | None = 32,
        num_samples: int = 1,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        seed: int = 0,
        num_bootstrap: int = 200,
        at_start: bool = True,
        also_at: Sequence[int] = (),
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.task = task
        self.every = every
        self.dataset = dataset if dataset is not None else task.build_dataset("eval", dataset_seed)
        if num_prompts is not None:
            self.dataset = self.dataset.select(range(min(num_prompts, len(self.dataset))))
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.num_bootstrap = num_bootstrap
        self.at_start = at_start
        self.also_at = frozenset(int(s) for s in also_at)  # extra steps, e.g. dense early evaluations
        self.results: list[dict[str, float]] = []
        self._trainer: ShapEGRPOTrainer | None = None

    def bind(self, trainer: ShapEGRPOTrainer) -> HeldOutEvalCallback:
        self._trainer = trainer
        return self

    def evaluate(self) -> dict[str, float]:
        trainer = self._trainer
        if trainer is None:
            raise RuntimeError("HeldOutEvalCallback.bind(trainer) was not called")
        args = trainer.args
        model = trainer.accelerator.unwrap_model(trainer.model)
        report = evaluate_policy(
            model,
            trainer.processing_class,
            self.task,
            dataset=self.dataset,
            num_samples=self.num_samples,
            max_new_tokens=self.max_new_tokens or args.max_completion_length,
            temperature=self.temperature if self.temperature is not None else args.temperature,
            seed=self.seed,
            num_bootstrap=self.num_bootstrap,
            num_candidates=trainer.num_candidates,
        )
        return {f"{EVAL_PREFIX}/{k}": v for k, v in report.to_dict().items()}

    def _run(self, state: TrainerState, control: TrainerControl) -> None:
        assert self._trainer is not None
        logged_steps = {h["step"] for h in state.log_history if f"{EVAL_PREFIX}/set_utility" in h}
        if state.global_step in logged_steps:  # already evaluated (e.g. we resumed from this step)
            return
        metrics = self.evaluate()
        self.results.append({"step": state.global_step, **metrics})
        # Trainer.log, not GRPOTrainer.log: that one would flush TRL's pending train metrics into this entry.
        # Its on_log event clears control.should_log, which would drop this step's own train log: restore it.
        should_log = control.should_log
        Trainer.log(self._trainer, dict(metrics))
        control.should_log = should_log

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.at_start and state.global_step == 0:
            self._run(state, control)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        step = state.global_step
        if step % self.every == 0 or step == state.max_steps or step in self.also_at:
            self._run(state, control)


def eval_curve(history: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
    """Held-out evaluations from a trainer log history: one dict per step with ``step``, ``eval_set_utility``,
    ``eval_candidate_utility`` and the other ``heldout/`` metrics (prefix replaced by ``eval_``)."""
    curve: dict[int, dict[str, float]] = {}
    for entry in history:
        if f"{EVAL_PREFIX}/set_utility" not in entry:
            continue
        row = {"step": int(entry["step"])}
        row.update(
            {f"eval_{k.split('/', 1)[1]}": v for k, v in entry.items() if k.startswith(f"{EVAL_PREFIX}/")}
        )
        curve[row["step"]] = row  # a step evaluated twice (resume) keeps the last
    return [curve[s] for s in sorted(curve)]


# ------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train_policy` produced.

    ``final_checkpoint`` is a loadable HF checkpoint (model + tokenizer) of the trained policy: ``output_dir``
    itself (``checkpoint-<step>/`` subdirectories hold the resumable training state). ``history`` is
    the trainer's log history (one dict per logged step: TRL's metrics, ``shapegrpo/*`` credit metrics,
    ``heldout/*`` evaluations). ``eval_curve`` is the held-out curve (see :func:`eval_curve`).
    ``train_seconds`` is the wall-clock of this call's training loop (a resumed call counts only its part);
    ``seconds_per_step`` the mean of TRL's per-step time (generation, scoring, credit, backward; held-out
    evaluation excluded) over the logged steps.
    """

    output_dir: str
    final_checkpoint: str
    method: str
    global_step: int
    history: list[dict[str, Any]]
    eval_curve: list[dict[str, float]]
    resumed_from: str | None
    train_seconds: float
    seconds_per_step: float
    config: dict[str, Any] = field(default_factory=dict)


def method_settings(method: str) -> tuple[str, float]:
    """(allocation, lam) of a method name: grpo=(uniform, 0), shapegrpo=(shapley, 1), loo=(loo, 1),
    wta=(wta, 1)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method]


def lora_settings(lora: LoraSettings | Mapping[str, Any] | bool | None) -> LoraSettings | None:
    """``lora`` as :class:`LoraSettings`: True = the defaults, a mapping of its fields (a run config's
    ``training_options: {lora: {r: 8}}``), None/False = full fine-tuning."""
    if lora is None or lora is False:
        return None
    if lora is True:
        return LoraSettings()
    if isinstance(lora, LoraSettings):
        return lora
    if not isinstance(lora, Mapping):
        raise ValueError(f"lora must be LoraSettings, a mapping of its fields or a bool, got {lora!r}")
    fields = {f.name for f in dataclasses.fields(LoraSettings)}
    unknown = set(lora) - fields
    if unknown:
        raise ValueError(f"unknown lora settings {sorted(unknown)}; known: {sorted(fields)}")
    values = dict(lora)
    if isinstance(values.get("target_modules"), list):
        values["target_modules"] = tuple(values["target_modules"])
    return LoraSettings(**values)


def train_policy(
    task: Task,
    base_policy_path: str | Path,
    output_dir: str | Path,
    *,
    method: str = "shapegrpo",
    lam: float | None = None,
    max_steps: int = 60,
    seed: int = 0,
    num_generations: int = 4,
    prompts_per_step: int = 4,
    learning_rate: float = 1e-4,
    max_completion_length: int | None = None,
    temperature: float = 1.0,
    beta: float = 0.0,
    save_steps: int | None = None,
    save_total_limit: int | None = 2,
    eval_every: int | None = None,
    eval_num_prompts: int | None = 32,
    eval_num_samples: int = 1,
    eval_seed: int = 0,
    eval_also_at: Sequence[int] = (),
    callbacks: Sequence[TrainerCallback] | None = None,
    report_to: str | list[str] = "none",
    resume: bool = True,
    logging_steps: int = 1,
    verbose: bool = False,
    progress: bool | None = None,
    lora: LoraSettings | Mapping[str, Any] | bool | None = None,
    train_dataset: datasets.Dataset | None = None,
    eval_dataset: datasets.Dataset | None = None,
    **config: Any,
) -> TrainResult:
    """Fine-tune the policy at ``base_policy_path`` on ``task`` with ``method`` and save it.

    Args:
        method: "grpo" (uniform credit, lam 0), "shapegrpo" (Shapley, lam 1) or "loo" (leave-one-out, lam 1).
        lam: override the method's mix lambda (e.g. 0.5 for half GRPO, half Shapley credit); uniform credit
            ignores it (rho = R whatever lam).
        max_steps: optimizer steps. Each step generates ``num_generations`` responses for ``prompts_per_step``
            prompts (per device) and takes one gradient step on them (``per_device_train_batch_size`` in
            ``config``, a multiple of ``num_generations``, overrides ``prompts_per_step``).
        max_completion_length: defaults to the base policy's ``generation_config.max_new_tokens`` (or 256).
        save_steps: checkpoint interval; defaults to ``eval_every`` or ``max(1, max_steps // 5)``.
        eval_every: held-out evaluation every N steps (plus step 0 and the last), logged as ``heldout/*``;
            None disables it. ``eval_dataset`` defaults to ``task.build_dataset("eval", eval_seed)``; either
            way its first ``eval_num_prompts`` rows are used (None: all), ``eval_num_samples`` samples each,
            sampled with seed ``eval_seed`` at every evaluation. ``eval_also_at``: extra evaluation steps
            (e.g. every 10 steps early on, where curves move fastest).
        callbacks: extra ``TrainerCallback``s (e.g. the pipeline's MLflow logging); ``report_to`` is passed to
            the trainer as is (the core never imports mlflow itself).
        resume: continue from the last *complete* checkpoint in ``output_dir`` if there is one. With
            ``resume=False`` an ``output_dir`` that already holds checkpoints is an error (stale checkpoints
            would be mixed with the new run's).
        verbose: print each log entry to stdout (HF's PrinterCallback); off by default, since the logs go to
            the trainer state, ``report_to`` and the callbacks anyway.
        progress: a progress bar over training steps (None: when stderr is a terminal).
        lora: LoRA (peft) instead of full fine-tuning: ``LoraSettings``, a mapping of its fields, or True for
            the defaults. The saved policy is then the adapter (with the tokenizer); ``load_policy`` loads it
            onto its base with the adapter merged.
        config: any other ``ShapEGRPOConfig``/``GRPOConfig`` field, e.g. ``scale_rewards="batch"``,
            ``shapley_engine="monte_carlo"``; on a GPU ``use_cpu=False, bf16=True``; ``use_vllm=True`` for
            vLLM rollouts. CPU, fp32 and no gradient checkpointing by default.

    Deterministic for a seed on CPU (generation, data order, Shapley Monte Carlo).
    """
    allocation, method_lam = method_settings(method)
    lam = method_lam if lam is None else float(lam)
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if num_generations < 2:
        raise ValueError(f"num_generations must be >= 2 (GRPO needs a group), got {num_generations}")
    if prompts_per_step < 1:
        raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
    output_dir = Path(output_dir)
    resume_from = find_last_complete_checkpoint(output_dir) if resume else None
    if not resume and list_checkpoints(output_dir):
        raise ValueError(f"{output_dir} already holds checkpoints; pass resume=True or use a fresh directory")

    lora = lora_settings(lora)
    model, tokenizer = load_policy(base_policy_path, lora=lora)
    max_completion_length = completion_cap(model, max_completion_length)
    if train_dataset is None:
        train_dataset = task.build_dataset("train", seed)
    train_dataset = format_dataset(train_dataset, tokenizer)

    if save_steps is None:
        save_steps = eval_every or max(1, max_steps // 5)
    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "allocation": allocation,
        "lam": lam,
        "max_steps": max_steps,
        "seed": seed,
        "data_seed": seed,
        "num_generations": num_generations,
        "per_device_train_batch_size": prompts_per_step * num_generations,
        "learning_rate": learning_rate,
        "max_completion_length": max_completion_length,
        "temperature": temperature,
        "beta": beta,
        "logging_steps": logging_steps,
        "save_strategy": "steps",
        "save_steps": save_steps,
        "save_total_limit": save_total_limit,
        "report_to": report_to,
        "use_cpu": True,
        "bf16": False,
        "activation_checkpointing": False,  # TRL turns it on by default; tiny models only pay its recompute
        "disable_tqdm": not show_progress(progress),  # None: a bar when stderr is a terminal
        "dataloader_num_workers": 0,
    }
    settings.update(config)
    args = ShapEGRPOConfig(**settings)

    eval_callback = None
    all_callbacks = list(callbacks or [])
    if eval_every is not None:
        eval_callback = HeldOutEvalCallback(
            task,
            eval_every,
            dataset=format_dataset(eval_dataset, tokenizer) if eval_dataset is not None else None,
            dataset_seed=eval_seed,
            num_prompts=eval_num_prompts,
            num_samples=eval_num_samples,
            seed=eval_seed,
            also_at=eval_also_at,
        )
        if eval_dataset is None:
            eval_callback.dataset = format_dataset(eval_callback.dataset, tokenizer)
        all_callbacks.append(eval_callback)

    trainer = ShapEGRPOTrainer(
        model=model,
        task=task,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=all_callbacks,
    )
    if eval_callback is not None:
        eval_callback.bind(trainer)
    if not verbose:
        trainer.remove_callback(PrinterCallback)

    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.perf_counter() - start

    # The trained policy goes to output_dir itself (HF's convention): load_policy(output_dir) loads it.
    final = output_dir
    trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    history = [dict(h) for h in trainer.state.log_history]
    step_times = [h["step_time"] for h in history if isinstance(h.get("step_time"), float)]
    result = TrainResult(
        output_dir=str(output_dir),
        final_checkpoint=str(final),
        method=method,
        global_step=int(trainer.state.global_step),
        history=history,
        eval_curve=eval_curve(history),
        resumed_from=resume_from,
        train_seconds=train_seconds,
        seconds_per_step=sum(step_times) / len(step_times) if step_times else math.nan,
        config={k: v for k, v in settings.items() if _jsonable(v)} | {"lora": asdict(lora) if lora else None},
    )
    summary = {k: v for k, v in asdict(result).items() if k != "history"}
    (final / RESULT_FILE).write_text(json.dumps(summary, indent=1, default=str))
    return result


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


__all__ = [
    "EVAL_PREFIX",
    "METHODS",
    "HeldOutEvalCallback",
    "TrainResult",
    "eval_curve",
    "lora_settings",
    "method_settings",
    "train_policy",
]
