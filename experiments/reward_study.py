"""Reward forms at equal CPU budgets: train every row of the comparison, two seeds each, then one dev-set table.

Rows trained from ``training/configs/trecqa.yaml`` (TrecQA triplets, summary readout), each for the same CPU minutes
(``budget_clock: cpu``, so runs sharing the machine get equal budgets):

- ``+CL``: the same backbone, prompt, readout and LoRA adapter with MultipleNegativesRankingLoss
  (``training/train_contrastive.py``);
- ``GRACE paper``: the published reward (``reward_form: paper``);
- ``GRACE InfoNCE``: the per-rollout reward (``reward_form: infonce``);
- ``GRACE InfoNCE + query rollouts``: the same, with queries rolled out too (the recipe);
- ``GRACE InfoNCE + query rollouts, light guards``: the same without the truncation penalty and with copy penalty 0.1,
  so that the contrastive term leads the advantage.

Then ``eval/compare_dev.py`` scores them with PromptEOL and untrained GRACE on the five STS dev sets and TrecQA dev,
each trained GRACE row also with its rationale removed, with bootstrap intervals (``<out>/compare/comparison.md``).

Usage:
    OMP_NUM_THREADS=1 python experiments/reward_study.py --out runs/reward-study           # everything
    OMP_NUM_THREADS=1 python experiments/reward_study.py --out runs/reward-study --train-only
    OMP_NUM_THREADS=1 python experiments/reward_study.py --out runs/reward-study --compare-only

A run whose model folder is complete is not trained again (delete its folder to retrain it); each run's log is
``<out>/<run>.log``. ``--parallel`` runs train side by side (one torch thread each).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "training" / "configs" / "trecqa.yaml"
# What every row starts from, on top of the recipe (the recipe itself may move on to the best configuration): the
# summary readout, GRPO alone, the recipe's first guards and its first rationale length. +CL reads its readout from
# here too.
STUDY_BASE: dict[str, str] = {
    "pooling_mode": "summary",
    "save_pooling_mode": "null",
    "embedding_loss_weight": "0.0",
    "truncation_penalty": "-1.0",
    "copy_penalty": "0.5",
    "num_generations": "4",
    "max_completion_length": "40",
    "inference_max_new_tokens": "40",
}
# label -> the settings it replaces (None: the +CL baseline of training/train_contrastive.py)
CONFIGURATIONS: dict[str, dict[str, str] | None] = {
    "+CL": None,
    "GRACE paper": {"reward_form": "paper", "query_rollouts": "false"},
    "GRACE InfoNCE": {"reward_form": "infonce", "query_rollouts": "false"},
    "GRACE InfoNCE + query rollouts": {"reward_form": "infonce", "query_rollouts": "true"},
    # The runs above log ~70-100% of the advantage's variance to the truncation penalty (a fixed -1 for a rationale
    # cut at the limit) and most of the rest to the copy penalty: the contrastive term hardly teaches. Here it leads.
    "GRACE InfoNCE + query rollouts, light guards": {
        "reward_form": "infonce",
        "query_rollouts": "true",
        "truncation_penalty": "null",
        "copy_penalty": "0.1",
    },
    # GRPO teaches which rationale to write; nothing teaches the readout to read one (removing the rationale raised
    # every row above). Here an InfoNCE loss on the text + rationale embeddings, with gradients, trains the readout
    # on the rationales the policy writes (the +CL update, with rationales).
    "GRACE InfoNCE + query rollouts + embedding loss": {
        "reward_form": "infonce",
        "query_rollouts": "true",
        "embedding_loss_weight": "1.0",
    },
    # The same with the readout that sums the unit summary state and the unit mean over text + rationale: the mean
    # part depends on the rationale, so removing it is not free.
    "GRACE InfoNCE + query rollouts + embedding loss, mean+summary readout": {
        "reward_form": "infonce",
        "query_rollouts": "true",
        "embedding_loss_weight": "1.0",
        "pooling_mode": "mean+summary",
    },
    # The same with three times the embedding loss's weight: does more training of the readout close the STS gap?
    "GRACE InfoNCE + query rollouts + embedding loss x3, mean+summary readout": {
        "reward_form": "infonce",
        "query_rollouts": "true",
        "embedding_loss_weight": "3.0",
        "pooling_mode": "mean+summary",
    },
    # The mean+summary readout with the summary state of the text alone added (the summary suffix fed right after the
    # text, no rationale before it): the PromptEOL-like state that is strong on STS stays in the embedding, the two
    # parts after the rationale add what the rationale says (first measured on the embedding-loss models above).
    "GRACE InfoNCE + query rollouts + embedding loss, mean+summary+text_summary readout": {
        "reward_form": "infonce",
        "query_rollouts": "true",
        "embedding_loss_weight": "1.0",
        "pooling_mode": "mean+summary+text_summary",
    },
    # Trained as "+ embedding loss" (the summary readout: no extra forward pass per step, so more steps in the same CPU
    # minutes), saved with the mean+summary+text_summary readout.
    "GRACE InfoNCE + query rollouts + embedding loss, saved as mean+summary+text_summary": {
        "reward_form": "infonce",
        "query_rollouts": "true",
        "embedding_loss_weight": "1.0",
        "save_pooling_mode": "mean+summary+text_summary",
    },
    # The same with 2 rollouts per group instead of 4: a step of 8 rollouts then holds 4 groups, not 2 (the saved row
    # above: 19-20 steps x 2 groups = 38-40 training triplets in 12 CPU minutes, +CL 11-15 steps x 16), and the
    # embedding loss twice the in-batch candidates; GRPO's group baseline gets noisier. Measured: 15 steps (more side
    # rationales per step), 60 triplets.
    "GRACE InfoNCE + query rollouts + embedding loss, 2 rollouts per group, saved as mean+summary+text_summary": {
        "reward_form": "infonce",
        "query_rollouts": "true",
        "embedding_loss_weight": "1.0",
        "save_pooling_mode": "mean+summary+text_summary",
        "num_generations": "2",
    },
    # The same with rationales of at most 24 tokens instead of 40 (training and inference) and no truncation penalty
    # (most rationales end near 25 tokens; a cut one is still embedded): generation dominates a step's CPU time, so
    # the same minutes see more triplets, and a shorter rationale adds less noise to the symmetric STS pairs.
    "GRACE InfoNCE + query rollouts + embedding loss, 2 rollouts per group, 24-token rationales, saved as "
    "mean+summary+text_summary": {
        "reward_form": "infonce",
        "query_rollouts": "true",
        "embedding_loss_weight": "1.0",
        "save_pooling_mode": "mean+summary+text_summary",
        "num_generations": "2",
        "max_completion_length": "24",
        "inference_max_new_tokens": "24",
        "truncation_penalty": "null",
    },
    # Shorter still: 16 tokens.
    "GRACE InfoNCE + query rollouts + embedding loss, 2 rollouts per group, 16-token rationales, saved as "
    "mean+summary+text_summary": {
        "reward_form": "infonce",
        "query_rollouts": "true",
        "embedding_loss_weight": "1.0",
        "save_pooling_mode": "mean+summary+text_summary",
        "num_generations": "2",
        "max_completion_length": "16",
        "inference_max_new_tokens": "16",
        "truncation_penalty": "null",
    },
    # 24 tokens without the KL term (beta 0: no reference forward pass per step, so more steps in the same minutes).
    "GRACE InfoNCE + query rollouts + embedding loss, 2 rollouts per group, 24-token rationales, no KL, saved as "
    "mean+summary+text_summary": {
        "reward_form": "infonce",
        "query_rollouts": "true",
        "embedding_loss_weight": "1.0",
        "save_pooling_mode": "mean+summary+text_summary",
        "num_generations": "2",
        "max_completion_length": "24",
        "inference_max_new_tokens": "24",
        "truncation_penalty": "null",
        "beta": "0.0",
    },
    # And without the truncation penalty, copy penalty 0.1: the contrastive term leads the advantage.
    "GRACE InfoNCE + query rollouts + embedding loss, mean+summary readout, light guards": {
        "reward_form": "infonce",
        "query_rollouts": "true",
        "embedding_loss_weight": "1.0",
        "pooling_mode": "mean+summary",
        "truncation_penalty": "null",
        "copy_penalty": "0.1",
    },
}


# The +CL run's activations vary in size from batch to batch; glibc kept the freed blocks and its RSS grew to 17 GB
# (the second seed was killed for memory on a 24 GB machine). Large blocks through mmap go back to the OS when freed
# (RSS then 1-7 GB); the numbers computed are the same.
CL_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def run_name(label: str, seed: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower().replace("+", " plus ")).strip("-")
    return f"{slug}-seed{seed}"


def model_folder(out: Path, label: str, seed: int) -> Path:
    """Where a run's SentenceTransformer lands (a GRACE run writes it to <run>/grace-model, +CL to <run>)."""
    run = out / run_name(label, seed)
    return run if CONFIGURATIONS[label] is None else run / "grace-model"


