"""Load a saved GRACE folder through ``trust_remote_code`` in a fresh process, under a simulated environment, encode
texts twice and print one JSON line: the loaded class's module, rationales, embeddings and the warnings about the
generation path. Used by tests/model/test_shipped_core.py.

Usage: python load_and_encode.py FOLDER CASE TEXTS_JSON [SAVE_TO]

CASE: ``installed`` (as it is), ``no_grace_st`` (importing grace_st fails), ``no_dynamic_layer`` (transformers has no
``cache_utils.DynamicLayer``), ``changed_cache_api`` (``DynamicLayer.update`` has other parameters) or
``other_engine_version`` (the installed engine's API version is another). SAVE_TO: save the loaded model there, load
that folder in the same process and encode with it instead.
"""

from __future__ import annotations

import json
import logging
import sys
import types


def simulate(case: str) -> None:
    if case == "no_grace_st":
        sys.modules["grace_st"] = None  # `import grace_st` now raises ModuleNotFoundError
    elif case == "no_dynamic_layer":
        import transformers.cache_utils as real

        # transformers' own code keeps its module globals; only importers of the name see it gone.
        proxy = types.ModuleType(real.__name__)
        proxy.__dict__.update({k: v for k, v in vars(real).items() if k != "DynamicLayer"})
        sys.modules[real.__name__] = proxy
    elif case == "changed_cache_api":
        from transformers.cache_utils import DynamicLayer

        original = DynamicLayer.update

        def update(self, key_states, value_states, *args, layer_hint=None, **kwargs):  # one more parameter
            return original(self, key_states, value_states, *args, **kwargs)

        DynamicLayer.update = update
    elif case == "other_engine_version":
        import grace_st.engine

        grace_st.engine.API_VERSION = 99
    elif case != "installed":
        raise SystemExit(f"unknown case {case!r}")


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main() -> None:
    folder, case, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    simulate(case)
    collect = Collect()
    logging.getLogger().addHandler(collect)
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
    if len(sys.argv) > 4:
        model.save(sys.argv[4])
        model = SentenceTransformer(sys.argv[4], trust_remote_code=True, device="cpu")
    model.encode(texts[:1])
    items = model.encode(texts, output_value=None)
    print(
        json.dumps(
            {
                "module": type(model[0]).__module__,
                "modules": [type(m).__name__ for m in model],
                "rationales": [model[0].decode_rationale(item) for item in items],
                "embeddings": [item["sentence_embedding"].tolist() for item in items],
                "warnings": [m for m in collect.messages if "reference path" in m],
            }
        )
    )


if __name__ == "__main__":
    main()
