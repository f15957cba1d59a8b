"""GRACE modules ``[Transformer, RationalePooling, Normalize]``: the LM writes a rationale per text; the embedding is
the mean of its last-layer states over user text + rationale. A saved model carries this package's files as its code
(:data:`CORE_FILES`; this file as ``grace_st.py``) and loads with ``trust_remote_code=True`` without grace_st."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sentence_transformers.base.modules import InputModule, Module
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .generation import RationaleBatch, RationaleWriter, pad_rows
from .options import (
    DEFAULT_SYSTEM_PROMPT,
    TEXT_FIELD,
    TRANSFORMER_RULES,
    check_combination,
    check_option,
    check_prompts,
    check_texts,
    is_real,
)

__version__ = "0.2.0"  # the grace_st version; saved in grace_config.json as "grace_st_version"

logger = logging.getLogger(__name__)

MODULE_FILE_NAME = "grace_st.py"  # modules.json names "grace_st.Transformer": sentence-transformers imports this file
# The files a saved model carries (folder name -> name in this package): every module of grace_st/model/ but its
# __init__ (tests/model/test_shipped_core.py keeps the two in step).
CORE_FILES = {MODULE_FILE_NAME: "modules.py", "generation.py": "generation.py", "options.py": "options.py"}
_OURS = {"config_sentence_transformers.json", "modules.json"}  # sentence-transformers' files
_TEXT_PLACEHOLDER = "\u2063GRACE_ST_TEXT\u2063"  # where the user text goes when the chat template is rendered
# A fast tokenizer keeps split_special_tokens as state of its shared backend, set by each call: our calls take turns.
_TOKENIZE = threading.Lock()


def pooling_span_mask(attention_mask: torch.Tensor, text_start: torch.Tensor) -> torch.Tensor:
    """New mask of the pooled span in ``(batch, P + R)`` ``attention_mask`` (not modified): from each row's
    ``text_start`` (first user-text token) to the end of the rationale, padding excluded.

    Example:
        >>> am = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
        >>> pooling_span_mask(am, torch.tensor([2, 1])).tolist()
        [[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    after_start = positions.unsqueeze(0) >= text_start.to(attention_mask.device).unsqueeze(1)
    return attention_mask.clone().long() * after_start.long()


class _Outputs(dict):
    """The forward output; names the valid choices when sentence-transformers asks for a missing ``output_value``."""

    def __missing__(self, key):
        raise KeyError(
            f"{key!r} is not an output of a GRACE model: use output_value='sentence_embedding' (default), "
            f"'token_embeddings', or None for every output per text (rationale text: model[0].decode_rationale(item))."
        )


class Transformer(RationaleWriter, InputModule):
    """Input module that owns a causal LM, writes a GRACE rationale for every text and returns its hidden states.

    User text (and a sentence-transformers prompt) is plain text: special-token strings in it (``<|im_end|>``) become
    ordinary tokens and cannot close the user turn. Calls from several threads are safe (README: thread safety).

    Reads (from :meth:`preprocess`): ``input_ids``, ``attention_mask`` (left-padded prompts), ``text_start`` (and
    ``echo_ids``/``echo_mask``, ``suffix_ids``/``suffix_mask``). Writes, over prompt + rationale with each row
    left-aligned (own tokens, then padding): ``input_ids``, ``token_embeddings``, ``attention_mask``, ``pooling_mask``
    (rows from :attr:`span_start` on), ``text_start``, ``rationale_ids``/``rationale_mask``/``rationale_finished``
    and ``summary_embeddings`` (``summary_suffix``), ``text_summary_embeddings`` (``text_summary``); with k rationales
    each gains a k axis (text, rationale): ``output_value="token_embeddings"`` gives the k sequences one after another.

    Args (type- and range-checked by ``options.py``; all but ``model``/``tokenizer`` are saved; defaults in brackets):
        model, tokenizer: the causal LM (any ``AutoModelForCausalLM``) and its tokenizer.
        system_prompt: system message of the chat prompt [the paper's prompt].
        prompt_template: the user message, ``{text}`` marking where the text goes ["{text}"].
        chat_template: wrap the prompt in the backbone's chat template; False: ``prompt_template`` alone (then
            ``system_prompt`` must be "") [True].
        rationale_mode: ``"generate"`` (GRACE), ``"none"`` or ``"echo"`` (the text repeated) ["generate"].
        max_new_tokens, max_input_tokens: rationale (at most the backbone's context length) and user-text limits in
            tokens; longer texts are truncated with a warning [128, 1024].
        do_sample, temperature, top_p, top_k, repetition_penalty: decoding [greedy, 1.0, 1.0, 0 = no cut-off, 1.0].
        single_pass: pool the states generation computed, not a second pass over prompt + rationale [True].
        summary_suffix: fed after each rationale (a ``{text}`` in it: the text again): the ``"summary"`` state [""].
        num_rationales: k rationales per text, seeded by the text, their normalised embeddings averaged [1].
        text_summary: also feed ``summary_suffix`` right after the text: ``text_summary_embeddings`` [False].

    Runtime settings (not saved): ``generation_backend``, ``decode_path``, ``decode_counts`` (``RationaleWriter``) and
    ``overwrite`` (:meth:`save` replaces a folder it did not write).
    """

    config_file_name = "grace_config.json"
    config_keys = list(TRANSFORMER_RULES)
    save_in_root = True

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        prompt_template: str = TEXT_FIELD,
        chat_template: bool = True,
        rationale_mode: str = "generate",
        max_new_tokens: int = 128,
        max_input_tokens: int = 1024,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        single_pass: bool = True,
        summary_suffix: str = "",
        num_rationales: int = 1,
        text_summary: bool = False,
    ) -> None:
        super().__init__()
        options = {key: value for key, value in locals().items() if key in self.config_keys}
        for name, value in options.items():
            check_option(name, value)
            options[name] = float(value) if is_real(name) else value
        check_combination(options)
        context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if isinstance(context, int) and max_new_tokens > context:
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the backbone's context length ({context}).")
        if chat_template and getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"The tokenizer of {getattr(model.config, '_name_or_path', type(model).__name__)!r} has no chat "
                "template. GRACE needs an instruction-tuned backbone with a chat template (e.g. a '*-Instruct' "
                "model), set `tokenizer.chat_template` before building the module, or pass chat_template=False."
            )
        self.model, self.tokenizer = model, tokenizer
        if self.tokenizer.pad_token_id is None:  # padding positions are masked out everywhere
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.__dict__.update(options)
        self.generation_backend = None
        self._decode_path, self.overwrite = "engine", False
        self.decode_counts: dict[str, int] | None = None

    @property
    def max_seq_length(self) -> int:
        """Input limit in tokens of the user text (sentence-transformers' name for ``max_input_tokens``)."""
        return self.max_input_tokens

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        check_option("max_input_tokens", value)
        self.max_input_tokens = value

    def get_embedding_dimension(self) -> int:
        return self.model.config.get_text_config().hidden_size

    def template_pieces(self) -> tuple[list[int], list[int]]:
        """Token ids of the prompt before and after the user text (with the chat template: system prompt, user turn
        around ``prompt_template``, assistant header)."""
        rendered = self.prompt_template.replace(TEXT_FIELD, _TEXT_PLACEHOLDER)
        if self.chat_template:
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages.append({"role": "user", "content": rendered})
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if rendered.count(_TEXT_PLACEHOLDER) != 1:
                raise ValueError("The chat template does not place the user message verbatim in the prompt.")
        return self._pieces(rendered)

    def _pieces(self, rendered: str) -> tuple[list[int], list[int]]:
        return tuple(self._tokenize(rendered.split(_TEXT_PLACEHOLDER), plain=False))  # the template's tokens parsed

    @property
    def span_start(self) -> int:
        """Index of the first pooled row in a left-aligned output row (the length of the prompt before the text)."""
        return len(self.template_pieces()[0])

    def text_token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of user texts as they enter the prompt: plain text, truncated to ``max_input_tokens``."""
        return [row[: self.max_input_tokens] for row in self._tokenize(texts)]

    def _tokenize(self, texts: list[str], plain: bool = True) -> list[list[int]]:
        with _TOKENIZE:  # plain: special-token strings in the texts are ordinary text
            ids = self.tokenizer(texts or [""], add_special_tokens=False, split_special_tokens=plain)["input_ids"]
        return ids if texts else []

    def preprocess(self, inputs: Sequence[str], prompt: str | None = None, **kwargs) -> dict[str, Any]:
        """Left-padded chat prompts (``input_ids``, ``attention_mask``, ``text_start``; ``echo_ids``/``echo_mask``) of
        a batch of texts; a sentence-transformers ``prompt`` is prepended to each text (part of the pooled span)."""
        texts = [(prompt or "") + text for text in check_texts(inputs, name="length-sorted batch")]
        ids = self._tokenize(texts)
        if n_long := sum(len(row) > self.max_input_tokens for row in ids):
            message = "%d of %d texts were longer than max_input_tokens=%d and were truncated."
            logger.warning(message, n_long, len(ids), self.max_input_tokens)
        ids = [row[: self.max_input_tokens] for row in ids]
        before, after = self.template_pieces()
        rows = [before + row + after for row in ids]
        check_prompts(rows, texts, name="length-sorted batch")
        input_ids, attention_mask = pad_rows(rows, self.tokenizer.pad_token_id, left=True)
        text_start = torch.tensor([input_ids.shape[1] - len(row) + len(before) for row in rows], dtype=torch.long)
        features = {"input_ids": input_ids, "attention_mask": attention_mask, "text_start": text_start}
        if self.summary_suffix:  # fed after each rationale; a {text} in it is the text's own ids again
            with_text = TEXT_FIELD in self.summary_suffix
            marked = self.summary_suffix.replace(TEXT_FIELD, _TEXT_PLACEHOLDER) if with_text else _TEXT_PLACEHOLDER
            head, tail = self._pieces(marked if with_text else self.summary_suffix + marked)
            suffix = [head + (row if with_text else []) + tail for row in ids]
            features["suffix_ids"], features["suffix_mask"] = pad_rows(suffix, self.tokenizer.pad_token_id)
        if self.rationale_mode == "echo":
            echo = [row + [self.eos_token_ids[0]] for row in ids]
            features["echo_ids"], features["echo_mask"] = pad_rows(echo, self.tokenizer.pad_token_id)
        return features

    def outputs(self, features: dict[str, Any], rationales: RationaleBatch) -> dict[str, Any]:
        """:meth:`outputs_from_states` when generation kept every state needed, else :meth:`embed` (training rewards
        call this too, so they read out exactly as inference does)."""
        kept = rationales.states is not None and ("suffix_ids" not in features or rationales.suffix_states is not None)
        output = self.outputs_from_states(features, rationales) if kept else self.embed(features, rationales)
        if self.text_summary and rationales.text_suffix_states is not None:  # kept by the engine
            output["text_summary_embeddings"] = rationales.text_suffix_states
        elif self.text_summary:  # the summary state of the text alone (the suffix right after the prompt)
            none = RationaleBatch(rationales.ids[:, :0], rationales.mask[:, :0], rationales.finished)
            alone = self.embed(features, none) if rationales.ids.shape[1] else output
            output["text_summary_embeddings"] = alone["summary_embeddings"]
        return output

    def outputs_from_states(self, features: dict[str, Any], rationales: RationaleBatch) -> dict[str, Any]:
        """The outputs of :meth:`embed` from the states kept during generation (single pass)."""
        prompt_mask = features["attention_mask"]
        attention_mask = torch.cat([prompt_mask, rationales.mask.to(prompt_mask.device)], 1)
        output = {"token_embeddings": rationales.states, **self._masks(features, attention_mask)}
        if rationales.suffix_states is not None:
            output["summary_embeddings"] = rationales.suffix_states
        return output

    def embed(self, features: dict[str, Any], rationales: RationaleBatch) -> dict[str, Any]:
        """Run the LM over prompt + rationale (+ summary suffix): ``token_embeddings``, ``attention_mask``,
        ``pooling_mask`` over prompt + rationale (left-padded prompt, right-padded rationale) and
        ``summary_embeddings``. The two-pass reference."""
        prompt_ids, prompt_mask = features["input_ids"], features["attention_mask"]
        ids = [prompt_ids, rationales.ids.to(prompt_ids.device), features.get("suffix_ids")]
        masks = [prompt_mask, rationales.mask.to(prompt_mask.device), features.get("suffix_mask")]
        input_ids = torch.cat([x for x in ids if x is not None], dim=1)
        attention_mask = torch.cat([x for x in masks if x is not None], dim=1)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # positions of real tokens, as in generate
        kwargs = {"output_hidden_states": True, "use_cache": False}
        states = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        states, width = states.hidden_states[-1], prompt_ids.shape[1] + rationales.ids.shape[1]
        output = {"token_embeddings": states[:, :width], **self._masks(features, attention_mask[:, :width])}
        if masks[2] is not None:  # the state of each row's last suffix token
            last = width + masks[2].sum(dim=1) - 1
            output["summary_embeddings"] = states[torch.arange(states.shape[0], device=states.device), last]
        return output

    @staticmethod
    def _masks(features: dict[str, Any], attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(
            attention_mask=attention_mask, pooling_mask=pooling_span_mask(attention_mask, features["text_start"])
        )

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        k, sampled = self.num_rationales, self.do_sample and self.rationale_mode == "generate"
        seeds = self.text_seeds(features) if sampled else None
        if k > 1:  # each row k times, one after the other
            features = {key: v.repeat_interleave(k, 0) if torch.is_tensor(v) else v for key, v in features.items()}
        single_pass = self.single_pass and self.rationale_mode == "generate"
        rationales = self.generate_rationales(features, with_states=single_pass, seeds=seeds)
        output = self.outputs(features, rationales)
        output["input_ids"] = torch.cat([features["input_ids"], rationales.ids.to(features["input_ids"].device)], 1)
        # Left-align each row: its own tokens first (order kept), then the padding.
        order = torch.sort(1 - output["attention_mask"], dim=1, stable=True).indices
        for key in ("input_ids", "attention_mask", "pooling_mask", "token_embeddings"):
            value = output[key]
            output[key] = value.gather(1, order if value.dim() == 2 else order.unsqueeze(-1).expand_as(value))
        n_pad = (features["attention_mask"] == 0).sum(dim=1).to(features["text_start"].device)
        output.update(text_start=features["text_start"] - n_pad, rationale_ids=rationales.ids)
        output.update(rationale_mask=rationales.mask, rationale_finished=rationales.finished.to(rationales.ids.device))
        if k > 1:
            output = {key: value.unflatten(0, (-1, k)) for key, value in output.items()}
        return _Outputs(output)

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        """Write the LM (safetensors), tokenizer, ``grace_config.json`` (with the writing ``grace_st_version``) and
        the code this module runs (:data:`CORE_FILES`; a model loaded from a folder saves the folder's own copy). A
        folder holding files of another writer is refused unless ``overwrite`` or the runtime setting ``overwrite``."""
        if not safe_serialization:
            raise ValueError("GRACE models are saved as safetensors only (safe_serialization=True).")
        here = Path(__file__).resolve().parent
        copy = Path(__file__).name == MODULE_FILE_NAME  # a loaded folder's copy (grace_st.py beside the others)
        sources = {name: here / (name if copy else source) for name, source in CORE_FILES.items()}
        if missing := [str(path) for path in sources.values() if not path.is_file()]:  # checked before writing
            raise FileNotFoundError(f"Cannot save the GRACE model: its code files {missing} are missing.")
        # Other files than sentence-transformers' (and hidden ones) in a folder without our marker are the user's.
        found = [p.name for p in Path(output_path).iterdir() if p.name[0] != "." and p.name not in _OURS]
        ours = (Path(output_path) / self.config_file_name).is_file() or kwargs.get("overwrite") or self.overwrite
        if found and not ours:
            raise FileExistsError(
                f"{output_path} exists and holds files that model.save did not write (no {self.config_file_name}); "
                "refusing to replace it. Choose another folder, empty it yourself, or pass overwrite=True "
                "(model[0].overwrite = True)."
            )
        self.model.save_pretrained(output_path, safe_serialization=True)
        self.save_tokenizer(output_path)
        with open(os.path.join(output_path, self.config_file_name), "w", encoding="utf-8") as f:
            json.dump({**self.get_config_dict(), "grace_st_version": __version__}, f, indent=4)
        for name, source in sources.items():
            shutil.copyfile(source, os.path.join(output_path, name))

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> Transformer:
        """Load from a folder or Hub id (sentence-transformers' loading arguments); saved options are checked."""
        hub = {key: kwargs.get(key) for key in ("token", "revision")}
        hub["local_files_only"] = kwargs.get("local_files_only", False)
        files = {"subfolder": subfolder, "cache_folder": kwargs.get("cache_folder"), **hub}
        config = cls.load_config(model_name_or_path, **files)
        where = f"{cls.config_file_name} of {model_name_or_path!r}: "
        # Without a code file, sentence-transformers falls back to an installed grace_st: name the file instead.
        for name in CORE_FILES:
            if not cls.load_file_path(model_name_or_path, name, **files):
                raise FileNotFoundError(
                    f"{model_name_or_path!r} lacks {name}, a file of the model's code (model.save() writes all of "
                    f"{sorted(CORE_FILES)}). Copy the folder or save it again."
                )
        if not config:
            raise ValueError(f"{where}missing or empty; a GRACE model folder written by model.save() has one.")
        if unknown := set(config) - set(cls.config_keys) - {"grace_st_version"}:
            raise ValueError(f"{where}unknown keys {sorted(unknown)}; known: {cls.config_keys}.")
        config.setdefault("text_summary", False)  # added after 0.2.0: a folder written before it does without
        version, missing = config.pop("grace_st_version", ""), [key for key in cls.config_keys if key not in config]
        if not isinstance(version, str):
            raise ValueError(f"{where}grace_st_version must be a version string.")
        if missing and version and version.split(".")[:2] != ["0", "1"]:  # before 0.2: the defaults of 0.1 apply
            raise ValueError(f"{where}missing keys {missing}; grace_st {version} writes every option.")
        for name, value in config.items():
            check_option(name, value, where)
        hub.update(cache_dir=kwargs.get("cache_folder"), **({"subfolder": subfolder} if subfolder else {}))
        model_kwargs = {**hub, **(kwargs.get("model_kwargs") or {}), **(kwargs.get("config_kwargs") or {})}
        processor_kwargs = {**hub, **(kwargs.get("processor_kwargs") or {})}
        return cls(*load_backbone(model_name_or_path, model_kwargs, processor_kwargs), **config)


class RationalePooling(Module):
    """Pools GRACE token states into one embedding: reads ``token_embeddings``, ``pooling_mask`` (else
    ``attention_mask``) and ``summary_embeddings``, writes ``sentence_embedding`` (with k rationales: the mean of the k
    normalised embeddings).

    Args:
        embedding_dimension: hidden size of the LM (checked against it when the model is assembled or loaded).
        pooling_mode: ``"mean"`` (GRACE: over user text + rationale), ``"lasttoken"`` (the rationale's closing EOS, or
            the last prompt token without a rationale: PromptEOL), ``"summary"`` (the summary suffix's last token),
            ``"mean+summary"`` (both normalised, summed) or ``"mean+summary+text_summary"`` (and the Transformer's
            ``text_summary``). Defaults to ``"mean"``.
    """

    config_keys = ["embedding_dimension", "pooling_mode"]

    def __init__(self, embedding_dimension: int, pooling_mode: str = "mean") -> None:
        super().__init__()
        check_option("embedding_dimension", embedding_dimension)
        check_option("pooling_mode", pooling_mode)
        self.embedding_dimension, self.pooling_mode = embedding_dimension, pooling_mode

    def get_embedding_dimension(self) -> int:
        return self.embedding_dimension

    def on_model_ready(self, model) -> None:
        """Check ``embedding_dimension`` against the LM and that a summary readout has a summary suffix."""
        first = model[0]
        if isinstance(first, Transformer) and first.get_embedding_dimension() != self.embedding_dimension:
            raise ValueError(
                f"RationalePooling embedding_dimension={self.embedding_dimension} does not match the LM's hidden "
                f"size {first.get_embedding_dimension()}."
            )
        for option in ("summary_suffix", "text_summary")[: self.pooling_mode.count("summary")]:  # what the mode reads
            if isinstance(first, Transformer) and not getattr(first, option):
                raise ValueError(f"pooling_mode={self.pooling_mode!r} needs the Transformer's {option} (it is unset).")

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        states = features["token_embeddings"]
        mask = features.get("pooling_mask", features["attention_mask"]).to(states.device)
        k = states.shape[1] if states.dim() == 4 else 0  # num_rationales axis
        states, mask = (states.flatten(0, 1), mask.flatten(0, 1)) if k else (states, mask)
        if "summary" in self.pooling_mode:
            if "summary_embeddings" not in features:
                raise ValueError(f"pooling_mode={self.pooling_mode!r} needs summary_embeddings (a summary_suffix).")
            embedding = features["summary_embeddings"].flatten(0, 1) if k else features["summary_embeddings"]
            if self.pooling_mode != "summary":  # mean+summary(+text_summary)
                embedding = _unit(pool(states, mask, "mean")) + _unit(embedding)
            if "text_summary" in self.pooling_mode:  # the Transformer's text_summary (checked when assembled)
                embedding = embedding + _unit(features["text_summary_embeddings"].flatten(0, 1 if k else 0))
        else:
            embedding = pool(states, mask, self.pooling_mode)
        features["sentence_embedding"] = _unit(embedding).unflatten(0, (-1, k)).mean(dim=1) if k else embedding
        return features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1).to(x.dtype)


def pool(states: torch.Tensor, mask: torch.Tensor, pooling_mode: str = "mean") -> torch.Tensor:
    """Pool ``(batch, seq, dim)`` states over a ``(batch, seq)`` 0/1 mask, in float32 for stable averages.

    Example:
        >>> s = torch.arange(6.0).reshape(1, 3, 2)
        >>> pool(s, torch.tensor([[0, 1, 1]])).tolist(), pool(s, torch.tensor([[1, 1, 0]]), "lasttoken").tolist()
        ([[3.0, 4.0]], [[2.0, 3.0]])
    """
    weights = mask.to(torch.float32)
    if pooling_mode == "mean":
        summed = (states.float() * weights.unsqueeze(-1)).sum(dim=1)
        return (summed / weights.sum(dim=1, keepdim=True).clamp(min=1.0)).to(states.dtype)
    if pooling_mode == "lasttoken":
        positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
        last = (positions * (mask > 0)).argmax(dim=1)
        return states[torch.arange(states.shape[0], device=states.device), last]
    raise ValueError(f"pooling_mode={pooling_mode!r} is not supported here; choose 'mean' or 'lasttoken'.")


def load_backbone(
    name_or_path: str, model_kwargs: dict[str, Any] | None = None, processor_kwargs: dict[str, Any] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM (float32 unless ``model_kwargs["dtype"]`` says otherwise, eval mode) and its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **{"dtype": torch.float32, **(model_kwargs or {})})
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **(processor_kwargs or {}))
    return model.eval(), tokenizer
