"""Optional vLLM generation backend: vLLM writes the rationales at inference time (GPU, large corpora).

Usage (a runtime setting, not saved with the model)::

    from grace_st.vllm_backend import VLLMBackend

    model[0].generation_backend = VLLMBackend(gpu_memory_utilization=0.5)  # options go to vllm.LLM
    model[0].generation_backend = None  # back to transformers' generate

The engine is built on first use, from the folder (or Hub id) the LM was loaded from unless ``model=`` says otherwise,
with the LM's dtype. It gets the very prompt token ids :meth:`grace_st.Transformer.preprocess` builds and the module's
decoding settings (greedy: temperature 0, ``max_new_tokens``, stop at the EOS ids). vLLM returns no hidden states, so
the pooled states come from one transformers pass over prompt + rationale (the two-pass path): leave the transformers
LM room on the GPU. The engine loads weights from disk: after changing weights, save the model and use a new backend
with ``model=``. It does not pickle or copy: a copied or unpickled backend builds its own engine on first use.
"""

from __future__ import annotations

import logging
from typing import Any

from grace_st.model import RationaleBatch, Transformer

logger = logging.getLogger(__name__)

# The `generate` arguments that `vllm_sampling_kwargs` translates (those of `Transformer.generation_kwargs`).
_GENERATE_ARGS_FOR_VLLM = frozenset(
    {
        "max_new_tokens",
        "do_sample",
        "eos_token_id",
        "pad_token_id",
        "repetition_penalty",
        "temperature",
        "top_p",
        "top_k",
    }
)


def import_vllm():
    """Import vllm or raise an ``ImportError`` that says how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            "The vLLM generation backend needs the vllm package and a GPU: `pip install vllm` (see "
            "https://docs.vllm.ai for the build that matches your CUDA and torch), or keep the default "
            "transformers generation (`model[0].generation_backend = None`)."
        ) from error
    return vllm


def vllm_sampling_kwargs(generate_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Translate ``model.generate`` arguments (see :meth:`Transformer.generation_kwargs`) to ``vllm.SamplingParams``.

    Greedy decoding is ``temperature=0``; vLLM stops at the EOS ids (``stop_token_ids``) and keeps them in the output.

    Args:
        generate_kwargs: ``max_new_tokens``, ``eos_token_id``, and optionally ``do_sample``, ``temperature``,
            ``top_p``, ``top_k`` (0 = none), ``repetition_penalty``, ``pad_token_id`` (unused by vLLM).

    Returns:
        Keyword arguments for ``vllm.SamplingParams``.

    Example:
        >>> vllm_sampling_kwargs({"max_new_tokens": 8, "eos_token_id": [2], "do_sample": False})["temperature"]
        0.0
    """
    unsupported = sorted(set(generate_kwargs) - _GENERATE_ARGS_FOR_VLLM)
    if unsupported:
        raise ValueError(
            f"generate arguments {unsupported} have no translation for the vLLM backend; "
            f"supported: {sorted(_GENERATE_ARGS_FOR_VLLM)}."
        )
    eos = generate_kwargs["eos_token_id"]
    params: dict[str, Any] = {
        "n": 1,
        "max_tokens": int(generate_kwargs["max_new_tokens"]),
        "stop_token_ids": [eos] if isinstance(eos, int) else list(eos),
        "repetition_penalty": float(generate_kwargs.get("repetition_penalty") or 1.0),
    }
    if generate_kwargs.get("do_sample"):
        # None means the default, as in `generate`.
        temperature, top_p, top_k = (generate_kwargs.get(key) for key in ("temperature", "top_p", "top_k"))
        params.update(
            temperature=1.0 if temperature is None else float(temperature),
            top_p=1.0 if top_p is None else float(top_p),
            top_k=int(top_k) if top_k else -1,  # -1 = no top-k cut-off in every vLLM version
        )
    else:
        params.update(temperature=0.0, top_p=1.0, top_k=-1)
    return params


class VLLMBackend:
    """A :class:`grace_st.model.GenerationBackend` that writes rationales with a ``vllm.LLM`` engine.

    Args:
        **engine_kwargs: passed to ``vllm.LLM`` (e.g. ``gpu_memory_utilization=0.5``, ``tensor_parallel_size=2``).
            ``model`` defaults to the folder or Hub id the LM was loaded from and ``dtype`` to the LM's dtype.

    Raises:
        ImportError: vllm is not installed (raised here, not at the first encode).
    """

    def __init__(self, **engine_kwargs: Any) -> None:
        import_vllm()
        self.engine_kwargs = dict(engine_kwargs)
        self._engine: Any = None

    def __repr__(self) -> str:
        return f"VLLMBackend({self.engine_kwargs})"

    def __getstate__(self) -> dict[str, Any]:
        # An engine does not pickle (multi-process encoding, deepcopy): a copy builds its own on first use.
        return {**self.__dict__, "_engine": None}

    def engine(self, module: Transformer):
        """The ``vllm.LLM`` engine, built on first use with the options given to the constructor."""
        if self._engine is None:
            kwargs = dict(self.engine_kwargs)
            if not kwargs.get("model"):
                kwargs["model"] = getattr(module.model.config, "_name_or_path", "")
            if not kwargs["model"]:
                raise ValueError(
                    "The vLLM backend loads the LM from a folder or Hub id, and this in-memory LM has none. Save the "
                    "model first (`model.save(path)`) and pass its folder: `VLLMBackend(model=path)`."
                )
            kwargs.setdefault("dtype", str(module.model.dtype).removeprefix("torch."))
            logger.info("Building the vLLM engine: %s", kwargs)
            self.engine_kwargs = kwargs  # the resolved options (also in the embedding cache key, via repr)
            self._engine = import_vllm().LLM(**kwargs)
        return self._engine

    def generate(self, module: Transformer, features: dict[str, Any], **generate_kwargs: Any) -> RationaleBatch:
        """Rationales for the prompts of ``features`` exactly as :meth:`Transformer.preprocess` built them."""
        engine = self.engine(module)
        params = import_vllm().SamplingParams(**vllm_sampling_kwargs(generate_kwargs))
        input_ids, attention_mask = features["input_ids"], features["attention_mask"]
        prompts = [
            {"prompt_token_ids": row[mask.bool()].tolist()}  # without the left padding
            for row, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)
        ]
        eos = module.eos_token_ids
        rows = []
        for output in engine.generate(prompts, params, use_tqdm=False):
            completion = output.outputs[0]
            row = list(completion.token_ids)
            if completion.finish_reason == "stop" and eos and (not row or row[-1] not in eos):
                # A stop token that vLLM left out of `token_ids`: the rationale includes its closing EOS.
                # `stop_reason` is the stop token id, or None for the tokenizer's own EOS.
                stop = getattr(completion, "stop_reason", None)
                if stop not in eos:
                    stop = module.tokenizer.eos_token_id if module.tokenizer.eos_token_id in eos else eos[0]
                row.append(stop)
            rows.append(row)
        batch = module.rationale_batch(rows)
        return RationaleBatch(batch.ids.to(input_ids.device), batch.mask.to(input_ids.device), batch.finished)
