"""Training-step benchmark: one GRACE GRPO step / one plain TRL GRPO step with a constant reward.

Usage:
    .venv/bin/python benchmarks/train_step.py [--config training/configs/demo.yaml] [--steps 7] [--warmup 1]
        [--repeats 2] [--learning-rate 0]

Both trainers get the same model (the config's backbone and LoRA adapter), the same GRPO settings (batch, group size,
completion limit, temperature, KL coefficient, loss) and the same prompts: the bundled demo documents rendered with
the GRACE chat prompt (system prompt + document), so prompt tokens are identical. The TRL baseline's reward is the
constant 0; GRACE's reward writes the query and hard-negative rationales and embeds every rollout. Each run is a fresh
child process; runs alternate (GRACE, TRL, GRACE, TRL, ...) so a shared CPU slows both alike.

Printed, measured in this run:
  (d) mean seconds per optimisation step of GRACE / of TRL (steps after --warmup, whole generation cycles when
      num_iterations > 1), with the mean number of rollout tokens per generation of each (sampling makes rollout
      lengths differ; --learning-rate 0, the default, keeps the policy fixed so both sample from the same model),
  (e) peak RSS of each run.
Only the standard library and the project (with its training extra) are used.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(kind: str, config_path: str, steps: int, learning_rate: float) -> None:
    """Train ``steps`` steps with ``kind`` ("grace" or "trl") in this process; print per-step times as JSON."""
    import dataclasses

    import torch
    import yaml
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, ModelConfig, get_peft_config

    from grace_st.backbone import resolve_backbone
    from grace_st.training.config import GraceGRPOConfig
    from grace_st.training.data import demo_data_path, load_triplets, to_grpo_dataset
    from grace_st.training.trainer import GraceGRPOTrainer

    torch.set_num_threads(1)
    options = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    workdir = tempfile.TemporaryDirectory(prefix=f"grace-train-step-{kind}-")  # nothing is saved; removed at the end
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    grace_fields = {f.name for f in dataclasses.fields(GraceGRPOConfig)}
    trl_fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    model_args = ModelConfig(**{k: v for k, v in options.items() if k in model_fields})
    common = {k: v for k, v in options.items() if k in grace_fields}
    common.update(
        output_dir=workdir.name,
        max_steps=steps,
        learning_rate=learning_rate,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        max_train_minutes=None,
    )
    backbone = resolve_backbone(model_args.model_name_or_path)
    triplets = load_triplets(demo_data_path("train"))
    if kind == "grace":
        args = GraceGRPOConfig(**common)
        dataset = to_grpo_dataset(triplets, "supervised")
        trainer_cls, extra = GraceGRPOTrainer, {}
    else:
        system_prompt = common.get("system_prompt") or GraceGRPOConfig.system_prompt
        args = GRPOConfig(**{k: v for k, v in common.items() if k in trl_fields})
        dataset = triplets.map(
            lambda row: {"prompt": [{"role": "system", "content": system_prompt}, {"role": "user", "content": row}]},
            input_columns="positive",
            remove_columns=triplets.column_names,
        )

        def constant_reward(completions, **kwargs):
            return [0.0] * len(completions)

        trainer_cls, extra = GRPOTrainer, {"reward_funcs": [constant_reward]}

    times: list[float] = []
    tokens: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                tokens.append(logs["completions/mean_length"] * args.per_device_train_batch_size)

    model_init_kwargs = {"dtype": model_args.dtype} if model_args.dtype not in (None, "auto") else {}
    args.model_init_kwargs = model_init_kwargs
    trainer = trainer_cls(
        model=backbone,
        args=args,
        train_dataset=dataset,
        peft_config=get_peft_config(model_args),
        callbacks=[StepTimer()],
        **extra,
    )
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workdir.cleanup()
    print(json.dumps({"kind": kind, "times": times, "tokens": tokens, "peak_rss_mib": peak}))


def prompt_tokens_match(config_path: str) -> bool:
    """True when TRL's rendering of (system, document) equals the GRACE prompt of the same document."""
    import yaml
    from transformers import AutoTokenizer

    import grace_st
    from grace_st.backbone import resolve_backbone
    from grace_st.training.config import GraceGRPOConfig
    from grace_st.training.data import demo_data_path, load_triplets

    options = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    system_prompt = options.get("system_prompt") or GraceGRPOConfig.system_prompt
    backbone = resolve_backbone(options.get("model_name_or_path"))
    document = load_triplets(demo_data_path("train"))["positive"][0]
    model = grace_st.from_backbone(backbone, system_prompt=system_prompt, device="cpu")
    features = model[0].preprocess([document])
    grace_ids = features["input_ids"][0][features["attention_mask"][0].bool()].tolist()
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": document}]
    trl_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(trl_ids) == grace_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "training" / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=0.0)
    parser.add_argument("--child", choices=["grace", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.config, args.steps, args.learning_rate)
        return
    if args.warmup >= args.steps:
        raise SystemExit(f"--warmup {args.warmup} must be smaller than --steps {args.steps}.")
    import yaml

    iterations = int(yaml.safe_load(Path(args.config).read_text(encoding="utf-8")).get("num_iterations", 1))
    if (args.steps - args.warmup) % iterations:
        # With num_iterations > 1 only every num_iterations-th step generates: measure whole cycles.
        raise SystemExit(
            f"--steps {args.steps} - --warmup {args.warmup} must be a multiple of num_iterations={iterations}."
        )

    same_prompts = prompt_tokens_match(args.config)
    runs: dict[str, list[dict]] = {"grace": [], "trl": []}
    for _ in range(args.repeats):
        for kind in ("grace", "trl"):
            command = [sys.executable, __file__, "--child", kind, "--config", args.config, "--steps", str(args.steps)]
            command += ["--learning-rate", str(args.learning_rate)]
            out = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
            if out.returncode != 0:
                raise SystemExit(f"{kind} run failed:\n{out.stderr[-4000:]}")
            runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def per_step(kind: str) -> float:
        return statistics.fmean(t for run in runs[kind] for t in run["times"][args.warmup :])

    def median_step(kind: str) -> float:
        return statistics.median(t for run in runs[kind] for t in run["times"][args.warmup :])

    def tokens(kind: str) -> float:
        return statistics.fmean(t for run in runs[kind] for t in run["tokens"])

    def peak(kind: str) -> float:
        return max(run["peak_rss_mib"] for run in runs[kind])

    grace, trl = per_step("grace"), per_step("trl")
    measured = (args.steps - args.warmup) * args.repeats
    print(
        f"config {Path(args.config).name}, {measured} measured steps of each (after {args.warmup} warm-up per run), "
        f"learning rate {args.learning_rate}, 1 CPU thread; identical prompt tokens: {same_prompts}"
    )
    from grace_st.tables import markdown_table

    g_med, t_med = median_step("grace"), median_step("trl")
    # Sampling makes rollout lengths differ between the two runs: the ratio is per rollout token.
    g_tok, t_tok = 1000 * grace / tokens("grace"), 1000 * trl / tokens("trl")
    rows = [
        ["(d) seconds per step (mean)", f"{grace:.2f}", f"{trl:.2f}", f"{grace / trl:.3f}", ""],
        ["(d) seconds per step (median)", f"{g_med:.2f}", f"{t_med:.2f}", f"{g_med / t_med:.3f}", ""],
        ["rollout tokens per generation", f"{tokens('grace'):.0f}", f"{tokens('trl'):.0f}", "", ""],
        ["(d) ms per step per rollout token (mean)", f"{g_tok:.1f}", f"{t_tok:.1f}", f"{g_tok / t_tok:.3f}", "<= 1.0"],
        ["(e) peak RSS (MiB)", f"{peak('grace'):.0f}", f"{peak('trl'):.0f}", f"{peak('grace') / peak('trl'):.3f}", ""],
    ]
    print(markdown_table(["measure", "GRACE", "TRL, constant reward", "ratio", "target"], rows), end="")


if __name__ == "__main__":
    main()