def run_config(out: Path, label: str, seed: int, minutes: float) -> Path:
    """The recipe with the seed, the budget, :data:`STUDY_BASE` and the configuration's settings replaced (the +CL
    script reads the seed, the data and the readout from it)."""
    settings = {"seed": str(seed), "max_train_minutes": str(minutes), **STUDY_BASE, **(CONFIGURATIONS[label] or {})}
    lines = []
    for line in RECIPE.read_text(encoding="utf-8").splitlines():
        key = line.split(":", 1)[0]
        lines.append(f"{key}: {settings.pop(key)}" if key in settings else line)
    if settings:
        raise ValueError(f"{RECIPE} has no line for {sorted(settings)}; add them to the recipe.")
    path = out / "configs" / f"{run_name(label, seed)}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_command(out: Path, label: str, seed: int, minutes: float) -> list[str]:
    config = str(run_config(out, label, seed, minutes))
    run = str(out / run_name(label, seed))
    if CONFIGURATIONS[label] is None:
        script = str(ROOT / "training" / "train_contrastive.py")
        return [sys.executable, script, "--grace_config", config, "--output_dir", run, "--epochs", "100",
                "--learning_rate", "5e-5", "--budget_clock", "cpu"]  # fmt: skip
    return [sys.executable, str(ROOT / "training" / "train.py"), "--config", config, "--output_dir", run]


