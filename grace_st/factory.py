"""Build a GRACE SentenceTransformer from any instruction-tuned causal LM."""

from __future__ import annotations

from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize

from grace_st.model import RationalePooling, Transformer, load_backbone
from grace_st.model.options import TRANSFORMER_RULES

# PromptEOL (Jiang et al., 2023): no chat template, no rationale, the last prompt token's state.
PROMPTEOL_TEMPLATE = 'This sentence : "{text}" means in one word:"'
# The summary readout's suffix measured best on the default backbone: after the rationale, the text again in the
# PromptEOL question; the state of its last token is the summary embedding.
SUMMARY_SUFFIX = '\nThis sentence : "{text}" means in one word:"'

# PromptEOL (Jiang et al., 2023) as options of the same modules: the raw prompt (no chat template), no rationale, the
# state of its last token. ``from_backbone(backbone, **PROMPTEOL_OPTIONS)``.
PROMPTEOL_OPTIONS: dict[str, Any] = {
    "rationale_mode": "none",
    "chat_template": False,
    "system_prompt": "",
    "prompt_template": PROMPTEOL_TEMPLATE,
    "pooling_mode": "lasttoken",
}

_TRANSFORMER_OPTIONS = list(TRANSFORMER_RULES)


def from_backbone(
    name_or_path: str,
    *,
    pooling_mode: str = "mean",
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    processor_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> SentenceTransformer:
    """Build a GRACE embedding model ``[Transformer, RationalePooling, Normalize]`` from a causal LM.

    Args:
        name_or_path: local folder or Hub id of an instruction-tuned causal LM with a chat template
            (e.g. ``grace_st.default_backbone()`` or ``"Qwen/Qwen2.5-1.5B-Instruct"``).
        pooling_mode: ``"mean"`` (GRACE), ``"lasttoken"``, ``"summary"``, ``"mean+summary"`` or
            ``"mean+summary+text_summary"`` (sets the Transformer option ``text_summary`` unless given; see
            :class:`grace_st.RationalePooling`). Defaults to ``"mean"``.
        device: e.g. ``"cpu"``, ``"cuda"``; None picks what sentence-transformers picks.
        dtype: weights dtype. None gives bfloat16 on CUDA and float32 elsewhere.
        prompts: sentence-transformers prompts (e.g. ``{"query": "...", "document": ""}``), saved with the model;
            a prompt is prepended to the user text.
        default_prompt_name: name of the prompt used when none is given.
        model_kwargs: extra arguments for ``AutoModelForCausalLM.from_pretrained``
            (``revision``, ``attn_implementation``...).
        processor_kwargs: extra arguments for ``AutoTokenizer.from_pretrained``.
        **options: :class:`grace_st.Transformer` options: ``system_prompt``, ``prompt_template``, ``chat_template``,
            ``rationale_mode``, ``max_new_tokens``, ``max_input_tokens``, ``do_sample``, ``temperature``, ``top_p``,
            ``top_k``, ``repetition_penalty``, ``single_pass``, ``summary_suffix``, ``num_rationales``,
            ``text_summary`` (each type- and range-checked). PromptEOL: ``**PROMPTEOL_OPTIONS``.

    Returns:
        A ``SentenceTransformer``. Rationales: :func:`grace_st.encode_corpus`, or
        ``model[0].decode_rationale(item)`` for each item of ``model.encode(texts, output_value=None)``.
    """
    unknown = sorted(set(options) - set(_TRANSFORMER_OPTIONS))
    if unknown:
        raise ValueError(f"Unknown GRACE option(s) {unknown}; valid options are {_TRANSFORMER_OPTIONS}.")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model, tokenizer = load_backbone(
        name_or_path, model_kwargs={"dtype": dtype, **(model_kwargs or {})}, processor_kwargs=processor_kwargs
    )
    return build_grace_model(
        model,
        tokenizer,
        pooling_mode=pooling_mode,
        device=device,
        prompts=prompts,
        default_prompt_name=default_prompt_name,
        **options,
    )


def build_grace_model(
    model: Any,
    tokenizer: Any,
    *,
    pooling_mode: str = "mean",
    device: str | None = None,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    **options: Any,
) -> SentenceTransformer:
    """Compose ``[Transformer, RationalePooling, Normalize]`` around an in-memory causal LM and its tokenizer.

    The one place a GRACE model is assembled: :func:`from_backbone`, the trainer's final model and the baselines
    all call it.

    Args:
        model: the causal LM (a ``PreTrainedModel`` without adapters).
        tokenizer: its tokenizer (with a chat template).
        pooling_mode: a :class:`grace_st.RationalePooling` mode. Defaults to ``"mean"``.
        device: None keeps the LM's device.
        prompts: sentence-transformers prompts saved with the model.
        default_prompt_name: name of the prompt used when none is given.
        **options: :class:`grace_st.Transformer` options.

    Returns:
        A ``SentenceTransformer``.
    """
    unknown = sorted(set(options) - set(_TRANSFORMER_OPTIONS))
    if unknown:
        raise ValueError(f"Unknown GRACE option(s) {unknown}; valid options are {_TRANSFORMER_OPTIONS}.")
    if "text_summary" in pooling_mode:  # that readout needs the text's own summary state
        options.setdefault("text_summary", True)
    transformer = Transformer(model, tokenizer, **options)
    pooling = RationalePooling(transformer.get_embedding_dimension(), pooling_mode=pooling_mode)
    return SentenceTransformer(
        modules=[transformer, pooling, Normalize()],
        device=device if device is not None else str(model.device),
        prompts=prompts,
        default_prompt_name=default_prompt_name,
        similarity_fn_name="cosine",
    )
