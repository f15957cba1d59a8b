"""The GRACE model that ships: the modules a saved model carries as its own code (see :data:`CORE_FILES`).

Everything here imports only the standard library, torch and public transformers and sentence-transformers API, and
never fails because of the optional decode engine (:mod:`grace_st.engine`): without it, rationales are written by
``model.generate``.
"""

from __future__ import annotations

from grace_st.model.generation import ENGINE_API_VERSION, GenerationBackend, RationaleBatch, rationale_mask
from grace_st.model.modules import (
    CORE_FILES,
    MODULE_FILE_NAME,
    RationalePooling,
    Transformer,
    __version__,
    load_backbone,
    pool,
    pooling_span_mask,
)
from grace_st.model.options import DEFAULT_SYSTEM_PROMPT

__all__ = [  # grouped by the file that defines them
    "CORE_FILES",
    "MODULE_FILE_NAME",
    "Transformer",
    "RationalePooling",
    "load_backbone",
    "pool",
    "pooling_span_mask",
    "__version__",
    "ENGINE_API_VERSION",
    "GenerationBackend",
    "RationaleBatch",
    "rationale_mask",
    "DEFAULT_SYSTEM_PROMPT",
]
