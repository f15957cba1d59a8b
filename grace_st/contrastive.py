"""The "+CL" baseline of the paper: the same backbone and GRACE prompt/pooling, trained with a contrastive loss.

The model is a GRACE SentenceTransformer with ``rationale_mode="none"`` (embedding = mean of the last-layer states over
the user text inside the GRACE chat prompt), fine-tuned with sentence-transformers' ``MultipleNegativesRankingLoss``
on (query, positive, negative) rows: in-batch negatives plus the hard negative.
"""

from __future__ import annotations

import json
import logging

from sentence_transformers import SentenceTransformer
from transformers import PrinterCallback, TrainerCallback

from grace_st.backbone import resolve_backbone
from grace_st.factory import from_backbone

logger = logging.getLogger(__name__)


class _LogToLogger(TrainerCallback):
    """Sends each training log dict to this module's logger (INFO, as JSON) instead of printing it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            logger.info("step %d: %s", state.global_step, json.dumps(logs, default=str))


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
) -> SentenceTransformer:
    """Fine-tune ``[Transformer(rationale_mode="none"), RationalePooling, Normalize]`` with MNRL and save it.

    Args:
        backbone: causal LM folder or Hub id, or ``"default"`` (:func:`grace_st.resolve_backbone`).
        train_dataset: ``datasets.Dataset`` with columns ``query``, ``positive``, ``negative`` (e.g. from
            :func:`grace_st.data.load_triplets`); an empty ``negative`` column is dropped (in-batch negatives only).
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

    Returns:
        The trained ``SentenceTransformer`` (also saved to ``output_dir``).
    """
    try:
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError as error:  # pragma: no cover - depends on the installed extras
        raise ImportError('Contrastive training needs the train extra: pip install "grace-st[train]"') from error

    options = {"rationale_mode": "none"}
    if system_prompt is not None:
        options["system_prompt"] = system_prompt
    device = "cpu" if use_cpu else None
    model = from_backbone(resolve_backbone(backbone), pooling_mode=pooling_mode, device=device, **options)
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
        warmup_steps=0.1,  # a float is a ratio of the total steps
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
    trainer.add_callback(_LogToLogger())
    trainer.train()
    if peft_config is not None:
        transformer.model = transformer.model.merge_and_unload()
    model.save(output_dir)
    logger.info("Saved the contrastive baseline to %s", output_dir)
    return model
