"""Provenance of a training run: which Hub model and licence a backbone came from, as far as local files tell."""

from __future__ import annotations

import json
import os

from grace_st.artifacts import HUB_ID
from grace_st.backbone import (
    DEFAULT_BACKBONE_HUB_ID,
    DEFAULT_BACKBONE_LICENSE,
    DEFAULT_BACKBONE_NAME,
    is_default_backbone,
)


def base_model_info(source: str | None) -> tuple[str | None, str | None]:
    """``(Hub id, licence)`` of the backbone a run started from, as far as local files tell (no network).

    The default backbone is SmolLM2-135M-Instruct (apache-2.0). A Hub id is kept as given; a local folder gives the
    Hub id recorded in its ``config.json`` (``_name_or_path``) if any. The licence comes from the model card metadata
    (``license:``) of the folder or of the Hub cache, when present.

    Args:
        source: what the trainer was given (Hub id, folder, ``"default"``) or the model config's ``name_or_path``.

    Returns:
        ``(hub_id or None, license or None)``.
    """
    if source in (None, "", DEFAULT_BACKBONE_NAME) or (os.path.isdir(source) and is_default_backbone(source)):
        return DEFAULT_BACKBONE_HUB_ID, DEFAULT_BACKBONE_LICENSE
    readme: str | None = None
    hub_id: str | None = None
    if os.path.isdir(source):
        config_path = os.path.join(source, "config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as handle:
                recorded = json.load(handle).get("_name_or_path")
            if isinstance(recorded, str) and HUB_ID.match(recorded) and not os.path.exists(recorded):
                hub_id = recorded
        readme = os.path.join(source, "README.md")
    elif HUB_ID.match(source):
        from huggingface_hub import try_to_load_from_cache

        hub_id = source
        cached = try_to_load_from_cache(source, "README.md")
        readme = cached if isinstance(cached, str) else None
    if hub_id == DEFAULT_BACKBONE_HUB_ID:
        return hub_id, DEFAULT_BACKBONE_LICENSE
    license_ = None
    if readme and os.path.isfile(readme):
        from huggingface_hub import metadata_load

        value = (metadata_load(readme) or {}).get("license")
        license_ = value if isinstance(value, str) else None
    return hub_id, license_
