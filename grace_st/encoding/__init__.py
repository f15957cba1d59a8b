"""Corpus encoding: :func:`encode_corpus` (one process, continuous batching, an optional on-disk cache)."""

from __future__ import annotations

from grace_st.encoding.cache import CacheEntry, EmbeddingCache, cache_keys, model_fingerprint, weights_fingerprint
from grace_st.encoding.corpus import EncodedCorpus, continuous_reason, encode_corpus, resolve_prompt

__all__ = [
    "CacheEntry",
    "EmbeddingCache",
    "EncodedCorpus",
    "cache_keys",
    "continuous_reason",
    "encode_corpus",
    "model_fingerprint",
    "resolve_prompt",
    "weights_fingerprint",
]
