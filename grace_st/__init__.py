"""grace_st: GRACE embedding models (arXiv 2510.04506) as sentence-transformers models."""

from __future__ import annotations

from grace_st.backbone import cache_dir, default_backbone, resolve_backbone
from grace_st.encoding import EncodedCorpus, encode_corpus
from grace_st.factory import PROMPTEOL_TEMPLATE, SUMMARY_SUFFIX, build_grace_model, from_backbone
from grace_st.model import (
    DEFAULT_SYSTEM_PROMPT,
    RationaleBatch,
    RationalePooling,
    Transformer,
    __version__,
    pool,
    pooling_span_mask,
    rationale_mask,
)

# Saved models name their module classes "grace_st.<Class>": model.save() copies grace_st/model/modules.py into the
# folder as grace_st.py, which sentence-transformers imports for such one-dot references (see grace_st.model).
Transformer.__module__ = __name__
RationalePooling.__module__ = __name__

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "EncodedCorpus",
    "PROMPTEOL_TEMPLATE",
    "RationaleBatch",
    "RationalePooling",
    "SUMMARY_SUFFIX",
    "Transformer",
    "__version__",
    "build_grace_model",
    "cache_dir",
    "default_backbone",
    "encode_corpus",
    "from_backbone",
    "pool",
    "pooling_span_mask",
    "rationale_mask",
    "resolve_backbone",
]
