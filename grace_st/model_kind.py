"""Is this a GRACE model? The one predicate for loaded models and for saved folders, and a folder's size.

A loaded model's first module is GRACE's :class:`grace_st.Transformer` class, or the copy of it that a saved or
published folder carries as ``grace_st.py``: sentence-transformers imports such a folder's own module file first
(``transformers_modules.<folder>.grace_st.Transformer``, even where grace_st is installed), so an ``isinstance`` check
against the installed class would miss those models. The predicate therefore accepts a class named ``Transformer``
defined in the installed ``grace_st`` package or in a module file named ``grace_st``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

ModelKind = Literal["grace", "sentence-transformers", "backbone"]
GRACE_CLASS_PREFIX = "grace_st."


def _is_grace_class(cls: type) -> bool:
    parts = cls.__module__.split(".")
    return cls.__name__ == "Transformer" and (parts[0] == "grace_st" or parts[-1] == "grace_st")


def is_grace_model(model: Any) -> bool:
    """True when ``model`` is a SentenceTransformer whose first module is GRACE's ``Transformer``.

    Args:
        model: any object; SentenceTransformers are indexable by module position.

    Returns:
        Whether GRACE rationales can be asked of it (``model[0].text_token_ids``, ``rationale_mode``...).

    Example:
        >>> is_grace_model(object()), is_grace_model([])
        (False, False)
    """
    try:
        first = model[0]
    except (TypeError, IndexError, KeyError):
        return False
    return any(_is_grace_class(cls) for cls in type(first).__mro__)


def folder_kind(folder: str | os.PathLike) -> ModelKind:
    """What a model folder holds, from its files (nothing is loaded).

    Returns:
        ``"grace"`` (``modules.json`` names a ``grace_st.*`` module), ``"sentence-transformers"`` (another
        ``modules.json``) or ``"backbone"`` (a transformers model: ``config.json`` without ``modules.json``).

    Raises:
        ValueError: the folder holds neither.
    """
    folder = Path(folder)
    modules = folder / "modules.json"
    if modules.is_file():
        entries = json.loads(modules.read_text(encoding="utf-8"))
        types = [entry.get("type", "") for entry in entries if isinstance(entry, dict)]
        return "grace" if any(t.startswith(GRACE_CLASS_PREFIX) for t in types) else "sentence-transformers"
    if (folder / "config.json").is_file():
        return "backbone"
    raise ValueError(
        f"{folder} holds neither a SentenceTransformer (modules.json) nor a transformers model (config.json)."
    )


def folder_parameters(folder: str | os.PathLike) -> tuple[int | None, int | None]:
    """Parameters and bytes of a model folder's safetensors weights (root and module subfolders), from the file
    headers only: nothing is loaded.

    Returns:
        ``(parameters, bytes)``, or ``(None, None)`` when the folder has no ``.safetensors`` file.
    """
    from safetensors import safe_open

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*/*.safetensors"))
    if not files:
        return None, None
    total, size = 0, 0
    for file in files:
        with safe_open(str(file), framework="numpy") as handle:
            for key in handle.keys():
                count = 1
                for dim in handle.get_slice(key).get_shape():
                    count *= dim
                total += count
        size += file.stat().st_size
    return total, size
