"""The ``summarize`` and ``code`` tasks end to end: built by name (``get_task``), the offline tiny policy warm
started on them, two ShapE-GRPO steps through ``train_policy`` and a held-out evaluation; and a non-project
Hugging Face checkpoint (tiny GPT-2, byte-level BPE, chat template) trained through the same call.

Also the batch scoring hook (``Task.games``): the trainer and evaluation score a whole batch with one call,
with the per-response error semantics of scoring one by one.

The tiny models learn nothing useful here (and cannot learn code); what is tested is that the whole path runs,
the update is real (parameters change: some groups have reward variance) and the credit metrics are logged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shapegrpo_core.candidates import Candidate
from shapegrpo_core.evaluation import (
    evaluate_policy,
    score_completions,
    score_responses,
    try_score_response,
)
from shapegrpo_core.policy import build_tokenizer, load_policy, warm_start
from shapegrpo_core.tasks import Task, get_task
from shapegrpo_core.tasks.code import CodeTask, load_problems
from shapegrpo_core.tasks.summarize import SummarizeTask
from shapegrpo_core.trainer import METRIC_PREFIX, SetUtilityReward
from shapegrpo_core.training import train_policy

TINY_MODEL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}
# Short limits: the tiny model's programs are trivial, but hostile ones must not hold a test up.
CODE_LIMITS = {"timeout_s": 5, "call_timeout_s": 2, "load_timeout_s": 5, "startup_grace_s": 5}
# Real HumanEval problems with short prompts and solutions, so that the tiny policy can memorise the training
# ones in a few seconds (every 2nd problem is held out: strlen and add for eval, flip_case and concatenate
# for training).
CODE_PROBLEMS = ("HumanEval/23", "HumanEval/27", "HumanEval/53", "HumanEval/28")
CREDIT_METRICS = ("set_utility", "candidate_utility", "mean_abs_phi", "format_valid_rate", "nan_sets")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cands(*texts: str) -> list[Candidate]:
    return [Candidate(t, 0, len(t)) for t in texts]


def code_problems_file(directory: Path) -> Path:
    by_id = {p["task_id"]: p for p in load_problems()}
    path = directory / "problems.jsonl"
    path.write_text("".join(json.dumps(by_id[i]) + "\n" for i in CODE_PROBLEMS))
    return path


def code_task(directory: Path) -> Task:
    return get_task(
        "code",
        num_candidates=2,
        problems_path=str(code_problems_file(directory)),
        eval_every=2,
        max_problems=len(CODE_PROBLEMS),
        limits=dict(CODE_LIMITS),  # a plain mapping, as a run config passes it
        max_workers=2,
    )


def weights(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def assert_changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), (
        "training left every parameter as it was"
    )


def assert_round_trips(task: Task, tokenizer: Any) -> None:
    """Prompts and demonstrations (newlines, indentation, code punctuation) encode without <unk> and decode
    to the same characters: candidate spans measured on decoded text are then honest."""
    demos = task.demonstrations(4, seed=0)
    texts = [*task.build_dataset("train", 0)["prompt"], *demos["completion"]]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def assert_trained(result: Any, num_steps: int) -> None:
    assert result.global_step == num_steps
    steps = [h for h in result.history if "loss" in h]
    assert len(steps) == num_steps
    for h in steps:
        for name in CREDIT_METRICS:
            assert f"{METRIC_PREFIX}/{name}" in h, name
        assert math.isfinite(h[f"{METRIC_PREFIX}/set_utility"])
        assert math.isfinite(h["loss"])


def assert_eval_finite(report: Any, num_prompts: int) -> None:
    assert report.num_prompts == num_prompts and report.num_nan_sets == 0
    flat = report.to_dict()
    for name in ("set_utility", "candidate_utility", "best_candidate_utility", "format_valid_rate"):
        assert math.isfinite(flat[name]), name


# ------------------------------------------------------------------------------------------------------------
# The batch scoring hook
# ------------------------------------------------------------------------------------------------------------


class CountingSummarize(SummarizeTask):
    """Counts scorer calls; ``games`` is the base class's default (the loop over ``game``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = {"game": 0, "games": 0}

    def game(self, candidates, example):
        self.calls["game"] += 1
        return super().game(candidates, example)

    def games(self, items):
        self.calls["games"] += 1
        return super().games(items)


def _summaries(task: Task) -> tuple[list[str], list[dict[str, Any]]]:
    rows = [dict(r) for r in task.build_dataset("eval", 0)]
    texts = [
        " 1. " + rows[0]["reference_sentences"][0] + " 2. nothing at all",
        " 1. no numbered summary here",
        "",
        " 1. a 2. a 3. a 4. b",
    ]
    return texts, [rows[i % len(rows)] for i in range(len(texts))]


def test_default_games_is_the_loop_over_game():
    task = CountingSummarize(num_candidates=2)
    texts, examples = _summaries(task)
    items = [(task.parse(t)[:2], ex) for t, ex in zip(texts, examples, strict=True)]
    games = Task.games(task, items)
    assert len(games) == len(items) and task.calls["game"] == len(items)
    for g, (cands, ex) in zip(games, items, strict=True):
        full = np.ones((1, len(cands)), dtype=bool)
        assert np.allclose(g.value(full), task.game(cands, ex).value(full))


