"""The command line of GRACE training (``grace-st-train``, ``training/train.py``): parse the flags, train, save.

:func:`run_training` is the glue between the three parsed configs and
:class:`grace_st.training.trainer.GraceGRPOTrainer`
(as TRL keeps its own in ``trl/scripts``); ``training/demo.py`` calls it too.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from grace_st.artifacts import TRAINING_INFO_FILE
from grace_st.backbone import resolve_backbone
from grace_st.scripts import setup_logging
from grace_st.training.checkpoints import check_writable_folder
from grace_st.training.data import load_training_data

TRAIN_USAGE = """Train a GRACE embedding model with GRPO (TRL), from CLI flags and/or a YAML config.

Usage:
    grace-st-train --config training/configs/demo.yaml [--max_steps 40] [--output_dir outputs/demo]
    grace-st-train --config training/configs/sick.yaml        # SICK triplets from ../shared/data
    grace-st-train --config training/configs/demo.yaml --resume_from_checkpoint last  # continue a run
    accelerate launch --multi_gpu --num_processes 2 training/train.py --config training/configs/demo.yaml  # 2 CPU
        # processes on gloo (use_cpu: true in demo.yaml); accelerate 1.15's `--cpu --num_processes 2` starts only one
    accelerate launch --config_file <deepspeed-zero2.yaml> training/train.py \\
        --config training/configs/qwen2.5-1.5b-supervised.yaml
(`python training/train.py ...` is the same command.)

Every field of grace_st.training.config.GraceGRPOConfig (TRL's GRPOConfig + GRACE's reward/rationale options),
trl.ModelConfig (model, dtype, LoRA) and grace_st.training.config.GraceDataArguments (data) is a flag and a YAML key.
The final GRACE SentenceTransformer (LoRA merged) is written to <output_dir>/grace-model unless final_model_dir is set.
"""


class _TrainFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag defaults in the help (as TRL's parser shows them) and the usage text as written."""


def parse_train_args(argv: list[str] | None = None) -> tuple[Any, Any, Any]:
    """Parse the training flags and ``--config`` YAML into ``(GraceGRPOConfig, trl.ModelConfig, GraceDataArguments)``.

    Raises:
        ImportError: the train extra is not installed (the message names it).
    """
    try:
        from trl import ModelConfig, TrlParser
    except ImportError as error:
        raise ImportError('grace-st-train needs the train extra: pip install "grace-st[train]"') from error
    from grace_st.training.config import GraceDataArguments, GraceGRPOConfig

    parser = TrlParser(
        (GraceGRPOConfig, ModelConfig, GraceDataArguments), description=TRAIN_USAGE, formatter_class=_TrainFormatter
    )
    return parser.parse_args_and_config(args=argv)


def run_training(training_args, model_args, data_args, resume_from_checkpoint=None, progress_callback=None):
    """Load data and model as the three parsed configs say, train, and save the GRACE model.

    Args:
        training_args: a :class:`grace_st.training.config.GraceGRPOConfig`.
        model_args: a ``trl.ModelConfig`` (``model_name_or_path``; None or ``"default"`` is the embedded default
            backbone; ``dtype``; ``use_peft`` and the ``lora_*`` options).
        data_args: a :class:`grace_st.training.config.GraceDataArguments`.
        resume_from_checkpoint: a checkpoint folder, True for the last one in ``output_dir``, or None.
        progress_callback: a ``TrainerCallback`` that replaces transformers' console progress callbacks (which
            print every log dict), e.g. a progress bar that writes the logs to a file; None keeps them.

    Returns:
        ``(trainer, path of the saved GRACE model)``.
    """
    from transformers import PrinterCallback, ProgressCallback
    from trl import get_peft_config

    from grace_st.training.trainer import GraceGRPOTrainer

    name = resolve_backbone(model_args.model_name_or_path)
    model_init_kwargs = dict(training_args.model_init_kwargs or {})
    if model_args.dtype not in (None, "auto"):
        model_init_kwargs.setdefault("dtype", model_args.dtype)
    if model_args.attn_implementation is not None:
        model_init_kwargs.setdefault("attn_implementation", model_args.attn_implementation)
    training_args.model_init_kwargs = model_init_kwargs
    dataset = load_training_data(data_args, training_args.mode)
    trainer = GraceGRPOTrainer(
        model=name, args=training_args, train_dataset=dataset, peft_config=get_peft_config(model_args)
    )
    if progress_callback is not None:  # replaces transformers' console progress (it prints every log dict)
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(progress_callback)
    # Refuse a final folder that cannot be written before training, not after it.
    check_writable_folder(trainer.final_model_dir(), marker=TRAINING_INFO_FILE)
    if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() in ("true", "last", "latest"):
        resume_from_checkpoint = True
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer, trainer.save_grace_model(training_datasets=[data_args.train_data])


def main(argv: list[str] | None = None) -> None:
    """``grace-st-train``: parse the flags, run :func:`run_training`, print where the model went."""
    training_args, model_args, data_args = parse_train_args(argv)
    setup_logging(logging.INFO if training_args.should_log else logging.WARNING)
    trainer, path = run_training(
        training_args, model_args, data_args, resume_from_checkpoint=training_args.resume_from_checkpoint
    )
    if trainer.accelerator.is_main_process:
        print(f"GRACE model saved to {path} (load with SentenceTransformer(path, trust_remote_code=True))")
