"""The offline policy: a word-level tokenizer built from a task's vocabulary, a tiny causal LM from a config,
and an SFT warm start on format-only demonstrations (docs/tasks.md, "Models"). Plus loading any local
Hugging Face checkpoint (chat template and optional LoRA included).

Tokenizer. Words are split on spaces the way SentencePiece does it: a space becomes the marker "▁" glued to
the next word ("history: i12" -> "history", ":", "▁i12"), and "," ":" ";" and newlines are split off as
tokens of their own ("i3," -> "i3", ","). The decoder turns "▁" back into a space, so decode(encode(x)) == x
for every string made of vocabulary words, spaces (single or repeated), newlines and those punctuation marks:
completions decoded by TRL have exactly the characters the model produced, which keeps candidate character
spans honest. A "<bos>" is
prepended on encoding (TRL's SFT and GRPO both call the tokenizer with add_special_tokens=True), and the model
is trained to end a completion with "<eos>" so that generation stops after K items.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from shapegrpo_core.evaluation import generate_completions, show_progress
from shapegrpo_core.tasks.base import Task

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)  # ids 0..3
SPACE = "▁"  # U+2581, SentencePiece's space marker
# Split off as tokens of their own: the delimiters of delimited candidates, ":" and newlines (multi-line
# prompts/completions of the other tasks then round-trip too).
SPLIT_CHARS = ",:;\n"
WARM_START_INFO = "warm_start.json"


# --------------------------------------------------------------------------------------------- tokenizer


def word_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Spaces -> "▁" prefixes, then "," ":" ";" and newlines isolated."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True),
            pre_tokenizers.Split(Regex(f"[{SPLIT_CHARS}]"), behavior="isolated"),
        ]
    )


def word_pieces(words: Sequence[str]) -> list[str]:
    """Every token the vocabulary words can produce: each word alone and after a space, split like the
    pre-tokenizer splits it; plus the bare space marker (from repeated spaces) and the split characters
    (",", ":", ";", newline). Order kept, no duplicates."""
    pre = word_pre_tokenizer()
    pieces: dict[str, None] = dict.fromkeys([SPACE, *SPLIT_CHARS])
    for w in words:
        if not w or any(ch.isspace() for ch in w):
            raise ValueError(f"vocabulary words must be non-empty and contain no whitespace, got {w!r}")
        if w in SPECIAL_TOKENS or SPACE in w:
            raise ValueError(
                f"vocabulary word {w!r} clashes with a special token or the space marker {SPACE!r}"
            )
        for text in (w, " " + w):
            for piece, _ in pre.pre_tokenize_str(text):
                pieces[piece] = None
    return list(pieces)


def build_tokenizer(task: Task | Sequence[str], model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``task.vocabulary()`` (or a list of words), with the special tokens
    <pad> <eos> <bos> <unk> (ids 0-3)."""
    words = task.vocabulary() if isinstance(task, Task) else list(task)
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *word_pieces(words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = word_pre_tokenizer()
    backend.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="never", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # the decoder already gives the exact text back
        padding_side="right",
    )
    return tokenizer


# --------------------------------------------------------------------------------------------- model


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> PreTrainedModel:
    """A small Llama-architecture causal LM (about 1M parameters at the defaults), randomly initialised."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)  # the weight init draws from torch's global generator
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def num_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------------------------- warm start


def warm_start(
    task: Task,
    output_dir: str | Path,
    *,
    num_demos: int = 3000,
    epochs: float = 2.0,
    max_steps: int = -1,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    seed: int = 0,
    use_cpu: bool = True,
    progress: bool | None = None,
) -> Path:
    """Build tokenizer and tiny model, SFT them on ``task.demonstrations(num_demos, seed)`` with TRL's
    SFTTrainer (prompt-completion format, loss on completion tokens only, <eos> appended), and save both to
    ``output_dir`` as a Hugging Face checkpoint. Also writes ``warm_start.json`` (settings, final loss, time).

    The demonstrations teach the output format (K distinct item tokens, comma-separated, then <eos>), not
    which items are good: the preferences are left for GRPO / ShapE-GRPO to learn. Deterministic for a seed
    on CPU.
    """
    # Imported here: TRL is slow to import and only this function needs it.
    from trl import SFTConfig, SFTTrainer

    if num_demos < 1:
        raise ValueError(f"num_demos must be >= 1, got {num_demos}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tokenizer = build_tokenizer(task)
    model = build_tiny_model(
        tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, seed=seed
    )
    demos = task.demonstrations(num_demos, seed)
    texts = [p + c for p, c in zip(demos["prompt"], demos["completion"], strict=True)]
    max_length = max(len(ids) for ids in tokenizer(texts)["input_ids"]) + 1  # + <eos>: nothing is truncated
    completions = tokenizer(list(demos["completion"]), add_special_tokens=False)["input_ids"]
    max_completion = max(len(ids) for ids in completions)
    args = SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.0,
        completion_only_loss=True,
        max_length=max_length,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=not show_progress(progress),  # None: a bar when stderr is a terminal
        seed=seed,
        data_seed=seed,
        use_cpu=use_cpu,
        dataloader_num_workers=0,
        # TRL defaults both to True; on CPU bf16 autocast is ~10x slower, and checkpointing a 1M-parameter
        # model saves no memory worth having.
        bf16=False,
        activation_checkpointing=False,  # (transformers 5 name of gradient_checkpointing)
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=demos, processing_class=tokenizer)
    result = trainer.train()
    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    # Exactly the longest demonstration and its <eos>: the completion length sized to the format. With slack,
    # RL drifts into answers longer than K that never end (clip ratio 1.0 within ~100 steps, measured), and
    # the format penalty then shifts every reward alike (docs/statistics.md, "Format").
    model.generation_config.max_new_tokens = max_completion + 1
    model.generation_config.save_pretrained(str(output_dir))
    info = {
        "task": task.name,
        "num_candidates": task.num_candidates,
        "num_demos": num_demos,
        "epochs": epochs,
        "max_steps": max_steps,
        "global_steps": result.global_step,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_parameters": num_parameters(model),
        "vocab_size": len(tokenizer),
        "seed": seed,
        "train_loss": result.training_loss,
        "wall_s": time.perf_counter() - start,
    }
    (output_dir / WARM_START_INFO).write_text(json.dumps(info, indent=1))
    return output_dir


# --------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoraSettings:
    """LoRA settings (peft); ``target_modules="all-linear"`` adapts every linear layer but the head."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"