def test_score_responses_is_one_games_call_with_one_by_one_results():
    task = CountingSummarize(num_candidates=2)
    texts, examples = _summaries(task)
    batch = score_responses(task, texts, examples)
    assert task.calls["games"] == 1
    single = [try_score_response(task, t, ex) for t, ex in zip(texts, examples, strict=True)]
    for b, s in zip(batch, single, strict=True):
        assert b is not None and s is not None
        assert b.set_utility == pytest.approx(s.set_utility)
        assert b.num_parsed == s.num_parsed and b.format_valid == s.format_valid
        assert np.allclose(b.singleton_utilities, s.singleton_utilities)
    assert batch[0].set_utility > 0 and batch[2].num_scored == 0
    assert score_responses(task, [], []) == []
    with pytest.raises(ValueError, match="examples"):
        score_responses(task, texts, examples[:1])


def test_a_failing_response_in_a_batch_is_nan_alone():
    task = CountingSummarize(num_candidates=2)
    texts, examples = _summaries(task)
    examples[1] = {**examples[1], "reference_sentences": []}  # its game raises ValueError
    scores = score_responses(task, texts, examples)
    assert [s is None for s in scores] == [False, True, False, False]
    assert task.calls["games"] == 1  # the batch call failed; the fallback scores one by one with game
    table = score_completions(task, [examples[0], examples[1]], [[texts[0]], [texts[1]]])
    assert math.isfinite(table["set_utility"][0]) and math.isnan(table["set_utility"][1])
    with pytest.raises(ValueError, match="no reference"):
        score_responses(task, texts, examples, scorer_errors="raise")


def test_set_utility_reward_and_evaluation_score_a_batch_with_one_games_call():
    task = CountingSummarize(num_candidates=2)
    texts, examples = _summaries(task)
    reward = SetUtilityReward(task)
    columns = {k: [ex[k] for ex in examples] for k in examples[0] if k != "prompt"}
    ids = [[i] for i in range(len(texts))]
    values = reward(
        prompts=[ex["prompt"] for ex in examples], completions=texts, completion_ids=ids, **columns
    )
    assert task.calls == {"games": 1, "game": len(texts)}  # the default games loops over game
    assert values[0] == pytest.approx(try_score_response(task, texts[0], examples[0]).set_utility)
    assert len(reward.pop(ids, pad_token_id=0).scores) == len(texts)
    score_completions(task, examples[:2], [texts, texts])
    assert task.calls["games"] == 2


