"""Corpus encoding: :func:`encode_corpus` (one process, continuous batching, an optional on-disk cache) and
:func:`encode_corpus_on_ray` (past one machine, on Ray Data; needs the ``distributed`` extra)."""

from __future__ import annotations

from grace_st.encoding.cache import CacheEntry, EmbeddingCache, cache_keys, model_fingerprint, weights_fingerprint
from grace_st.encoding.corpus import EncodedCorpus, continuous_reason, encode_corpus, resolve_prompt
from grace_st.encoding.distributed import EncodedOutput, EncodeRunSummary, encode_corpus_on_ray, read_encoded

__all__ = [
    "CacheEntry",
    "EmbeddingCache",
    "EncodeRunSummary",
    "EncodedCorpus",
    "EncodedOutput",
    "cache_keys",
    "continuous_reason",
    "encode_corpus",
    "encode_corpus_on_ray",
    "model_fingerprint",
    "read_encoded",
    "resolve_prompt",
    "weights_fingerprint",
]
