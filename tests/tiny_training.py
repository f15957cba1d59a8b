"""Settings of the tiny GRACE training runs on CPU (two rollouts, no saving, no reporting), shared by the trainer tests
and the two-process helper."""

from __future__ import annotations

TINY_CPU_SETTINGS = dict(
    num_generations=2,
    report_to="none",
    save_strategy="no",
    bf16=False,
    use_cpu=True,
    gradient_checkpointing=False,
    truncation_penalty=None,  # random tiny models rarely stop: keep the reward informative
    disable_tqdm=True,
)
