"""The "+CL" baseline: the GRACE backbone and pooling trained with MultipleNegativesRankingLoss on the same data.

Usage:
    python training/train_contrastive.py --train_data demo --output_dir outputs/cl-demo
    python training/train_contrastive.py --train_data sick:../shared/data/sick2014/SICK_train.txt --max_steps 200
    accelerate launch --multi_gpu --num_processes 2 training/train_contrastive.py --train_data demo

The saved folder is a GRACE SentenceTransformer with rationale_mode="none"; load it with
SentenceTransformer(path, trust_remote_code=True).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from grace_st.config import GraceDataArguments
from grace_st.contrastive import train_contrastive
from grace_st.data import load_training_data


@dataclass
class ContrastiveArguments:
    model_name_or_path: str = field(default="default", metadata={"help": "Backbone; 'default' is SmolLM2-135M."})
    output_dir: str = field(default="outputs/contrastive", metadata={"help": "Where the trained model goes."})
    system_prompt: str | None = field(default=None, metadata={"help": "GRACE system prompt; null keeps the paper's."})
    epochs: float = field(default=1.0, metadata={"help": "Training epochs."})
    batch_size: int = field(default=16, metadata={"help": "Rows per batch (in-batch negatives)."})
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW learning rate."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many steps (-1: run the epochs)."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on the CPU even when a GPU is present."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (adapter merged on save); 0 trains all weights."})


def main() -> None:
    parser = HfArgumentParser((ContrastiveArguments, GraceDataArguments))
    args, data_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(level=logging.INFO)
    rows = load_training_data(data_args, "supervised")
    dataset = rows.rename_column("prompt", "positive")
    lora = None
    if args.lora_r > 0:
        from peft import LoraConfig

        modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=modules, lora_dropout=0.0)
    train_contrastive(
        args.model_name_or_path,
        dataset,
        args.output_dir,
        system_prompt=args.system_prompt,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_steps=args.max_steps,
        use_cpu=args.use_cpu,
        peft_config=lora,
    )
    print(f"contrastive baseline saved to {args.output_dir}")


if __name__ == "__main__":
    main()
