"""The "+CL" baseline: the GRACE backbone and pooling trained with MultipleNegativesRankingLoss on the same data.

Usage:
    python training/train_contrastive.py --train_data demo --output_dir outputs/cl-demo
    python training/train_contrastive.py --train_data sick:../shared/data/sick2014/SICK_train.txt --max_steps 200
    OMP_NUM_THREADS=1 python training/train_contrastive.py --grace_config training/configs/sick.yaml \
        --output_dir outputs/cl-sick --epochs 100 --max_minutes 28        # equal budget to a GRACE run
    accelerate launch --multi_gpu --num_processes 2 training/train_contrastive.py --train_data demo

With --grace_config (a GRACE training YAML such as training/configs/sick.yaml) the backbone, the training triplets,
the LoRA adapter, the system prompt, prompt template, summary suffix and pooling (the readout), the seed, use_cpu and
the time budget (its max_train_minutes, unless --max_minutes is given) come from that config, so the +CL row trains
what the GRACE run trains, on the same rows, for the same minutes; flags for those settings are then refused. Training
stops at the first step past --max_minutes (give enough --epochs for the budget to be the limit); the minutes and steps
used go to <output_dir>/cl_training.json.

The saved folder is a GRACE SentenceTransformer with rationale_mode="none"; load it with
SentenceTransformer(path, trust_remote_code=True).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from grace_st.training.config import GraceDataArguments
from grace_st.training.contrastive import train_contrastive
from grace_st.training.data import load_training_data

LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Settings a --grace_config fixes; giving them too would make the two runs differ silently.
FROM_GRACE_CONFIG = ("model_name_or_path", "system_prompt", "pooling_mode", "seed", "lora_r", "use_cpu")


@dataclass
class ContrastiveArguments:
    grace_config: str | None = field(
        default=None,
        metadata={"help": "GRACE training YAML: backbone, data, LoRA, prompt, pooling, seed and budget come from it."},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Backbone; null or 'default' is SmolLM2-135M (not with --grace_config)."}
    )
    output_dir: str = field(default="outputs/contrastive", metadata={"help": "Where the trained model goes."})
    system_prompt: str | None = field(default=None, metadata={"help": "GRACE system prompt; null keeps the paper's."})
    pooling_mode: str | None = field(default=None, metadata={"help": "'mean' (default) or 'lasttoken'."})
    epochs: float = field(default=1.0, metadata={"help": "Training epochs."})
    batch_size: int = field(default=16, metadata={"help": "Rows per batch (in-batch negatives)."})
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW learning rate."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many steps (-1: run the epochs)."})
    max_minutes: float | None = field(
        default=None, metadata={"help": "Budget in minutes: stop at the first step past it (null: none)."}
    )
    budget_clock: str = field(
        default="wall", metadata={"help": "'wall' or 'cpu' (this process's CPU minutes: equal budgets on a busy CPU)."}
    )
    seed: int | None = field(default=None, metadata={"help": "Random seed (default 42)."})
    use_cpu: bool | None = field(default=None, metadata={"help": "Train on the CPU even when a GPU is present."})
    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank (adapter merged on save); 0 trains all."})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (1: one core, as the GRACE CPU runs)."})


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--grace_config", default=None)
    known, _ = pre.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if known.grace_config is None:
        parser = HfArgumentParser((ContrastiveArguments, GraceDataArguments))
        args, data_args = parser.parse_args_into_dataclasses()
        settings = {
            "backbone": args.model_name_or_path or "default",
            "system_prompt": args.system_prompt,
            "pooling_mode": args.pooling_mode or "mean",
            "seed": 42 if args.seed is None else args.seed,
            "use_cpu": bool(args.use_cpu),
            "max_minutes": args.max_minutes,
        }
        lora = None
        if args.lora_r:
            from peft import LoraConfig

            lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=LORA_MODULES, lora_dropout=0.0)
        record, options = {}, {}
    else:
        (args,) = HfArgumentParser(ContrastiveArguments).parse_args_into_dataclasses()  # data flags: refused
        given = [name for name in FROM_GRACE_CONFIG if getattr(args, name) is not None]
        if given:
            sys.exit(f"--{', --'.join(given)}: these come from --grace_config {known.grace_config}; drop them.")
        from trl import get_peft_config

        from grace_st.scripts.train import parse_train_args

        # The GRACE run's own parser: the same defaults, checks and LoRA construction as training/train.py.
        grace, model_args, data_args = parse_train_args(["--config", known.grace_config])
        if grace.mode != "supervised":
            sys.exit(f"{known.grace_config} trains mode={grace.mode!r}; +CL needs supervised triplets.")
        settings = {
            "backbone": model_args.model_name_or_path or "default",
            "system_prompt": grace.system_prompt,
            "pooling_mode": grace.pooling_mode,
            "seed": grace.seed,
            "use_cpu": bool(grace.use_cpu),
            "max_minutes": args.max_minutes if args.max_minutes is not None else grace.max_train_minutes,
        }
        lora = get_peft_config(model_args)
        record = {"grace_config": known.grace_config, "train_data": data_args.train_data}
        # The module options of the GRACE run's saved model that apply without a rationale (same prompt and readout).
        options = {
            "prompt_template": grace.prompt_template,
            "summary_suffix": grace.summary_suffix,
            "max_input_tokens": grace.max_input_tokens,
        }
    torch.set_num_threads(args.threads)
    rows = load_training_data(data_args, "supervised")
    dataset = rows.rename_column("prompt", "positive")
    record.update(threads=args.threads, rows=len(dataset))
    train_contrastive(
        settings["backbone"],
        dataset,
        args.output_dir,
        system_prompt=settings["system_prompt"],
        pooling_mode=settings["pooling_mode"],
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_steps=args.max_steps,
        seed=settings["seed"],
        use_cpu=settings["use_cpu"],
        peft_config=lora,
        max_minutes=settings["max_minutes"],
        budget_clock=args.budget_clock,
        record=record,
        options=options,
    )
    print(f"contrastive baseline saved to {args.output_dir} (budget and steps: {args.output_dir}/cl_training.json)")


if __name__ == "__main__":
    main()
