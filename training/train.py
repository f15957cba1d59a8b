"""Train a GRACE embedding model with GRPO (TRL), from CLI flags and/or a YAML config.

Usage:
    python training/train.py --config training/configs/demo.yaml [--max_steps 40] [--output_dir outputs/demo]
    python training/train.py --config training/configs/sick.yaml        # SICK triplets from ../shared/data
    python training/train.py --config training/configs/demo.yaml --resume_from_checkpoint last  # continue a run
    accelerate launch --multi_gpu --num_processes 2 training/train.py --config training/configs/demo.yaml  # 2 CPU
        # processes on gloo (use_cpu: true in demo.yaml); accelerate 1.15's `--cpu --num_processes 2` starts only one
    accelerate launch --config_file <deepspeed-zero2.yaml> training/train.py \
        --config training/configs/qwen2.5-1.5b-supervised.yaml

Every field of grace_st.training.config.GraceGRPOConfig (TRL's GRPOConfig + GRACE's reward/rationale options),
trl.ModelConfig (model, dtype, LoRA) and grace_st.training.config.GraceDataArguments (data) is a flag and a YAML key.
The final GRACE SentenceTransformer (LoRA merged) is written to <output_dir>/grace-model unless final_model_dir is set.
"""

from grace_st.cli import train

if __name__ == "__main__":
    train()