def train(out: Path, label: str, seed: int, minutes: float) -> tuple[str, float, int]:
    folder = model_folder(out, label, seed)
    if (folder / "modules.json").is_file():
        print(f"{run_name(label, seed)}: already trained ({folder}); skipped", flush=True)
        return run_name(label, seed), 0.0, 0
    log = out / f"{run_name(label, seed)}.log"
    started = time.perf_counter()
    print(f"{run_name(label, seed)}: training ({minutes} CPU min), log {log}", flush=True)
    with open(log, "w", encoding="utf-8") as handle:
        code = subprocess.call(
            train_command(out, label, seed, minutes),
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(CL_ENV if CONFIGURATIONS[label] is None else {})},
            cwd=ROOT,
        )
    minutes_taken = (time.perf_counter() - started) / 60
    print(f"{run_name(label, seed)}: exit {code} after {minutes_taken:.1f} min wall", flush=True)
    return run_name(label, seed), minutes_taken, code


# Rows of the table besides the trained ones (the recipe's readout is summary; the mean readout shares its generation).
BASE_ROWS = ("PromptEOL", "untrained GRACE (mean)", "untrained GRACE (summary)")


def saved_readout(settings: dict[str, str] | None) -> str:
    """The readout a configuration's model is saved with (``save_pooling_mode``, else ``pooling_mode``)."""
    merged = {**STUDY_BASE, **(settings or {})}
    return merged["pooling_mode"] if merged["save_pooling_mode"] == "null" else merged["save_pooling_mode"]


def untrained_rows() -> list[str]:
    """The untrained rows: mean and summary, and each further readout a configuration saves (compare_dev adds those
    with ``--trained-readout saved``)."""
    readouts = [saved_readout(settings) for settings in CONFIGURATIONS.values() if settings]
    extra = [f"untrained GRACE ({r})" for r in dict.fromkeys(readouts) if r not in ("mean", "summary")]
    return [*BASE_ROWS[1:], *extra]


def compare_flags(out: Path, seeds: list[int], limit: int) -> list[str]:
    flags = ["--out", str(out / "compare"), "--limit", str(limit), "--trained-readout", "saved"]
    for label in CONFIGURATIONS:
        for seed in seeds:
            flag = "--contrastive" if CONFIGURATIONS[label] is None else "--trained"
            flags += [flag, f"{label}, seed {seed}={model_folder(out, label, seed)}"]
    return flags


