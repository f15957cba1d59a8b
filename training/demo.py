"""The README's main job: train GRACE on the embedded default backbone on a CPU and show what it gained.

Usage:
    make demo            # or: .venv/bin/python training/demo.py [--config training/configs/demo.yaml]
                         #        [--max-train-minutes 8] [--no-contrastive] [--output-dir outputs/grace-demo]

Steps (no network needed; the data is bundled in grace_st/data/):
1. scores the cheap baselines on the bundled dev triplets: no rationale, echo (the text repeated as its "rationale"),
   and the untrained GRACE model;
2. trains the "+CL" baseline (same backbone and pooling, MultipleNegativesRankingLoss) on the bundled training set;
3. trains GRACE with GRPO (training/configs/demo.yaml: LoRA, 2 documents x 4 rollouts, 24 steps, a time cap);
4. prints the table (triplet accuracy, MRR@10 over the dev corpus, rationale finish/copy rates), the reward trend and a
   few rationales, and saves the trained model (load it with SentenceTransformer(path, trust_remote_code=True)).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time

import torch
from sentence_transformers import SentenceTransformer
from trl import ModelConfig, TrlParser, get_peft_config

import grace_st
from grace_st.config import GraceDataArguments, GraceGRPOConfig
from grace_st.contrastive import train_contrastive
from grace_st.data import demo_data_path, load_triplets
from grace_st.quickeval import format_table, triplet_scores
from grace_st.trainer import run_training

HERE = os.path.dirname(os.path.abspath(__file__))
TEXTS = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a string instrument.",
    "The central bank raised interest rates by half a point.",
    "Borrowing costs went up after the monetary policy decision.",
]
COLUMNS = ["accuracy", "mrr@10", "finish_rate", "copy_rate", "mean_length", "seconds"]


def reward_trend(log_history: list[dict]) -> tuple[float, float, int]:
    """Mean total reward of the first and the last quarter of the logged training steps, and the step count."""
    rewards = [entry["reward"] for entry in log_history if "reward" in entry and "grace/total" in entry]
    if not rewards:
        return float("nan"), float("nan"), 0
    quarter = max(1, len(rewards) // 4)
    return statistics.fmean(rewards[:quarter]), statistics.fmean(rewards[-quarter:]), len(rewards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(HERE, "configs", "demo.yaml"))
    parser.add_argument("--output-dir", default=None, help="defaults to the config's output_dir")
    parser.add_argument("--max-train-minutes", type=float, default=None, help="GRACE time cap (config: 8)")
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
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
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
    output_dir = training_args.output_dir
    backbone = grace_st.default_backbone()
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
        print(
            f"  {name}: accuracy {scores['accuracy']:.3f}  mrr@10 {scores['mrr@10']:.3f}  ({scores['seconds']:.0f} s)"
        )

    print("[1/3] baselines on the dev set")
    score("no rationale", grace_st.from_backbone(backbone, rationale_mode="none", device="cpu", **inference))
    score("echo", grace_st.from_backbone(backbone, rationale_mode="echo", device="cpu", **inference))
    score("GRACE untrained", grace_st.from_backbone(backbone, device="cpu", **inference))

    if not cli.no_contrastive:
        print("[2/3] contrastive baseline (+CL): MultipleNegativesRankingLoss, no rationale")
        model = train_contrastive(
            backbone,
            train,
            os.path.join(output_dir, "contrastive-model"),
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
    trainer, path = run_training(training_args, model_args, data_args)
    first, last, steps = reward_trend(trainer.state.log_history)
    trained = SentenceTransformer(path, trust_remote_code=True, device="cpu")
    score("GRACE trained", trained)

    print("\nDev set: bundled demo triplets (grace_st/data/demo_dev.jsonl), held out from training")
    print(format_table(results, COLUMNS))
    print(f"\nGRACE: {steps} GRPO steps; mean total reward first quarter {first:.3f} -> last quarter {last:.3f}")
    last_log = next((e for e in reversed(trainer.state.log_history) if "grace/copy_rate" in e), {})
    print(
        "last step: copy rate {:.2f}, distinct rollouts/group {:.2f}, within-group reward std {:.3f}, "
        "finish rate {:.2f}, mean length {:.1f}".format(
            last_log.get("grace/copy_rate", float("nan")),
            last_log.get("grace/distinct_per_group", float("nan")),
            last_log.get("grace/group_reward_std", float("nan")),
            last_log.get("grace/finish_rate", float("nan")),
            last_log.get("grace/mean_length", float("nan")),
        )
    )
    items = trained.encode(TEXTS, output_value=None)
    print("\nrationales of the trained model")
    for index, (text, item) in enumerate(zip(TEXTS, items, strict=True)):
        print(f"[{index}] {text}\n    {trained[0].decode_rationale(item)!r}")
    embeddings = trained.encode(TEXTS, convert_to_tensor=True)
    similarity = trained.similarity(embeddings, embeddings)
    print("cosine similarity\n     " + "".join(f"{j:>7}" for j in range(len(TEXTS))))
    for i, row in enumerate(similarity.tolist()):
        print(f"[{i}]  " + "".join(f"{value:7.3f}" for value in row))

    summary = {
        "results": {name: {k: v for k, v in scores.items() if k != "examples"} for name, scores in results},
        "reward_first_quarter": first,
        "reward_last_quarter": last,
        "grpo_steps": steps,
        "total_seconds": time.perf_counter() - started,
    }
    with open(os.path.join(output_dir, "demo_results.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    print(f"\nsaved the trained model to {path}; results in {output_dir}/demo_results.json")
    print(f"total time {summary['total_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
