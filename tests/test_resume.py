"""Checkpoint and resume: a run killed mid-way resumes from its last *complete* checkpoint at the same global
step with the same optimizer, scheduler and RNG state, and ends where an uninterrupted run ends; truncated or
partial checkpoints are skipped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_fixtures import tiny_config, tiny_task, tiny_warm_start
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from shapegrpo_core.checkpoints import (
    COMPLETION_MARKER,
    checkpoint_problems,
    find_last_complete_checkpoint,
    is_complete_checkpoint,
)
from shapegrpo_core.policy import load_policy
from shapegrpo_core.trainer import ShapEGRPOTrainer
from shapegrpo_core.training import train_policy

torch.set_num_threads(1)
TESTS_DIR = Path(__file__).parent
REPO = TESTS_DIR.parent

# 4 steps, checkpoints at 2 and 4, held-out eval at 0, 2, 4 (small, so each run takes ~1-2 s).
RUN = {
    "method": "shapegrpo",
    "max_steps": 4,
    "save_steps": 2,
    "learning_rate": 1e-3,
    "prompts_per_step": 2,
    "num_generations": 4,
    "max_completion_length": 12,
    "eval_every": 2,
    "eval_num_prompts": 8,
    "seed": 0,
}


class StepRecorder(TrainerCallback):
    """Records the global step training (re)starts from and the first step it takes."""

    def __init__(self) -> None:
        self.begin_step: int | None = None
        self.first_step: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.begin_step = state.global_step

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.first_step is None:
            self.first_step = state.global_step


class StopAfter(TrainerCallback):
    """Ends training after ``step`` (no checkpoint at that step): an in-process stand-in for a crash."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            control.should_training_stop = True


def _optimizer_state(checkpoint: str | Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / "optimizer.pt", weights_only=True)


def _assert_same_optimizer(a: str | Path, b: str | Path) -> None:
    sa, sb = _optimizer_state(a), _optimizer_state(b)
    assert sa["state"].keys() == sb["state"].keys()
    for key in sa["state"]:
        for name, value in sa["state"][key].items():
            torch.testing.assert_close(value, sb["state"][key][name], atol=0, rtol=0)


def _assert_same_weights(a: str | Path, b: str | Path) -> None:
    ma, _ = load_policy(a)
    mb, _ = load_policy(b)
    for pa, pb in zip(ma.parameters(), mb.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-7, rtol=0)


def _losses(history: list[dict[str, Any]]) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Any:
    """The reference: the same run, never interrupted."""
    return train_policy(tiny_task(), tiny_warm_start(), tmp_path_factory.mktemp("uninterrupted"), **RUN)


# ------------------------------------------------------------------------------------------------------------
# Completeness checks on real checkpoints
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine_checkpoints(tmp_path_factory) -> Path:
    """A real 2-step run with a checkpoint after each step."""
    out = tmp_path_factory.mktemp("two_checkpoints")
    model, tok = load_policy(tiny_warm_start())
    args = tiny_config(out, save_strategy="steps", save_steps=1)
    ShapEGRPOTrainer(model, tiny_task(), args=args, processing_class=tok).train()
    return out


@pytest.fixture
def two_checkpoints(pristine_checkpoints, tmp_path) -> Path:
    """A fresh copy of the 2-checkpoint run for a test to damage."""
    out = tmp_path / "run"
    shutil.copytree(pristine_checkpoints, out)
    return out


def test_trainer_writes_complete_checkpoints_with_rng_state(two_checkpoints):
    for step in (1, 2):
        ckpt = two_checkpoints / f"checkpoint-{step}"
        assert (ckpt / "rng_state.pth").is_file()
        assert (ckpt / COMPLETION_MARKER).is_file()
        assert checkpoint_problems(ckpt, require_marker=True) == []
        assert json.loads((ckpt / COMPLETION_MARKER).read_text())["global_step"] == step
    assert find_last_complete_checkpoint(two_checkpoints) == str(two_checkpoints / "checkpoint-2")


@pytest.mark.parametrize(
    "damage",
    ["truncate_weights", "truncate_optimizer", "drop_optimizer", "drop_scheduler", "drop_rng", "bad_state"],
)
def test_damaged_last_checkpoint_is_skipped(two_checkpoints, damage):
    last = two_checkpoints / "checkpoint-2"
    if damage.startswith("truncate"):
        target = last / ("model.safetensors" if damage == "truncate_weights" else "optimizer.pt")
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "drop_optimizer":
        (last / "optimizer.pt").unlink()
    elif damage == "drop_scheduler":
        (last / "scheduler.pt").unlink()
    elif damage == "drop_rng":
        (last / "rng_state.pth").unlink()
    else:
        (last / "trainer_state.json").write_text('{"global_step": 2, "log_hist')  # killed mid-write
    assert not is_complete_checkpoint(last)
    assert get_last_checkpoint(str(two_checkpoints)) == str(last)  # what HF alone would pick
    assert find_last_complete_checkpoint(two_checkpoints) == str(two_checkpoints / "checkpoint-1")