def test_code_games_share_one_sandbox_pool_and_isolate_a_broken_example(tmp_path):
    task = code_task(tmp_path)
    assert isinstance(task, CodeTask) and task.limits.timeout_s == CODE_LIMITS["timeout_s"]
    assert task.limits.hidden_paths  # the data file is still hidden when limits come as a mapping
    with pytest.raises(ValueError, match="unknown sandbox limits"):
        CodeTask(limits={"timeout": 5})
    rows = [dict(r) for r in task.build_dataset("train", 0)]
    problems = {p["task_id"]: p for p in load_problems()}
    right = [f"```python\n{problems[r['task_id']]['canonical_solution']}```" for r in rows]
    texts = [right[0], right[1], "```python\n    return None\n```", right[1]]
    examples = [rows[0], rows[1], rows[0], {**rows[1], "test": "def check(candidate):\n    assert ("}]
    scores = score_responses(task, texts, examples)
    assert scores[3] is None  # only the broken example's response
    assert [s.set_utility for s in scores[:3]] == pytest.approx([1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="does not parse"):
        task.games([(task.parse(t), ex) for t, ex in zip(texts, examples, strict=True)])


# ------------------------------------------------------------------------------------------------------------
# End to end with the offline tiny policy
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token_weighting", ["length_aware", "broadcast"])
def test_summarize_end_to_end_with_the_offline_policy(tmp_path, token_weighting):
    """Multi-token candidates (sentences) train under both token weightings."""
    task = get_task("summarize", num_candidates=2)
    assert_round_trips(task, build_tokenizer(task))
    base = warm_start(
        task,
        tmp_path / "warm",
        num_demos=8,
        max_steps=60,
        batch_size=4,
        learning_rate=1e-2,
        seed=0,
        **TINY_MODEL,
    )
    result = train_policy(
        task,
        base,
        tmp_path / "run",
        method="shapegrpo",
        max_steps=2,
        num_generations=4,
        prompts_per_step=2,
        max_completion_length=40,
        learning_rate=1e-3,
        eval_every=2,
        eval_num_prompts=2,
        seed=0,
        token_weighting=token_weighting,
    )
    assert_trained(result, 2)
    assert result.config["token_weighting"] == token_weighting
    assert [row["step"] for row in result.eval_curve] == [0, 2]
    assert_changed(weights(base), weights(result.final_checkpoint))
    model, tokenizer = load_policy(result.final_checkpoint)
    report = evaluate_policy(
        model, tokenizer, task, num_prompts=2, num_samples=2, max_new_tokens=40, num_bootstrap=50, seed=0
    )
    assert_eval_finite(report, 2)


def test_code_end_to_end_with_the_offline_policy(tmp_path, monkeypatch):
    task = code_task(tmp_path)
    assert_round_trips(task, build_tokenizer(task))
    # Long enough to memorise the two training solutions; sampled hotter in GRPO so groups disagree.
    base = warm_start(
        task,
        tmp_path / "warm",
        num_demos=8,
        max_steps=150,
        batch_size=4,
        learning_rate=1e-2,
        seed=0,
        **TINY_MODEL,
    )
    calls = {"game": 0, "games": 0}

    def counted(name: str) -> Any:
        method = getattr(task, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return method(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(task, "game", counted("game"))
    monkeypatch.setattr(task, "games", counted("games"))
    result = train_policy(
        task,
        base,
        tmp_path / "run",
        method="shapegrpo",
        max_steps=2,
        num_generations=4,
        prompts_per_step=1,
        max_completion_length=40,
        learning_rate=1e-3,
        temperature=1.5,
        seed=0,
    )
    assert_trained(result, 2)
    assert calls == {"game": 0, "games": 2}  # one sandbox pool per generation batch, none per response
    assert task.stats["status_ok"] > 0  # candidates really ran in the sandbox
    assert max(h["reward"] for h in result.history if "reward" in h) > 0  # some memorised solution passed
    assert_changed(weights(base), weights(result.final_checkpoint))
    model, tokenizer = load_policy(result.final_checkpoint)
    report = evaluate_policy(
        model, tokenizer, task, num_prompts=2, num_samples=2, max_new_tokens=40, num_bootstrap=50, seed=0
    )
    assert_eval_finite(report, 2)
    assert calls["games"] == 3 and calls["game"] == 0


# ------------------------------------------------------------------------------------------------------------
# Any local Hugging Face checkpoint: a tiny GPT-2 with a byte-level BPE tokenizer and a chat template
# ------------------------------------------------------------------------------------------------------------

USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def gpt2_checkpoint(task: Task, directory: Path) -> Path:
    """A randomly initialised 2-layer GPT-2 and a byte-level BPE tokenizer trained offline on the task's text
    (any text encodes: every byte is a token), with a chat template, saved as a plain HF checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    demos = task.demonstrations(16, seed=0)
    corpus = [*task.build_dataset("train", 0)["prompt"], *demos["completion"]]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=[END, "<pad>", USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=END,
        pad_token="<pad>",
        additional_special_tokens=[USER, ASSISTANT],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def sft_chat(path: Path, task: Task, output: Path) -> Path:
    """A short SFT of the checkpoint on chat-formatted demonstrations (TRL applies the chat template), so that
    its GRPO rollouts hold some numbered summaries and the groups' rewards differ."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_policy(path)
    demos = task.demonstrations(16, seed=0)
    data = datasets.Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]}
            for p, c in zip(demos["prompt"], demos["completion"], strict=True)
        ]
    )
    args = SFTConfig(
        output_dir=str(output),
        max_steps=60,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_length=512,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        seed=0,
    )
    SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train()
    model.save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
    return output


class RecordingSummarize(SummarizeTask):
    """Records the prompts the reward sees (conversational when the chat template was applied)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prompts: list[Any] = []

    def games(self, items):
        self.prompts.extend(example["prompt"] for _, example in items)
        return super().games(items)


def test_a_local_gpt2_checkpoint_with_a_chat_template_trains_on_summarize(tmp_path):
    task = RecordingSummarize(num_candidates=2)
    raw = gpt2_checkpoint(task, tmp_path / "gpt2")
    model, tokenizer = load_policy(raw)
    assert type(model).__name__ == "GPT2LMHeadModel" and tokenizer.chat_template == CHAT_TEMPLATE
    assert_round_trips(task, tokenizer)
    base = sft_chat(raw, task, tmp_path / "gpt2-sft")
    result = train_policy(
        task,
        base,
        tmp_path / "run",
        method="shapegrpo",
        max_steps=2,
        num_generations=4,
        prompts_per_step=2,
        max_completion_length=48,
        learning_rate=1e-3,
        seed=0,
    )
    assert_trained(result, 2)
    assert_changed(weights(base), weights(result.final_checkpoint))
    # The prompts went through the chat template: TRL received them as conversations.
    assert task.prompts and all(
        isinstance(p, list) and p[0]["role"] == "user" and p[0]["content"].startswith("Summarize")
        for p in task.prompts
    )
    model, tokenizer = load_policy(result.final_checkpoint)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    report = evaluate_policy(
        model,
        tokenizer,
        task,
        dataset=task.build_dataset("eval", 0).map(
            lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}]}
        ),
        num_prompts=2,
        num_samples=2,
        max_new_tokens=48,
        num_bootstrap=50,
        seed=0,
    )
    assert_eval_finite(report, 2)
