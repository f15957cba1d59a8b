"""The README's main job: train GRACE on the embedded default backbone on a CPU and show what it gained.

Usage:
    make demo            # or: .venv/bin/python training/demo.py [--config training/configs/demo.yaml]
                         #        [--max-train-minutes 30] [--no-contrastive] [--output-dir outputs/grace-demo]

Steps (no network needed; the data is bundled in grace_st/data/):
1. scores the cheap baselines on the bundled dev triplets: no rationale, echo (the text repeated as its "rationale"),
   PromptEOL (the backbone asked for the text's meaning in one word) and the untrained GRACE model;
2. trains the "+CL" baseline (same backbone and pooling, MultipleNegativesRankingLoss) on the bundled training set;
3. trains GRACE with GRPO (training/configs/demo.yaml: LoRA, 2 documents x 4 rollouts, 24 steps; a 30-minute cap
   guards against a stuck run and is reported when it cuts training short);
4. prints the reward trend, a few rationales of the trained model and, last, the table (triplet accuracy, MRR@10 over
   the dev corpus, rationale finish/copy rates); saves the trained model (load it with
   SentenceTransformer(path, trust_remote_code=True)).

The terminal shows progress and the summary; the full log (Python logging at INFO, every training log dict as JSON,
warnings) goes to demo.log in the output folder. A re-run replaces the demo's own outputs in that folder (it carries
the marker file .grace_demo) and refuses a folder the demo did not write.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import datasets
import torch
import transformers
from sentence_transformers import SentenceTransformer
from transformers import ProgressCallback
from trl import ModelConfig, TrlParser, get_peft_config

import grace_st
from grace_st.backbone import resolve_backbone
from grace_st.evaluation.quickeval import format_table, triplet_scores
from grace_st.factory import PROMPTEOL_OPTIONS
from grace_st.scripts.train import run_training
from grace_st.training.config import GraceDataArguments, GraceGRPOConfig
from grace_st.training.contrastive import train_contrastive
from grace_st.training.data import demo_data_path, load_triplets

HERE = os.path.dirname(os.path.abspath(__file__))
TEXTS = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a string instrument.",
    "The central bank raised interest rates by half a point.",
    "Borrowing costs went up after the monetary policy decision.",
]
COLUMNS = ["accuracy", "mrr@10", "finish_rate", "copy_rate", "mean_length", "seconds"]
LOG_FILE = "demo.log"
MARKER = ".grace_demo"
# What a demo run writes into its output folder (a re-run removes these, and nothing else; README.md is the model card
# TRL writes beside the checkpoints).
OUTPUTS = (LOG_FILE, "demo_results.json", "grace-model", "contrastive-model", "contrastive-model.trainer", "README.md")
# Warnings raised inside dependencies, not by our calls: kept in the log file, not shown on the terminal.
# - transformers 5 deprecates `is_gradient_checkpointing`, which TRL's unwrap_model_for_generation and peft read.
DEPENDENCY_WARNINGS = re.compile(r"`is_gradient_checkpointing` is deprecated")

logger = logging.getLogger("grace_demo")


class ProgressBarLogToFile(ProgressCallback):
    """transformers' training progress bar; each log dict goes to the log file (JSON) instead of under the bar."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            logger.info("step %d: %s", state.global_step, json.dumps(logs, default=str))


class _TerminalFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not DEPENDENCY_WARNINGS.search(record.getMessage())


def prepare_output_dir(folder: Path) -> None:
    """Create the output folder, or remove the outputs of an earlier demo run in it.

    Raises:
        SystemExit: the folder holds files and no earlier demo run wrote it (no marker, no demo_results.json).
    """
    if folder.is_file():
        raise SystemExit(f"--output-dir {folder} is a file; choose a folder.")
    if folder.is_dir() and any(folder.iterdir()):
        if not ((folder / MARKER).is_file() or (folder / "demo_results.json").is_file()):
            raise SystemExit(
                f"{folder} exists and holds files that no demo run wrote (no {MARKER}); refusing to write into it. "
                "Choose another folder with --output-dir, or empty it yourself."
            )
        previous = [folder / name for name in OUTPUTS] + sorted(folder.glob("checkpoint-*"))
        for path in previous:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("Written by training/demo.py: a re-run replaces the demo's outputs here.\n")


