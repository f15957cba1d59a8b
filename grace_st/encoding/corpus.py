"""Corpus encoding with GRACE models: one call that de-duplicates texts, consults an optional on-disk embedding cache
and returns each text's rationale with its embedding.

``model.encode`` stays plain sentence-transformers; :func:`encode_corpus` is the explicit API for evaluation and for
large corpora::

    from grace_st.encoding import encode_corpus

    corpus = encode_corpus(model, texts, batch_size=16, cache_dir="~/.cache/grace-embeddings")
    corpus.embeddings  # (len(texts), dim) float32, in the order of `texts`
    corpus.rationales  # one string per text

GRACE models with greedy decoding on the decode engine are encoded with continuous batching
(``schedule="continuous"``, the default where it applies, :func:`continuous_reason`): ``batch_size`` rows decode
together and a row that finishes hands its slot to the next waiting text (:func:`grace_st.engine.decode_stream`),
instead of the batch waiting for its longest rationale; the pooled states go through the model's own modules after
the first (pooling, normalisation). Embeddings equal ``model.encode``'s (``schedule="batches"``, the reference)
within float tolerance, rationales are the same greedy ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import sentence_transformers
import torch
from sentence_transformers.base.modules import Normalize

from grace_st.encoding.cache import CacheEntry, EmbeddingCache, cache_keys
from grace_st.model.options import check_prompts, check_texts
from grace_st.model_kind import is_grace_model

logger = logging.getLogger(__name__)

SCHEDULES = ("continuous", "batches")


@dataclass
class EncodedCorpus:
    """What :func:`encode_corpus` returns, one row per input text, in the caller's order.

    Attributes:
        embeddings: ``(n, dim)`` float32 on the CPU.
        rationales: rationale text per text (``""`` in rationale_mode ``"none"`` and for models that are not GRACE);
            with ``num_rationales=k > 1``, a list of the k rationale texts per text (and so for the two fields below).
        rationale_ids: rationale token ids per text, the closing EOS excluded.
        finished: per text, True where the rationale ended with an EOS before ``max_new_tokens``.
    """

    embeddings: np.ndarray
    rationales: list[str] | list[list[str]]
    rationale_ids: list[list[int]] | list[list[list[int]]]
    finished: list[bool] | list[list[bool]]


def encode_corpus(
    model: sentence_transformers.SentenceTransformer,
    texts: list[str],
    *,
    batch_size: int = 32,
    prompt_name: str | None = None,
    prompt: str | None = None,
    normalize_embeddings: bool = True,
    cache_dir: str | os.PathLike | None = None,
    show_progress_bar: bool | None = None,
    schedule: Literal["continuous", "batches"] = "continuous",
) -> EncodedCorpus:
    """Encode a list of texts: each distinct text is encoded once, cached rows are reused, rationales come back too.

    Args:
        model: a GRACE ``SentenceTransformer`` (any other model works too, without rationales or cache).
        texts: the texts (a string, list or other iterable of strings); a bad entry raises naming its index.
        batch_size: texts per forward batch. Defaults to 32.
        prompt_name: a saved prompt of the model (e.g. ``"query"``); ignored when ``prompt`` is given. Defaults to
            the model's ``default_prompt_name``.
        prompt: a prompt prepended to every text. Defaults to None.
        normalize_embeddings: L2-normalise the rows. Defaults to True.
        cache_dir: folder of an on-disk :class:`EmbeddingCache` shared across calls and processes; None (the default)
            caches nothing. A folder that cannot be written is warned about and the embeddings are still returned.
        show_progress_bar: passed to ``model.encode`` (a progress bar over texts with continuous batching).
        schedule: ``"continuous"`` (default): continuous batching where :func:`continuous_reason` allows it, else
            ``model.encode``; ``"batches"``: always ``model.encode`` (one batch of ``batch_size`` texts at a time; the
            reference). Both give the same cached entries.

    Returns:
        An :class:`EncodedCorpus`.

    Raises:
        TypeError / ValueError: ``texts`` is not a list of strings, or one holds a lone surrogate (named by index);
            unknown ``prompt_name``; ``cache_dir`` with a model that is not GRACE.
    """
    texts = check_texts(texts)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not supported; choose one of {SCHEDULES}.")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1.")
    module = model[0]
    is_grace = is_grace_model(model)
    if cache_dir is not None and not is_grace:
        raise ValueError(f"cache_dir needs a GRACE model; the first module is {type(module).__name__}.")
    prompt = resolve_prompt(model, prompt, prompt_name)
    if is_grace and not any(module.template_pieces()):  # "" could leave an empty prompt: name it in the caller's list
        check_prompts(module.text_token_ids([(prompt or "") + text for text in texts]), texts)
    k = getattr(module, "num_rationales", 1) if is_grace else 1
    if cache_dir is not None and k > 1:
        raise ValueError(f"cache_dir is not supported with num_rationales={k} > 1; encode without a cache.")
    unique = list(dict.fromkeys(texts))
    entries: list[CacheEntry | None] = [None] * len(unique)
    keys: list[str] = []
    cache = EmbeddingCache(cache_dir) if cache_dir is not None else None
    if cache is not None:
        keys = cache_keys(model, unique, prompt)
        entries = [cache.get(key, model.get_embedding_dimension()) for key in keys]
    missing = [i for i, entry in enumerate(entries) if entry is None]
    if missing:
        todo = [unique[i] for i in missing]
        if is_grace and schedule == "continuous" and continuous_reason(model) is None:
            fresh = _encode_continuous(model, todo, prompt, batch_size, show_progress_bar)
        else:
            fresh = _encode(model, todo, prompt, batch_size, show_progress_bar, is_grace)
        for i, entry in zip(missing, fresh, strict=True):
            entries[i] = entry
            if cache is not None:
                cache.put(keys[i], entry)
    dim = model.get_embedding_dimension() or 0
    rows = np.stack([e.embedding for e in entries]) if entries else np.empty((0, dim), dtype=np.float32)
    if normalize_embeddings and len(rows):
        rows = torch.nn.functional.normalize(torch.from_numpy(rows), p=2, dim=1).numpy()
    where = {text: i for i, text in enumerate(unique)}
    order = [where[text] for text in texts]
    # A finished rationale's last id is the EOS that closed it.
    if k > 1:
        ids_of = [[r[: len(r) - int(f)].tolist() for r, f in zip(e.ids, e.finished, strict=True)] for e in entries]
        texts_of = [[module.decode_ids(ids) for ids in rows] for rows in ids_of]
    else:
        ids_of = [entry.ids[: len(entry.ids) - int(entry.finished)].tolist() for entry in entries]
        texts_of = [module.decode_ids(ids) if is_grace else "" for ids in ids_of]
    return EncodedCorpus(
        embeddings=np.ascontiguousarray(rows[order], dtype=np.float32),
        rationales=[texts_of[i] for i in order],
        rationale_ids=[list(ids_of[i]) for i in order],
        finished=[entries[i].finished for i in order],
    )


def _encode(model, texts, prompt, batch_size, show_progress_bar, is_grace) -> list[CacheEntry]:
    if not is_grace:
        rows = model.encode(texts, prompt=prompt, batch_size=batch_size, show_progress_bar=show_progress_bar)
        empty = np.zeros(0, dtype=np.int64)
        return [CacheEntry(np.asarray(row, dtype=np.float32), empty, False) for row in rows]
    items = model.encode(
        texts, prompt=prompt, batch_size=batch_size, show_progress_bar=show_progress_bar, output_value=None
    )
    entries = []
    for item in items:
        ids, masks, finished = (item[key].cpu() for key in ("rationale_ids", "rationale_mask", "rationale_finished"))
        embedding = item["sentence_embedding"].detach().float().cpu().numpy()
        if ids.dim() == 1:
            entries.append(CacheEntry(embedding, ids[masks.bool()].numpy().astype(np.int64), bool(finished)))
        else:  # num_rationales > 1: a k axis
            rows = [row[mask.bool()].numpy().astype(np.int64) for row, mask in zip(ids, masks, strict=True)]
            entries.append(CacheEntry(embedding, rows, [bool(f) for f in finished]))
    return entries


def continuous_reason(model) -> str | None:
    """Why :func:`encode_corpus` cannot use continuous batching for ``model`` (then it calls ``model.encode``), or
    None if it can: a GRACE ``Transformer`` whose code expects this engine (:data:`grace_st.engine.API_VERSION`; a
    saved model runs its own copy of the code), writing greedy rationales with the decode engine and the single-pass
    states, followed only by ``RationalePooling`` and ``Normalize``."""
    module = model[0]
    if not is_grace_model(model):
        return f"the first module is {type(module).__module__}.{type(module).__name__}, not grace_st.Transformer"
    try:  # imported here: an engine that cannot be imported (another transformers) leaves model.encode working
        from grace_st import engine
    except ImportError as error:
        return f"the decode engine cannot be imported: {error!r}"
    version = getattr(module, "engine_api_version", None)
    if version != engine.API_VERSION:
        return f"the model's code expects engine API {version!r}, the installed engine is {engine.API_VERSION!r}"
    if module.rationale_mode != "generate" or not module.single_pass:
        return f"rationale_mode={module.rationale_mode!r}, single_pass={module.single_pass!r}"
    if module.generation_backend is not None or module.decode_path != "engine":
        return "a generation backend or decode_path other than the engine"
    if module.do_sample:
        return "sampling (continuous batching is greedy only)"
    others = [
        type(m).__name__
        for m in list(model)[1:]
        if type(m) is not Normalize and type(m).__name__ != "RationalePooling"
    ]
    if others:
        return f"modules {others} after the Transformer (only RationalePooling and Normalize are supported)"
    return engine.unsupported_reason(module) or engine.unsupported_arguments(module.generation_kwargs())


def _encode_continuous(model, texts, prompt, batch_size, show_progress_bar) -> list[CacheEntry]:
    """:func:`_encode` for a GRACE model by continuous batching (:func:`grace_st.engine.decode_stream`); the model's
    modules after the first pool the rows, fed what ``Transformer.forward`` would output for them."""
    from tqdm.auto import tqdm

    model.eval()
    module = model[0]
    prefix_len = len(module.template_pieces()[0])
    # Longest first (as sentence-transformers sorts): similar lengths enter the batch together, little padding.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    own: list[list[int]] = []
    suffixes: list[list[int]] = []  # each text's summary suffix ids (with a summary_suffix)
    prefix: list[int] = []
    for start in range(0, len(order), batch_size):
        # The module's own tokenization (prompt, truncation and its warning), batch by batch as encode does.
        features = module.preprocess([texts[i] for i in order[start : start + batch_size]], prompt=prompt)
        for ids, mask in zip(features["input_ids"], features["attention_mask"], strict=True):
            real = ids[mask.bool()].tolist()
            prefix = real[:prefix_len]
            own.append(real[prefix_len:])
        if "suffix_ids" in features:
            pairs = zip(features["suffix_ids"], features["suffix_mask"], strict=True)
            suffixes.extend(ids[mask.bool()].tolist() for ids, mask in pairs)
    # Then longest first in tokens: rows that enter the batch together are prefilled with less padding.
    by_tokens = sorted(range(len(own)), key=lambda i: -len(own[i]))
    order, own = [order[i] for i in by_tokens], [own[i] for i in by_tokens]
    suffixes = [suffixes[i] for i in by_tokens] if suffixes else []
    kwargs = module.generation_kwargs()
    eos = kwargs["eos_token_id"]
    entries: list[CacheEntry | None] = [None] * len(texts)
    pending = []
    from grace_st import engine

    stream = engine.decode_stream(  # closed below even if pooling fails: it holds the weights' CPU layout
        module.model,
        prefix,
        own,
        max_new_tokens=kwargs["max_new_tokens"],
        eos_token_ids=[eos] if isinstance(eos, int) else list(eos),
        pad_token_id=kwargs["pad_token_id"],
        batch_size=batch_size,
        counts=module.decode_counts,
        suffix_ids=suffixes or None,
        text_suffix=bool(getattr(module, "text_summary", False)),
    )
    with (
        torch.inference_mode(),
        contextlib.closing(stream),
        tqdm(total=len(texts), desc="Texts", disable=not show_progress_bar) as bar,
    ):
        for row in stream:
            pending.append(row)
            if len(pending) == batch_size:
                _pool_rows(model, prefix, own, pending, order, entries)
                bar.update(len(pending))
                pending = []
        if pending:
            _pool_rows(model, prefix, own, pending, order, entries)
            bar.update(len(pending))
    return entries


def _pool_rows(model, prefix: list[int], own: list[list[int]], rows: list, order: list[int], entries: list) -> None:
    """Pool finished stream rows with ``model[1:]`` and store their :class:`CacheEntry` at ``entries[order[i]]``.

    The features are those ``Transformer.forward`` writes (each row left-aligned: prompt, rationale, padding; with
    ``text_summary``, the summary suffix's state after the prompt alone, which the stream fed at prefill)."""
    module = model[0]
    pad = module.tokenizer.pad_token_id
    rationales = module.rationale_batch([row.generated.tolist() for row in rows])
    lengths = [len(row.states) for row in rows]
    width, device = max(lengths), rows[0].states.device
    states = rows[0].states.new_zeros(len(rows), width, rows[0].states.shape[-1])
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for j, row in enumerate(rows):
        states[j, : lengths[j]] = row.states
        ids = prefix + own[row.index] + row.generated.tolist()
        input_ids[j, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[j, : lengths[j]] = 1
    pooling_mask = attention_mask.clone()
    pooling_mask[:, : len(prefix)] = 0
    features: dict[str, Any] = {
        "input_ids": input_ids,
        "token_embeddings": states,
        "attention_mask": attention_mask,
        "pooling_mask": pooling_mask,
        "text_start": torch.full((len(rows),), len(prefix), dtype=torch.long, device=device),
        "rationale_ids": rationales.ids.to(device),
        "rationale_mask": rationales.mask.to(device),
        "rationale_finished": rationales.finished.to(device),
    }
    if rows[0].suffix_state is not None:
        features["summary_embeddings"] = torch.stack([row.suffix_state for row in rows])
    if rows[0].text_suffix_state is not None:
        features["text_summary_embeddings"] = torch.stack([row.text_suffix_state for row in rows])
    for later in list(model)[1:]:
        features = later(features)
    embeddings = features["sentence_embedding"]
    if model.truncate_dim is not None:
        embeddings = embeddings[:, : model.truncate_dim]
    for j, row in enumerate(rows):
        entries[order[row.index]] = CacheEntry(
            embeddings[j].detach().float().cpu().numpy(),
            row.generated.cpu().numpy().astype(np.int64),
            bool(rationales.finished[j]),
        )


def resolve_prompt(model, prompt: str | None, prompt_name: str | None) -> str | None:
    """The prompt ``model.encode`` would use: ``prompt``, else the saved prompt ``prompt_name``, else the default."""
    if prompt is not None:
        return prompt
    name = prompt_name if prompt_name is not None else model.default_prompt_name
    if name is None:
        return None
    if name not in model.prompts:
        raise ValueError(f"prompt_name={name!r} is not a prompt of this model; its prompts: {sorted(model.prompts)}.")
    return model.prompts[name]