def test_partial_and_unmarked_checkpoints(two_checkpoints):
    (two_checkpoints / "checkpoint-7").mkdir()  # created, nothing written yet
    (two_checkpoints / "checkpoint-9").mkdir()
    (two_checkpoints / "checkpoint-9" / "model.safetensors").write_bytes(b"\0" * 10)
    assert find_last_complete_checkpoint(two_checkpoints) == str(two_checkpoints / "checkpoint-2")
    # Our run, but checkpoint-2 lost its marker (killed between its last file and the marker): not trusted.
    (two_checkpoints / "checkpoint-2" / COMPLETION_MARKER).unlink()
    assert find_last_complete_checkpoint(two_checkpoints) == str(two_checkpoints / "checkpoint-1")
    # A stock Trainer's checkpoints (no markers anywhere) are judged by their files.
    (two_checkpoints / "checkpoint-1" / COMPLETION_MARKER).unlink()
    assert find_last_complete_checkpoint(two_checkpoints) == str(two_checkpoints / "checkpoint-2")
    assert find_last_complete_checkpoint(two_checkpoints, require_marker=True) is None
    assert find_last_complete_checkpoint(two_checkpoints / "missing") is None


# ------------------------------------------------------------------------------------------------------------
# Resume (in process; fast)
# ------------------------------------------------------------------------------------------------------------


def test_resume_after_stop_matches_uninterrupted_run(tmp_path, uninterrupted):
    task, ws = tiny_task(), tiny_warm_start()
    first = train_policy(task, ws, tmp_path, callbacks=[StopAfter(3)], **RUN)  # dies after step 3
    assert first.global_step == 3 and not (tmp_path / "checkpoint-3").exists()

    recorder = StepRecorder()
    resumed = train_policy(task, ws, tmp_path, callbacks=[recorder], **RUN)
    assert resumed.resumed_from == str(tmp_path / "checkpoint-2")
    assert recorder.begin_step == 2 and recorder.first_step == 2
    assert resumed.global_step == 4
    # Step 3 is redone with the checkpoint's RNG state: same samples, same losses, same weights.
    assert _losses(resumed.history) == pytest.approx(_losses(uninterrupted.history), abs=1e-7)
    _assert_same_optimizer(tmp_path / "checkpoint-4", Path(uninterrupted.output_dir) / "checkpoint-4")
    _assert_same_weights(resumed.final_checkpoint, uninterrupted.final_checkpoint)
    assert [e["step"] for e in resumed.eval_curve] == [0, 2, 4]
    for got, want in zip(resumed.eval_curve, uninterrupted.eval_curve, strict=True):
        assert got == pytest.approx(want)


def test_resume_false_refuses_a_directory_with_checkpoints(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train_policy(tiny_task(), tiny_warm_start(), tmp_path, resume=False, **RUN)


# ------------------------------------------------------------------------------------------------------------
# Resume after SIGKILL (subprocess; slow)
# ------------------------------------------------------------------------------------------------------------

CHILD = """
import sys, time, torch
from pathlib import Path
from transformers import TrainerCallback
from trainer_fixtures import tiny_task
from shapegrpo_core.training import train_policy

torch.set_num_threads(1)
warm_start, out, flag, run = sys.argv[1], sys.argv[2], Path(sys.argv[3]), eval(sys.argv[4])

class HangAfter(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:  # checkpoint-2 is on disk, step 3 is done and not saved
            flag.write_text("3")
            time.sleep(600)

train_policy(tiny_task(), warm_start, out, callbacks=[HangAfter()], **run)
"""


@pytest.mark.slow
def test_sigkill_mid_training_resumes_from_last_complete_checkpoint(tmp_path, uninterrupted):
    out, flag = tmp_path / "run", tmp_path / "at_step_3"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(REPO)])}
    child = subprocess.Popen(
        [sys.executable, str(script), str(tiny_warm_start()), str(out), str(flag), repr(RUN)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not flag.exists():
            assert child.poll() is None, child.stderr.read().decode()[-3000:] if child.stderr else ""
            assert time.monotonic() < deadline, "child never reached step 3"
            time.sleep(0.2)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL

    # A checkpoint the kill left half-written: checkpoint-3 with a truncated optimizer file.
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-3")
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    (out / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({**state, "global_step": 3}))
    (out / "checkpoint-3" / COMPLETION_MARKER).unlink()
    opt = out / "checkpoint-3" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    assert find_last_complete_checkpoint(out) == str(out / "checkpoint-2")

    # The optimizer state at the resume point is the uninterrupted run's at that step.
    _assert_same_optimizer(out / "checkpoint-2", Path(uninterrupted.output_dir) / "checkpoint-2")

    recorder = StepRecorder()
    resumed = train_policy(tiny_task(), tiny_warm_start(), out, callbacks=[recorder], **RUN)
    assert resumed.resumed_from == str(out / "checkpoint-2")
    assert recorder.begin_step == 2 and recorder.first_step == 2
    assert resumed.global_step == 4
    assert _losses(resumed.history) == pytest.approx(_losses(uninterrupted.history), abs=1e-7)
    _assert_same_optimizer(out / "checkpoint-4", Path(uninterrupted.output_dir) / "checkpoint-4")
    _assert_same_weights(resumed.final_checkpoint, uninterrupted.final_checkpoint)
