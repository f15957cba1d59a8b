"""Helper of tests/training/test_trainer.py, run under `accelerate launch --num_processes 2 --cpu` (gloo).

Usage:
    accelerate launch --multi_gpu --num_processes 2 tests/two_process_train.py TINY_BACKBONE_DIR OUT_DIR
    (CPU processes: the config sets use_cpu=True, so torch.distributed runs on gloo)

Trains one GRACE step with one group per process and saves, per rank, the local rollout embeddings and what the reward
saw after gathering (rollout and query embeddings, the hard-negative term) to OUT_DIR/rank{N}.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from datasets import Dataset
from tiny_training import TINY_CPU_SETTINGS

import grace_st.training.trainer as trainer_module
from grace_st.training.config import GraceGRPOConfig
from grace_st.training.trainer import GraceGRPOTrainer


def main() -> None:
    backbone, out = sys.argv[1], Path(sys.argv[2])
    record: dict = {}
    original_rewards = trainer_module.grace_rewards

    def recording_rewards(query, positive, negative, group_size, **kwargs):
        result = original_rewards(query, positive, negative, group_size, **kwargs)
        record.setdefault("gathered_positive", positive.detach().cpu())
        record.setdefault("gathered_query", query.detach().cpu())
        record.setdefault("hard_negative", result.hard_negative.detach().cpu())
        record.setdefault("group_size", group_size)
        return result

    trainer_module.grace_rewards = recording_rewards

    class RecordingTrainer(GraceGRPOTrainer):
        def _pooled(self, features, rationales):
            # The reward's first call pools the local rollouts first (followed by the query/negative rationales
            # when they were generated in the same call).
            embeddings = super()._pooled(features, rationales)
            record.setdefault("local_positive", embeddings[: self.args.per_device_train_batch_size].detach().cpu())
            return embeddings

    dataset = Dataset.from_dict(
        {
            "prompt": ["A cat sleeps on the sofa.", "Stocks fell sharply today."],
            "query": ["where is the cat", "market news"],
            "negative": ["A dog runs outside.", "The team won the match."],
        }
    )
    args = GraceGRPOConfig(
        **TINY_CPU_SETTINGS,
        output_dir=str(out / "run"),
        per_device_train_batch_size=2,
        max_completion_length=6,
        max_steps=1,
        shuffle_dataset=False,
    )
    trainer = RecordingTrainer(backbone, args, train_dataset=dataset)
    trainer.train()
    out.mkdir(parents=True, exist_ok=True)
    record["world"] = (torch.distributed.get_world_size(), torch.distributed.get_backend())
    torch.save(record, out / f"rank{trainer.accelerator.process_index}.pt")
    # Tear the process group down before exit: left to interpreter shutdown, gloo's threads sometimes abort the
    # process ("terminate called without an active exception", seen once in CI after training had finished).
    trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