def setup_logging(log_path: Path) -> None:
    """INFO and up of grace_st and the demo, and warnings of everything, to ``log_path``; warnings to the terminal."""
    to_file = logging.FileHandler(log_path, mode="w", encoding="utf-8")
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.setLevel(logging.WARNING)
    to_terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    to_terminal.addFilter(_TerminalFilter())
    root = logging.getLogger()
    root.handlers[:] = [to_file, to_terminal]
    root.setLevel(logging.WARNING)  # dependencies: warnings only
    for name in ("grace_st", "grace_demo"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.captureWarnings(True)  # Python warnings become log records (py.warnings), filtered as above
    # transformers logs through its own stderr handler: route it through ours instead.
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    # Bars of loading/saving weights and of dataset maps take no time here; the training bar stays.
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def reward_trend(log_history: list[dict]) -> tuple[float, float, int]:
    """Mean total reward of the first and the last quarter of the logged generation batches, and their count."""
    rewards = [entry["reward"] for entry in log_history if "reward" in entry and "grace/total" in entry]
    if not rewards:
        return float("nan"), float("nan"), 0
    quarter = max(1, len(rewards) // 4)
    return statistics.fmean(rewards[:quarter]), statistics.fmean(rewards[-quarter:]), len(rewards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(HERE, "configs", "demo.yaml"))
    parser.add_argument("--output-dir", default=None, help="defaults to the config's output_dir")
    parser.add_argument("--max-train-minutes", type=float, default=None, help="GRACE time cap (config: 30)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--no-contrastive", action="store_true", help="skip the +CL baseline")
    parser.add_argument("--batch-size", type=int, default=32, help="encoding batch size of the evaluation")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads. 1 by default: on a shared 2-core machine, 2 threads per process made generation "
        "~40x slower (thread oversubscription) in our measurements",
    )
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    started = time.perf_counter()

    overrides = []
    if cli.output_dir:
        overrides += ["--output_dir", cli.output_dir]
    if cli.max_train_minutes is not None:
        overrides += ["--max_train_minutes", str(cli.max_train_minutes)]
    if cli.max_steps is not None:
        overrides += ["--max_steps", str(cli.max_steps)]
    training_args, model_args, data_args = TrlParser(
        (GraceGRPOConfig, ModelConfig, GraceDataArguments)
    ).parse_args_and_config(["--config", cli.config, *overrides])
    output_dir = Path(training_args.output_dir)
    prepare_output_dir(output_dir)
    log_path = output_dir / LOG_FILE
    setup_logging(log_path)
    logger.info("config %s, overrides %s", cli.config, overrides)
    print(f"full log: {log_path}")

    backbone = resolve_backbone(model_args.model_name_or_path)  # the config's; "default": the embedded SmolLM2
    inference = {
        "system_prompt": training_args.system_prompt,
        "max_new_tokens": training_args.inference_max_new_tokens or training_args.max_completion_length,
    }
    dev = list(load_triplets(demo_data_path("dev")))
    train = load_triplets(demo_data_path("train"))
    print(f"backbone: {backbone}\ndev: {len(dev)} triplets ({3 * len(dev)} texts); train: {len(train)} triplets\n")

    results: list[tuple[str, dict]] = []

    def score(name: str, model) -> None:
        scores = triplet_scores(model, dev, batch_size=cli.batch_size)
        results.append((name, scores))
        logger.info("%s: %s", name, json.dumps(scores, default=str))
        print(
            f"  {name}: accuracy {scores['accuracy']:.3f}  mrr@10 {scores['mrr@10']:.3f}  ({scores['seconds']:.0f} s)"
        )

    print("[1/3] baselines on the dev set")
    score("no rationale", grace_st.from_backbone(backbone, rationale_mode="none", device="cpu", **inference))
    score("echo", grace_st.from_backbone(backbone, rationale_mode="echo", device="cpu", **inference))
    score("PromptEOL", grace_st.from_backbone(backbone, device="cpu", **PROMPTEOL_OPTIONS))
    score("GRACE untrained", grace_st.from_backbone(backbone, device="cpu", **inference))

    if not cli.no_contrastive:
        print("[2/3] contrastive baseline (+CL): MultipleNegativesRankingLoss, no rationale")
        model = train_contrastive(
            backbone,
            train,
            str(output_dir / "contrastive-model"),
            system_prompt=training_args.system_prompt,
            epochs=1,
            batch_size=16,
            learning_rate=5e-5,
            use_cpu=True,
            peft_config=get_peft_config(model_args),  # the same LoRA adapter GRACE trains
        )
        score("contrastive (+CL)", model)
        del model

    budget = f"budget {training_args.max_train_minutes} min, at most {training_args.max_steps} steps"
    print(f"[3/3] GRACE training (GRPO, {budget})")
    trainer, path = run_training(training_args, model_args, data_args, progress_callback=ProgressBarLogToFile())
    first, last, batches = reward_trend(trainer.state.log_history)
    trained = SentenceTransformer(path, trust_remote_code=True, device="cpu")
    score("GRACE trained", trained)

    print(
        f"\nGRACE: {trainer.state.global_step} GRPO steps ({batches} generated batches); mean total reward, first "
        f"quarter {first:.3f} -> last quarter {last:.3f}"
    )
    if trainer.state.global_step < training_args.max_steps:
        print(
            f"note: the time cap (--max-train-minutes {training_args.max_train_minutes}) stopped training after "
            f"{trainer.state.global_step} of {training_args.max_steps} steps; a shorter run gives other results."
        )
    last_log = next((e for e in reversed(trainer.state.log_history) if "grace/distinct_per_group" in e), {})
    print(
        "last batch: copy rate {:.2f}, distinct rollouts/group {:.2f}, within-group reward std {:.3f}, "
        "finish rate {:.2f}, mean length {:.1f}".format(
            last_log.get("grace/copy_rate", float("nan")),
            last_log.get("grace/distinct_per_group", float("nan")),
            last_log.get("grace/group_reward_std", float("nan")),
            last_log.get("grace/finish_rate", float("nan")),
            last_log.get("grace/mean_length", float("nan")),
        )
    )
    items = trained.encode(TEXTS, output_value=None, show_progress_bar=False)
    print("\nrationales of the trained model, and the cosine similarity of the texts")
    for index, (text, item) in enumerate(zip(TEXTS, items, strict=True)):
        print(f"[{index}] {text}\n    {trained[0].decode_rationale(item)!r}")
    embeddings = torch.stack([torch.as_tensor(item["sentence_embedding"]) for item in items])
    similarity = trained.similarity(embeddings, embeddings)
    print("     " + "".join(f"{j:>7}" for j in range(len(TEXTS))))
    for i, row in enumerate(similarity.tolist()):
        print(f"[{i}]  " + "".join(f"{value:7.3f}" for value in row))

    summary = {
        "results": {name: {k: v for k, v in scores.items() if k != "examples"} for name, scores in results},
        "reward_first_quarter": first,
        "reward_last_quarter": last,
        "grpo_steps": trainer.state.global_step,
        "generated_batches": batches,
        "total_seconds": time.perf_counter() - started,
    }
    results_path = output_dir / "demo_results.json"
    results_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")

    print("\nDev set: bundled demo triplets (grace_st/data/demo_dev.jsonl), held out from training")
    print(format_table(results, COLUMNS), end="")
    print(f"\ntrained model: {path}\nresults: {results_path}; full log: {log_path}")
    print(f"total time {summary['total_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
