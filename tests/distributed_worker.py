"""A training run on however many processes ``torch.distributed.run`` starts (or one, run plainly), recording
what each process samples and the advantages it trains on:
``python tests/distributed_worker.py POLICY OUT [row_seeded|batched]``.

Each process trains the tiny recsys task for two steps on an equal share of a global batch of 2 prompts x 4
generations (``row_seeded_sampling``, so a completion does not depend on which process samples it) and writes
``OUT/rank<r>.json``: per generation, its global step, the rows it sampled (token ids) and their (rows, T)
token advantages; process 0 adds the trainer's log history. The test joins the ranks' rows and compares
them with a one-process run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from trainer_fixtures import tiny_config, tiny_task

from shapegrpo_core.policy import load_policy
from shapegrpo_core.trainer import ShapEGRPOTrainer

GLOBAL_ROWS = 8  # 2 prompts x 4 generations per optimizer step, whatever the number of processes


class RecordingTrainer(ShapEGRPOTrainer):
    """The project's trainer, keeping each generation's completions and token advantages."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[dict[str, Any]] = []

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        mask = output["completion_mask"].bool()
        ids = output["completion_ids"]
        self.records.append(
            {
                "step": int(self.state.global_step),
                "completions": [row[m].tolist() for row, m in zip(ids, mask, strict=True)],
                "advantages": [row[m].tolist() for row, m in zip(output["advantages"], mask, strict=True)],
            }
        )
        return output


def main(policy_dir: str, out_dir: str, sampling: str = "row_seeded") -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    out = Path(out_dir)
    task = tiny_task()
    model, tokenizer = load_policy(policy_dir)
    config = tiny_config(
        out / "trainer",
        per_device_train_batch_size=GLOBAL_ROWS // world,
        row_seeded_sampling=sampling == "row_seeded",  # "batched": TRL's own sampling, seeded per process
        allocation="shapley",
    )
    trainer = RecordingTrainer(model=model, task=task, args=config, processing_class=tokenizer)
    trainer.train()
    record: dict[str, Any] = {"world_size": world, "rank": rank, "generations": trainer.records}
    if rank == 0:
        record["log_history"] = trainer.state.log_history
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:4])