def load_policy(
    path: str | Path,
    *,
    lora: LoraSettings | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a Hugging Face causal-LM checkpoint (the warm start, a prepared SmolLM2, e.g. a downloaded
    Qwen2.5-0.5B-Instruct) and its tokenizer. ``path`` is anything :func:`shapegrpo_core.models.resolve_model`
    accepts: a local directory, the alias ``smollm2-135m-instruct`` (prepared offline on first use) or a Hub
    id (only when the hub is reachable or the snapshot cached). A directory holding a peft LoRA adapter (what
    ``train_policy(..., lora=...)`` saves) loads its base model with the adapter merged in. With ``lora``,
    wrap the model in a fresh trainable peft LoRA adapter (base weights frozen).
    """
    from shapegrpo_core.models import resolve_model

    path = resolve_model(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        model, tokenizer = _load_adapter(path, dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    if tokenizer.pad_token is None:  # e.g. Llama-style checkpoints; batching needs a pad token
        tokenizer.pad_token = tokenizer.eos_token
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules
            if isinstance(lora.target_modules, str)
            else list(lora.target_modules),
        )
        model = get_peft_model(model, config)
    return model, tokenizer


def _load_adapter(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A LoRA adapter directory: its base (``base_model_name_or_path``) with the adapter merged, so the result
    is a plain model like any other checkpoint's; the tokenizer saved with the adapter."""
    from peft import PeftModel

    base_name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"adapter at {str(path)!r} does not name its base model (base_model_name_or_path)")
    base, _ = load_policy(base_name, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    merged.generation_config = base.generation_config
    return merged, AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def completion_cap(model: PreTrainedModel, requested: int | None = None, fallback: int = 256) -> int:
    """Tokens a completion may take: ``requested``, else the model's ``generation_config.max_new_tokens`` (a
    warm start sets it to its format's length), else ``fallback`` (``train_policy``'s own default)."""
    if requested is not None:
        return int(requested)
    return int(getattr(model.generation_config, "max_new_tokens", None) or fallback)


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str | list[dict[str, str]]:
    """The prompt as the policy should see it: a one-message conversation when the tokenizer has a chat
    template (TRL then applies the template, generation prompt included), the plain string otherwise."""
    if getattr(tokenizer, "chat_template", None):
        return [{"role": "user", "content": prompt}]
    return prompt


def format_dataset(dataset: Any, tokenizer: PreTrainedTokenizerBase) -> Any:
    """``dataset`` (a datasets.Dataset with a string ``prompt`` column), prompts in the policy's format."""
    if not getattr(tokenizer, "chat_template", None):
        return dataset
    return dataset.map(lambda row: {"prompt": format_prompt(tokenizer, row["prompt"])})


# --------------------------------------------------------------------------------------------- sampling


def format_valid_rate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    *,
    num_samples: int = 50,
    split: str = "eval",
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int | None = None,
) -> float:
    """Fraction of ``num_samples`` sampled completions (one per prompt of ``split``, cycling) that are
    ``task.format_valid``. ``max_new_tokens`` defaults to the model's generation config (set by
    :func:`warm_start`), else 2K + 4 (enough for K delimited one-token candidates)."""
    pool = list(task.build_dataset(split, seed)["prompt"])
    prompts = [format_prompt(tokenizer, pool[i % len(pool)]) for i in range(num_samples)]
    max_new = max_new_tokens or model.generation_config.max_new_tokens or 2 * task.num_candidates + 4
    samples = generate_completions(
        model, tokenizer, prompts, max_new_tokens=max_new, temperature=temperature, seed=seed
    )
    completions = [c for per_prompt in samples for c in per_prompt]
    return sum(task.format_valid(c) for c in completions) / max(1, len(completions))


def read_warm_start_info(path: str | Path) -> dict[str, Any]:
    """The ``warm_start.json`` written by :func:`warm_start` (settings, final loss, wall time)."""
    info = json.loads((Path(path) / WARM_START_INFO).read_text())
    if not math.isfinite(info.get("train_loss", float("nan"))):
        raise ValueError(f"warm start at {str(path)!r} recorded a non-finite train loss")
    return info


__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "SPACE",
    "UNK",
    "LoraSettings",
    "build_tiny_model",
    "build_tokenizer",
    "format_dataset",
    "format_prompt",
    "format_valid_rate",
    "load_policy",
    "num_parameters",
    "read_warm_start_info",
    "warm_start",
    "word_pieces",
    "word_pre_tokenizer",
]
