"""The offline policy: word-level tokenizer, tiny LM, SFT warm start, loading (+ LoRA), sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shapegrpo_core.evaluation import generate_completions
from shapegrpo_core.models import ModelUnavailableError
from shapegrpo_core.policy import (
    BOS,
    EOS,
    PAD,
    UNK,
    LoraSettings,
    build_tiny_model,
    build_tokenizer,
    format_dataset,
    format_prompt,
    format_valid_rate,
    load_policy,
    num_parameters,
    read_warm_start_info,
    warm_start,
)
from shapegrpo_core.tasks.recsys import RecsysTask

SMALL = dict(num_items=24, num_genres=4, num_train_users=30, num_eval_users=10)
# A tiny budget that still teaches the format (about 10 s on one CPU core).
TINY_BUDGET = dict(
    num_demos=512, max_steps=80, batch_size=16, learning_rate=5e-3, hidden_size=64, num_layers=2, num_heads=4
)


@pytest.fixture(scope="module")
def task() -> RecsysTask:
    return RecsysTask(**SMALL)


@pytest.fixture(scope="module")
def warm(task: RecsysTask, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return warm_start(task, tmp_path_factory.mktemp("warm"), seed=0, **TINY_BUDGET)


# ---------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_task_strings(task: RecsysTask) -> None:
    tok = build_tokenizer(task)
    prompts = list(task.build_dataset("train", 0)["prompt"])
    demos = task.demonstrations(50, seed=0)
    texts = [
        *prompts,
        *demos["completion"],
        *(p + c for p, c in zip(demos["prompt"], demos["completion"], strict=True)),
        # Malformed but in-vocabulary text also survives: no delimiter, doubled punctuation, repeated spaces,
        # other delimiters and newlines.
        "i3 i4,,i5  ,i6: history",
        " i0; i1\n i2\n\n  i3;",
        " i0, i0, i1, i2, i3",
        "",
    ]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_splits_words_and_punctuation(task: RecsysTask) -> None:
    tok = build_tokenizer(task)
    assert tok.convert_ids_to_tokens(tok("history: i12 -> recommend 4:")["input_ids"]) == [
        BOS,
        "history",
        ":",
        "▁i12",
        "▁->",
        "▁recommend",
        "▁4",
        ":",
    ]
    assert tok.convert_ids_to_tokens(tok(" i3, i17", add_special_tokens=False)["input_ids"]) == [
        "▁i3",
        ",",
        "▁i17",
    ]
    assert [tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token] == [PAD, EOS, BOS, UNK]
    assert [tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok("zebra i3")["input_ids"][1] == tok.unk_token_id
    # The prompt's tokens are a prefix of prompt+completion's: TRL finds the completion where they diverge.
    for row in task.demonstrations(20, seed=1):
        p = tok(row["prompt"])["input_ids"]
        pc = tok(row["prompt"] + row["completion"])["input_ids"]
        assert pc[: len(p)] == p
    with pytest.raises(ValueError, match="whitespace"):
        build_tokenizer(["ok", "two words"])


def test_tokenizer_save_and_reload(task: RecsysTask, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = build_tokenizer(task)
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = task.build_dataset("eval", 0)[0]["prompt"] + " i1, i2, i3, i4"
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert back.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert back.eos_token_id == tok.eos_token_id and back.pad_token_id == tok.pad_token_id


# ---------------------------------------------------------------------------------- model and warm start


def test_tiny_model_size_and_determinism(task: RecsysTask) -> None:
    tok = build_tokenizer(task)
    model = build_tiny_model(tok, seed=0)
    assert model.config.vocab_size == len(tok)
    assert 500_000 < num_parameters(model) < 3_000_000
    again = build_tiny_model(tok, seed=0)
    other = build_tiny_model(tok, seed=1)
    sd, sd2, sd3 = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not all(torch.equal(sd[k], sd3[k]) for k in sd)
    with pytest.raises(ValueError, match="divisible"):
        build_tiny_model(tok, hidden_size=66, num_heads=4)


def test_warm_start_trains_saves_and_beats_random_init(task: RecsysTask, warm: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (warm / name).is_file(), name
    info = read_warm_start_info(warm)
    assert info["global_steps"] == TINY_BUDGET["max_steps"] and np.isfinite(info["train_loss"])

    model, tok = load_policy(warm)
    init = build_tiny_model(build_tokenizer(task), hidden_size=64, num_layers=2, num_heads=4, seed=0)
    trained, start = model.state_dict(), init.state_dict()
    assert trained.keys() == start.keys()
    assert not all(torch.equal(trained[k], start[k]) for k in trained)  # training changed the weights
    assert model.generation_config.eos_token_id == tok.eos_token_id

    rate = format_valid_rate(model, tok, task, num_samples=32, seed=0)
    init_rate = format_valid_rate(init, build_tokenizer(task), task, num_samples=32, seed=0)
    assert rate > init_rate
    assert rate >= 0.3  # ~0.6 measured; the default (longer) warm start reaches > 0.8

    # Generation stops on <eos>: sampled completions are short, and decoding keeps the task's layout.
    prompts = task.build_dataset("eval", 0)["prompt"][:8]
    completions = [c for (c,) in generate_completions(model, tok, prompts, max_new_tokens=16, seed=3)]
    for c in completions:
        assert len(task.parse(c)) <= 2 * task.num_candidates
        assert EOS not in c and BOS not in c


def test_warm_start_is_deterministic(task: RecsysTask, warm: Path, tmp_path: Path) -> None:
    budget = {**TINY_BUDGET, "max_steps": 5}
    a = warm_start(task, tmp_path / "a", seed=0, **budget)
    b = warm_start(task, tmp_path / "b", seed=0, **budget)
    ma, _ = load_policy(a)
    mb, _ = load_policy(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((a / "warm_start.json").read_text())["train_loss"] == pytest.approx(
        json.loads((b / "warm_start.json").read_text())["train_loss"], abs=0
    )


def test_sampling_is_seeded(task: RecsysTask, warm: Path) -> None:
    model, tok = load_policy(warm)
    prompts = list(task.build_dataset("eval", 0)["prompt"][:6])
    a = generate_completions(model, tok, prompts, max_new_tokens=16, seed=11)
    b = generate_completions(model, tok, prompts, max_new_tokens=16, seed=11)
    assert a == b and len(a) == 6
    assert format_valid_rate(model, tok, task, num_samples=8, seed=5) == format_valid_rate(
        model, tok, task, num_samples=8, seed=5
    )


# ---------------------------------------------------------------------------------- loading


def test_load_policy_with_lora(warm: Path) -> None:
    model, tok = load_policy(warm, lora=LoraSettings(r=4, alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ids = tok(["history: i1 -> recommend 4:"], return_tensors="pt")
    out = model(**ids)
    assert out.logits.shape == (1, ids["input_ids"].shape[1], len(tok))
    out.logits.sum().backward()  # gradients flow into the adapter


def test_load_policy_rejects_non_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="not a local Hugging Face checkpoint"):
        load_policy(tmp_path)
    with pytest.raises(ValueError, match="neither a local checkpoint directory"):
        load_policy("no-such-model")
    # A hub id is fetched only when the hub is reachable; offline (as the pipeline runs) it is a clear error.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="not reachable and not cached"):
        load_policy("Qwen/Qwen2.5-0.5B-Instruct")


def test_format_prompt_follows_the_chat_template(task: RecsysTask) -> None:
    tok = build_tokenizer(task)
    ds = task.build_dataset("eval", 0)
    assert format_prompt(tok, "history: i1 -> recommend 4:") == "history: i1 -> recommend 4:"
    assert format_dataset(ds, tok) is ds
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert format_prompt(tok, "history: i1 -> recommend 4:") == [
        {"role": "user", "content": "history: i1 -> recommend 4:"}
    ]
    chat = format_dataset(ds, tok)
    assert chat[0]["prompt"] == [{"role": "user", "content": ds[0]["prompt"]}]
    assert chat[0]["relevance"] == ds[0]["relevance"]


@pytest.mark.slow
def test_default_warm_start_is_mostly_format_valid(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    task = RecsysTask()
    model, tok = load_policy(warm_start(task, tmp_path / "policy", seed=0))  # ~20-35 s on one core
    assert format_valid_rate(model, tok, task, num_samples=100, seed=0) > 0.8  # measured 0.87-0.94
