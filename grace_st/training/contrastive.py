"""The "+CL" baseline of the paper: the same backbone and GRACE prompt/pooling, trained with a contrastive loss.

The model is a GRACE SentenceTransformer with ``rationale_mode="none"`` (embedding = mean of the last-layer states over
the user text inside the GRACE chat prompt), fine-tuned with sentence-transformers' ``MultipleNegativesRankingLoss``
on (query, positive, negative) rows: in-batch negatives plus the hard negative.

For an equal-budget comparison with a GRACE run (issue 14), ``max_minutes`` stops training at the first step past the
same wall-clock budget GRACE's ``max_train_minutes`` uses (the same callback), ``peft_config`` trains the same LoRA
adapter, and the minutes and steps actually used are saved beside the model
(:data:`grace_st.artifacts.CL_TRAINING_RECORD`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from transformers import PrinterCallback

from grace_st.artifacts import CL_TRAINING_RECORD
from grace_st.backbone import resolve_backbone
from grace_st.factory import from_backbone
from grace_st.training.callbacks import LogsToLogger, TimeBudget

logger = logging.getLogger(__name__)


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    """A peft config dict for JSON: sets (``target_modules``) become sorted lists."""
    return {key: sorted(value) if isinstance(value, (set, frozenset)) else value for key, value in config.items()}


def train_contrastive(
    backbone: str,
    train_dataset,
    output_dir: str,
    *,
    system_prompt: str | None = None,
    pooling_mode: str = "mean",
    epochs: float = 1.0,
    batch_size: int = 16,
    learning_rate: float = 2e-5,
    max_steps: int = -1,
    scale: float = 20.0,
    seed: int = 42,
    use_cpu: bool | None = None,
    peft_config=None,
    max_minutes: float | None = None,
    budget_clock: str = "wall",
    record: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> SentenceTransformer:
    """Fine-tune ``[Transformer(rationale_mode="none"), RationalePooling, Normalize]`` with MNRL and save it.

    Args:
        backbone: causal LM folder or Hub id, or ``"default"`` (:func:`grace_st.resolve_backbone`).
        train_dataset: ``datasets.Dataset`` with columns ``query``, ``positive``, ``negative`` (e.g. from
            :func:`grace_st.training.data.load_triplets`); an empty ``negative`` column is dropped (in-batch negatives
            only).
        output_dir: where the trained model (a GRACE SentenceTransformer folder) is saved.
        system_prompt: GRACE system prompt; None keeps the default (the paper's).
        pooling_mode: ``"mean"`` or ``"lasttoken"``. Defaults to ``"mean"``.
        epochs: training epochs. Defaults to 1.
        batch_size: rows per batch (in-batch negatives). Defaults to 16.
        learning_rate: AdamW learning rate. Defaults to 2e-5.
        max_steps: stop after this many steps (-1: run the epochs). Defaults to -1.
        scale: MNRL similarity scale (inverse temperature). Defaults to 20.
        seed: random seed. Defaults to 42.
        use_cpu: force CPU; None trains where sentence-transformers picks.
        peft_config: a ``peft.LoraConfig`` to train an adapter (merged into the saved model) instead of all weights,
            e.g. the same adapter GRACE trains, for a like-for-like comparison.
        max_minutes: budget in minutes, checked after each step (training stops at the first step past it;
            :class:`grace_st.training.callbacks.TimeBudget`); None: no budget. Give enough ``epochs`` for the budget
            to be the
            limit. With a budget the learning rate is constant (no warmup: the step count is not known).
        budget_clock: ``"wall"`` or ``"cpu"`` (this process's CPU time: equal budgets on a shared machine).
            Defaults to ``"wall"``.
        record: extra facts to save in :data:`grace_st.artifacts.CL_TRAINING_RECORD` (e.g. the GRACE config the budget
        comes from).
        options: further :class:`grace_st.Transformer` options (``prompt_template``, ``summary_suffix``,
            ``max_input_tokens``...), e.g. those of the GRACE run, so a summary readout trains the same readout;
            ``rationale_mode`` is always ``"none"``.

    Returns:
        The trained ``SentenceTransformer`` (also saved to ``output_dir``).

    Raises:
        ValueError: ``max_minutes`` is not a number > 0.
    """
    try:
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError as error:  # pragma: no cover - depends on the installed extras
        raise ImportError('Contrastive training needs the train extra: pip install "grace-st[train]"') from error

    if max_minutes is not None and (
        isinstance(max_minutes, bool) or not isinstance(max_minutes, (int, float)) or not max_minutes > 0
    ):
        raise ValueError(f"max_minutes={max_minutes!r} is not allowed; use a number > 0 or None (no budget).")
    if options and "rationale_mode" in options:
        raise ValueError(f"options={options!r}: the +CL baseline has no rationale; leave rationale_mode out.")
    module_options = {**(options or {}), "rationale_mode": "none"}
    if system_prompt is not None:
        module_options["system_prompt"] = system_prompt
    device = "cpu" if use_cpu else None
    model = from_backbone(resolve_backbone(backbone), pooling_mode=pooling_mode, device=device, **module_options)
    transformer = model[0]
    if peft_config is not None:
        from peft import get_peft_model

        transformer.model = get_peft_model(transformer.model, peft_config)
    columns = ["query", "positive", "negative"]
    if "negative" in train_dataset.column_names and not all(train_dataset["negative"]):
        columns = ["query", "positive"]
    dataset = train_dataset.select_columns(columns)
    args = SentenceTransformerTrainingArguments(
        output_dir=output_dir + ".trainer",
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        # A time budget cannot know its step count: a constant rate, as the GRACE recipes use; else 10 % warmup.
        warmup_steps=0 if max_minutes is not None else 0.1,  # a float is a ratio of the total steps
        lr_scheduler_type="constant" if max_minutes is not None else "linear",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        seed=seed,
        use_cpu=bool(use_cpu),
        bf16=False,
        disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=MultipleNegativesRankingLoss(model, scale=scale)
    )
    # transformers prints every log dict to stdout (PrinterCallback, as disable_tqdm=True); a library logs instead.
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(LogsToLogger(logger))
    if max_minutes is not None:
        trainer.add_callback(TimeBudget(max_minutes, clock=budget_clock))
    started, cpu_started = time.monotonic(), time.process_time()
    trainer.train()
    minutes, cpu_minutes = (time.monotonic() - started) / 60, (time.process_time() - cpu_started) / 60
    if peft_config is not None:
        transformer.model = transformer.model.merge_and_unload()
    model.save(output_dir)
    facts = {
        **(record or {}),
        "max_minutes": max_minutes,
        "budget_clock": budget_clock,
        "minutes": minutes,
        "cpu_minutes": cpu_minutes,
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "epochs": trainer.state.epoch,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "pooling_mode": pooling_mode,
        "options": module_options,
        "peft_config": None if peft_config is None else _jsonable(peft_config.to_dict()),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    with open(os.path.join(output_dir, CL_TRAINING_RECORD), "w", encoding="utf-8") as handle:
        json.dump(facts, handle, indent=2, default=str)
    logger.info(
        "Saved the contrastive baseline to %s (%d steps in %.1f min, budget %s).",
        output_dir,
        trainer.state.global_step,
        minutes,
        max_minutes,
    )
    return model