def row_shares(seeds: list[int], processes: int, done: Path | None = None) -> list[list[str]]:
    """The table's rows split over ``processes`` by their expected cost (a row that writes rationales costs about three
    rows that do not); the untrained rows stay together (they share one generation). With ``done`` (the row-file
    folder), rows that already have a file cost nothing (compare_dev still checks that the file is current)."""
    from grace_st.evaluation.dev_comparison import row_file

    jobs: list[tuple[float, list[str]]] = [(1.0, ["PromptEOL"]), (4.0, untrained_rows())]
    for label, settings in CONFIGURATIONS.items():
        for seed in seeds:
            name = f"{label}, seed {seed}"
            jobs += [(1.5, [name])] if settings is None else [(4.0, [name]), (1.5, [f"{name}, rationale removed"])]
    if done is not None:
        jobs = [(0.0 if all(row_file(done, row).is_file() for row in rows) else cost, rows) for cost, rows in jobs]
    shares: list[tuple[float, list[str]]] = [(0.0, []) for _ in range(processes)]
    for cost, rows in sorted(jobs, key=lambda job: -job[0]):
        load, share = min(shares, key=lambda item: item[0])
        shares[shares.index((load, share))] = (load + cost, share + rows)
    return [share for _, share in shares if share]


def compare(out: Path, seeds: list[int], limit: int, processes: int, general: bool) -> None:
    """Score the rows in ``processes`` processes (each fills the row files), then assemble the one table."""
    script, flags = [sys.executable, str(ROOT / "eval" / "compare_dev.py")], compare_flags(out, seeds, limit)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = [row for share in row_shares(seeds, 1) for row in share]
    if processes > 1:
        workers = [
            subprocess.Popen([*script, *flags, "--only-row-files", "--rows", *share], cwd=ROOT, env=env)
            for share in row_shares(seeds, processes, done=out / "compare" / "rows")
        ]
        if any(worker.wait() for worker in workers):
            sys.exit("A scoring process failed; its output is above.")
    subprocess.check_call(
        [*script, *flags, "--overwrite", "--rows", *rows, *(["--general"] if general else [])], cwd=ROOT, env=env
    )


def reward_terms_table(out: Path, seeds: list[int]) -> str:
    """Which terms taught in each GRACE run: every term's share of the advantage's variance and its within-group std
    (run averages from the training records, :func:`grace_st.training.rewards.term_statistics`), with the steps run."""
    from grace_st.artifacts import TRAINING_INFO_FILE
    from grace_st.readers import read_json
    from grace_st.tables import markdown_table

    records = {}
    for label, settings in CONFIGURATIONS.items():
        for seed in seeds:
            path = model_folder(out, label, seed) / TRAINING_INFO_FILE
            if settings is not None and path.is_file():
                records[f"{label}, seed {seed}"] = read_json(path)
    terms = list(dict.fromkeys(term for record in records.values() for term in record.get("reward_terms", {})))
    rows = []
    for name, record in records.items():
        stats = record.get("reward_terms", {})
        cells = []
        for term in terms:
            share, std = (
                (stats.get(term) or {}).get("advantage_share"),
                (stats.get(term) or {}).get("within_group_std"),
            )
            cells.append(None if share is None else f"{share:+.2f}" + ("" if std is None else f" ({std:.4f})"))
        rows.append([name, record.get("global_step"), *cells])
    header = ["run", "steps", *(f"{term}: share (std)" for term in terms)]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/reward-study", help="Output folder. Default: runs/reward-study.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="Seeds of every row. Default: 1 2.")
    parser.add_argument("--minutes", type=float, default=12.0, help="CPU minutes per run. Default: 12.")
    parser.add_argument(
        "--parallel", type=int, default=2, help="Runs trained (and processes scoring) side by side. Default: 2."
    )
    parser.add_argument("--limit", type=int, default=50, help="STS pairs per dev set. Default: 50.")
    parser.add_argument("--rows", nargs="+", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS))
    parser.add_argument("--general", action="store_true", help="Also the general-ability check (compare_dev).")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--compare-only", action="store_true")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.parallel < 1 or args.limit < 1:
        parser.error(f"--minutes ({args.minutes}) must be > 0, --parallel ({args.parallel}) and --limit >= 1.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.compare_only:
        jobs = [(label, seed) for seed in args.seeds for label in args.rows]
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            results = list(pool.map(lambda job: train(out, job[0], job[1], args.minutes), jobs))
        failed = [name for name, _, code in results if code]
        if failed:
            sys.exit(f"Training failed for {failed}; see their logs in {out}.")
    table = reward_terms_table(out, args.seeds)
    (out / "reward_terms.md").write_text(table, encoding="utf-8")
    print("Which reward terms taught (share of the advantage's variance, within-group std):\n\n" + table, flush=True)
    if not args.train_only:
        compare(out, args.seeds, args.limit, args.parallel, args.general)


if __name__ == "__main__":
    main()
