"""Command-line entry points: ``grace-st-train``, ``grace-st-eval`` and ``grace-st-publish``.

``pip install grace-st`` installs them (``[project.scripts]``); the checkout's ``training/train.py``,
``eval/mteb_run.py`` and ``eval/publish.py`` are thin scripts that call the same functions, so both forms take the same
flags. Each function takes ``argv`` (None: ``sys.argv[1:]``) and returns None (console scripts exit with the return
value, so what a command produced goes to stdout and its files).
This module is the command-line layer: it is the one place in grace_st that prints (a command's result goes to
stdout); everything it calls logs.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

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

Every field of grace_st.config.GraceGRPOConfig (TRL's GRPOConfig + GRACE's reward/rationale options),
trl.ModelConfig (model, dtype, LoRA) and grace_st.config.GraceDataArguments (data) is a flag and a YAML key.
The final GRACE SentenceTransformer (LoRA merged) is written to <output_dir>/grace-model unless final_model_dir is set.
"""


PUBLISH_USAGE = """Publish a saved GRACE model to the Hugging Face Hub (or write the folder that would be uploaded).

Usage:
    grace-st-publish --model runs/grace-sick --repo-id my-org/grace-smollm2-135m --results-dir runs/mteb \\
        --dry-run /tmp/grace-publish
    grace-st-publish --model runs/grace-sick --repo-id my-org/grace-smollm2 --results-dir runs/mteb --private
(`python eval/publish.py ...` is the same command.)

The folder holds the safetensors weights, the sentence-transformers configs, grace_st.py (the module code, so the
model loads where grace_st is not installed), the mteb results of this exact model and the rendered model card.
An upload then pins the card's usage snippet to the commit it made (revision=...). The token comes from HF_TOKEN or
`hf auth login`; it is never printed.
"""


class _TrainFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag defaults in the help (as TRL's parser shows them) and the usage text as written."""


def _setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# ------------------------------------------------------------------------------------------------------------ train
def parse_train_args(argv: list[str] | None = None) -> tuple[Any, Any, Any]:
    """Parse the training flags and ``--config`` YAML into ``(GraceGRPOConfig, trl.ModelConfig, GraceDataArguments)``.

    Raises:
        ImportError: the train extra is not installed (the message names it).
    """
    try:
        from trl import ModelConfig, TrlParser
    except ImportError as error:
        raise ImportError('grace-st-train needs the train extra: pip install "grace-st[train]"') from error
    from grace_st.config import GraceDataArguments, GraceGRPOConfig

    parser = TrlParser(
        (GraceGRPOConfig, ModelConfig, GraceDataArguments), description=TRAIN_USAGE, formatter_class=_TrainFormatter
    )
    return parser.parse_args_and_config(args=argv)


def train(argv: list[str] | None = None) -> None:
    """``grace-st-train``: parse the flags, run :func:`grace_st.trainer.run_training`, print where the model went."""
    training_args, model_args, data_args = parse_train_args(argv)
    _setup_logging(logging.INFO if training_args.should_log else logging.WARNING)
    from grace_st.trainer import run_training

    trainer, path = run_training(
        training_args, model_args, data_args, resume_from_checkpoint=training_args.resume_from_checkpoint
    )
    if trainer.accelerator.is_main_process:
        print(f"GRACE model saved to {path} (load with SentenceTransformer(path, trust_remote_code=True))")


# --------------------------------------------------------------------------------------------------------- evaluate
def evaluate(argv: list[str] | None = None) -> None:
    """``grace-st-eval``: :func:`grace_st.evaluation.main` (evaluate with mteb, print and save the comparison table).

    Raises:
        ImportError: the eval extra is not installed (the message names it).
    """
    try:
        from grace_st.evaluation import main
    except ImportError as error:
        raise ImportError('grace-st-eval needs the eval extra: pip install "grace-st[eval]"') from error
    main(argv)


# ---------------------------------------------------------------------------------------------------------- publish
def publish_parser() -> argparse.ArgumentParser:
    """The argument parser of ``grace-st-publish``."""
    parser = argparse.ArgumentParser(
        prog="grace-st-publish", description=PUBLISH_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="Folder of a saved GRACE model.")
    parser.add_argument("--repo-id", required=True, help="Hub repository, ORG/NAME.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument(
        "--dry-run", metavar="OUTDIR", default=None, help="Write the folder to OUTDIR, upload nothing."
    )
    parser.add_argument(
        "--results-dir", default=None, help="mteb output dir of grace-st-eval with this model's results."
    )
    parser.add_argument(
        "--comparison",
        default=None,
        help="Markdown comparison table for the card (default: <results-dir>/comparison.md).",
    )
    parser.add_argument("--template", default=None, help="Model card template (default: the one grace_st ships).")
    parser.add_argument("--license", default=None, help="License id for the card metadata, e.g. apache-2.0.")
    parser.add_argument("--no-examples", action="store_true", help="Skip generating example rationales and timing.")
    parser.add_argument("--device", default=None, help="Device for the example rationales.")
    return parser


def publish(argv: list[str] | None = None) -> None:
    """``grace-st-publish``: build the publish folder; write it to ``--dry-run`` or upload it and print the commit."""
    from grace_st.hub import build_publish_folder, upload_folder

    parser = publish_parser()
    args = parser.parse_args(argv)
    _setup_logging()
    if args.repo_id.count("/") != 1 or not all(args.repo_id.split("/")):
        parser.error(f"--repo-id must be ORG/NAME, got {args.repo_id!r}")
    comparison = args.comparison
    if comparison is None and args.results_dir and (Path(args.results_dir) / "comparison.md").is_file():
        comparison = str(Path(args.results_dir) / "comparison.md")

    def build(target: str | Path) -> Path:
        return build_publish_folder(
            args.model,
            target,
            repo_id=args.repo_id,
            results_dir=args.results_dir,
            comparison=comparison,
            template=args.template,
            measure_examples=not args.no_examples,
            device=args.device,
            license=args.license,
        )

    if args.dry_run:
        folder = build(args.dry_run)
        print(f"Wrote {folder} ({sum(1 for p in folder.rglob('*') if p.is_file())} files); nothing was uploaded.")
        return
    with tempfile.TemporaryDirectory(prefix="grace-publish-") as tmp:
        folder = build(Path(tmp) / "repo")
        url = upload_folder(folder, args.repo_id, private=args.private)
    print(f"Uploaded to {args.repo_id}: {url}")
