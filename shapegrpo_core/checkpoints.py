"""The last *complete* training checkpoint, so that a killed run resumes instead of crashing
(docs/pipeline.md, "Failure and resume").

HF ``Trainer`` writes ``checkpoint-<step>/`` in several steps (weights, optimizer, scheduler, RNG state, then
``trainer_state.json``) with no atomic rename, so a process killed mid-save leaves a directory that
``transformers.trainer_utils.get_last_checkpoint`` would happily pick and ``Trainer.train`` would then fail on
(or silently resume without optimizer state). ``ShapEGRPOTrainer`` writes a completion marker after every
save, recording the size of each file; :func:`find_last_complete_checkpoint` walks checkpoints newest first
and returns the first one that passes :func:`checkpoint_problems`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

COMPLETION_MARKER = "shapegrpo_checkpoint.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
SCHEDULER_FILE = "scheduler.pt"
# One of these (or a sharded index) holds the model: full weights or a PEFT adapter.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: str | os.PathLike[str]) -> int | None:
    """The global step encoded in a ``checkpoint-<step>`` directory name, or None for other names."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def _rng_files(path: Path) -> list[str]:
    # Single-process runs write rng_state.pth, multi-process runs rng_state_<rank>.pth.
    return sorted(p.name for p in path.glob("rng_state*.pth"))


def write_completion_marker(path: str | os.PathLike[str], global_step: int) -> Path:
    """Record that ``path`` was saved completely: the step and the byte size of every file in it.

    Written to a temporary file and renamed, so the marker itself is either absent or whole.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint directory {path} does not exist")
    files = {
        str(p.relative_to(path)): p.stat().st_size
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != COMPLETION_MARKER and not p.name.endswith(".tmp")
    }
    marker = path / COMPLETION_MARKER
    tmp = path / (COMPLETION_MARKER + ".tmp")
    tmp.write_text(json.dumps({"global_step": int(global_step), "files": files}, indent=1))
    os.replace(tmp, marker)
    return marker


def checkpoint_problems(path: str | os.PathLike[str], require_marker: bool = False) -> list[str]:
    """Why ``path`` cannot be resumed from (empty list = complete).

    Checks: the directory exists; ``trainer_state.json`` parses and its ``global_step`` matches the directory
    name; model weights, optimizer, scheduler and RNG state are present; and, when the completion marker
    exists, every file it lists still exists with the recorded size (a truncated or partially copied
    checkpoint fails). With ``require_marker`` a checkpoint without a marker (e.g. written by a stock
    ``Trainer``) is rejected too.
    """
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a directory"]
    problems: list[str] = []
    step = checkpoint_step(path)

    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        problems.append(f"missing {TRAINER_STATE}")
    else:
        try:
            state = json.loads(state_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            problems.append(f"{TRAINER_STATE} is not valid JSON ({err})")
        else:
            if not isinstance(state, dict) or "global_step" not in state:
                problems.append(f"{TRAINER_STATE} has no global_step")
            elif step is not None and state["global_step"] != step:
                problems.append(
                    f"{TRAINER_STATE} global_step {state['global_step']} != directory step {step}"
                )

    if not any((path / name).is_file() for name in WEIGHT_FILES):
        problems.append(f"no model weights (one of {', '.join(WEIGHT_FILES)})")
    if not any((path / name).is_file() for name in OPTIMIZER_FILES):
        problems.append("missing optimizer state (optimizer.pt)")
    if not (path / SCHEDULER_FILE).is_file():
        problems.append(f"missing {SCHEDULER_FILE}")
    if not _rng_files(path):
        problems.append("missing RNG state (rng_state*.pth)")

    marker = path / COMPLETION_MARKER
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text())
            files: dict[str, int] = recorded["files"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            problems.append(f"unreadable completion marker ({err!r})")
        else:
            for name, size in files.items():
                f = path / name
                if not f.is_file():
                    problems.append(f"file {name} listed in the completion marker is missing")
                elif f.stat().st_size != size:
                    problems.append(f"file {name} has {f.stat().st_size} bytes, marker recorded {size}")
    elif require_marker:
        problems.append(f"no completion marker ({COMPLETION_MARKER})")
    return problems


def is_complete_checkpoint(path: str | os.PathLike[str], require_marker: bool = False) -> bool:
    """Whether training can resume from ``path`` (see :func:`checkpoint_problems`)."""
    return not checkpoint_problems(path, require_marker=require_marker)


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """``checkpoint-<step>`` directories under ``output_dir``, oldest (lowest step) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def find_last_complete_checkpoint(
    output_dir: str | os.PathLike[str], require_marker: bool | None = None
) -> str | None:
    """Path of the highest-step complete checkpoint in ``output_dir``, or None if there is none.

    ``require_marker=None`` (auto) requires the completion marker as soon as any checkpoint in ``output_dir``
    has one: the run is then ours, and one of our checkpoints without a marker was interrupted while being
    saved (its files cannot be trusted even if they parse). Checkpoints of a stock ``Trainer`` (no markers
    anywhere) are judged by their files alone.

    Incomplete ones (killed mid-save, truncated files, missing optimizer/RNG state) are skipped, never
    deleted: they stay on disk for inspection and are overwritten when training reaches their step again.
    """
    checkpoints = list_checkpoints(output_dir)
    if require_marker is None:
        require_marker = any((path / COMPLETION_MARKER).is_file() for path in checkpoints)
    for path in reversed(checkpoints):
        if is_complete_checkpoint(path, require_marker=require_marker):
            return str(path)
    return None
