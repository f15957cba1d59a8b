"""Evaluate GRACE models (and any SentenceTransformer baseline) with mteb, offline or on the real benchmark.

mteb does the work: its ``SentenceTransformerEncoderWrapper`` (prompt resolution, similarity), its
``ModelMeta.from_sentence_transformer_model``, ``mteb.evaluate`` with a ``ResultCache`` (results layout, reuse) and its
task registry. grace_st adds only what GRACE needs:

- :class:`GraceEncoder`: the mteb wrapper, with GRACE models encoded through
  :func:`grace_st.encoding.encode_corpus` (one rationale per distinct text of a task) and their rationales measured
  (:class:`grace_st.diagnostics.RationaleStats`, saved beside mteb's result as ``grace_diagnostics/<task>.json``);
- :class:`ModelSpec` / :func:`build_model_meta`: one row of a comparison (a GRACE folder, a Hub id, a raw backbone
  turned into GRACE with options such as ``rationale_mode="echo"``, or any SentenceTransformer) and its metadata from
  the folder's files, so finished results are found without loading the model. GRACE options become mteb
  ``experiment_kwargs``; for a backbone they include a hash of every effective GRACE setting (defaults too), so the
  result cache never mixes settings. A local task's dataset revision hashes its spec and data; results of another
  revision are recomputed (mteb's own cache would keep them);
- :func:`evaluate_model`, :func:`standard_rows`, :func:`comparison_table` (issue 7: no-rationale, echo, untrained
  GRACE, contrastive, trained GRACE); the command line of ``eval/mteb_run.py`` is :mod:`grace_st.scripts.evaluate`.

Local task specs live in :mod:`grace_st.evaluation.local_tasks`. This module needs mteb (``pip install
"grace-st[eval]"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from grace_st.artifacts import (
    DIAGNOSTICS_FOLDER,
    GRACE_CITATION,
    GRACE_CONFIG_FILE,
    TRAINING_INFO_FILE,
    folder_revision,
)
from grace_st.backbone import resolve_backbone
from grace_st.diagnostics import RationaleStats
from grace_st.evaluation.local_tasks import EVAL_EXTRA, load_task_spec, resolve_tasks
from grace_st.evaluation.quickeval import encode as encode_with_stats
from grace_st.factory import PROMPTEOL_OPTIONS
from grace_st.model.options import TRANSFORMER_RULES
from grace_st.model_kind import folder_kind, folder_parameters, is_grace_model
from grace_st.readers import read_json
from grace_st.tables import format_cell, markdown_table

try:
    import mteb
    from mteb.abstasks import AbsTask
    from mteb.models import ModelMeta, SentenceTransformerEncoderWrapper
except ImportError as error:  # pragma: no cover - the eval extra is installed in development
    raise ImportError(
        f"grace_st.evaluation.mteb_evaluation needs mteb; install the eval extra: {EVAL_EXTRA}"
    ) from error

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

DEFAULT_BASELINE_MAX_NEW_TOKENS = 32
# Transformer options of free text (prompts, suffixes) are hashed in result keys; choices and numbers stay readable.
FREE_TEXT_OPTIONS: tuple[str, ...] = tuple(
    name
    for name, (types, _, allowed) in TRANSFORMER_RULES.items()
    if types == (str,) and not allowed.startswith("one of")
)

__all__ = [
    "GraceEncoder",
    "ModelEvaluation",
    "ModelSpec",
    "build_model_meta",
    "comparison_table",
    "evaluate_model",
    "load_encoder",
    "load_model",
    "load_task_spec",
    "resolve_tasks",
    "standard_rows",
]


# ---------------------------------------- models
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model of a comparison: what to load and which GRACE options to override.

    Attributes:
        name_or_path: a GRACE folder, a SentenceTransformer folder or Hub id, a causal LM folder or Hub id (made into
            GRACE with :func:`grace_st.from_backbone`), or ``"default"`` (:func:`grace_st.resolve_backbone`).
        label: row label in tables; defaults to the model name plus its overrides.
        options: GRACE :class:`grace_st.Transformer` options to override (``rationale_mode``, ``max_new_tokens``...).
        revision: Hub revision for Hub ids.
    """

    name_or_path: str
    label: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """Parse ``[LABEL=]NAME_OR_PATH[@KEY=VALUE[,KEY=VALUE...]]``.

        Example:
            >>> spec = ModelSpec.parse("echo=default@rationale_mode=echo,max_new_tokens=32")
            >>> spec.label, spec.name_or_path, spec.options
            ('echo', 'default', (('max_new_tokens', 32), ('rationale_mode', 'echo')))
        """
        head, _, tail = text.partition("@")
        label, _, target = head.rpartition("=")
        if not target:
            raise ValueError(f"Model spec {text!r} names no model; expected [LABEL=]NAME_OR_PATH[@KEY=VALUE,...].")
        options = {}
        for item in filter(None, tail.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"Option {item!r} in model spec {text!r} is not KEY=VALUE.")
            options[key.strip()] = _parse_value(value.strip())
        return cls(target, label or None, tuple(sorted(options.items())))

    def display_name(self, meta: ModelMeta | None = None) -> str:
        """The row label: :attr:`label`, else the model name with its overrides."""
        if self.label:
            return self.label
        base = meta.name if meta is not None and meta.name else self.name_or_path
        if self.options:
            return f"{base} ({', '.join(f'{k}={v}' for k, v in self.options)})"
        return base


def _parse_value(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _transformer_defaults() -> dict[str, Any]:
    """Every saved option of :class:`grace_st.Transformer` with its default."""
    from grace_st.model import Transformer

    parameters = inspect.signature(Transformer.__init__).parameters
    return {key: parameters[key].default for key in Transformer.config_keys if key in parameters}


def _resolve_folder(spec: ModelSpec) -> tuple[Path, str | None]:
    """Local folder of the model and its Hub commit (None for local folders)."""
    name = resolve_backbone(spec.name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve(), None
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(name, revision=spec.revision))
    return folder, folder.name


def _short_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _experiment_kwargs(kind: str, options: dict[str, Any]) -> dict[str, Any] | None:
    """mteb ``experiment_kwargs`` of a model: the part of the result cache key mteb cannot see in the folder.

    A GRACE folder's saved settings are in its revision (a hash of its files), so only overrides count. A backbone is
    not a GRACE model until settings are chosen: every effective setting (code defaults included) is hashed into
    ``settings``, beside the readable mode and length, so results of other defaults are never reused.
    """
    experiment: dict[str, Any] = dict(options)
    for name in FREE_TEXT_OPTIONS:
        if name in experiment:
            experiment[name] = _short_hash(experiment[name])
    if kind == "backbone":
        effective = {**_transformer_defaults(), **options}
        experiment = {
            "grace": True,
            "rationale_mode": effective["rationale_mode"],
            "max_new_tokens": effective["max_new_tokens"],
            **experiment,
            "settings": _short_hash({"pooling_mode": "mean", **effective}),
        }
    return experiment or None


def build_model_meta(spec: ModelSpec, folder: Path, hub_commit: str | None = None, **overrides: Any) -> ModelMeta:
    """mteb ``ModelMeta`` of a model folder, from its files only (the model is not loaded).

    Name: the Hub id, ``grace_model_name`` in ``grace_training.json`` if the folder has one, else ``local/<folder>``;
    backbones turned into GRACE keep the backbone's name and record the GRACE settings as experiment settings.
    Revision: the Hub commit, else :func:`grace_st.artifacts.folder_revision`. See :func:`_experiment_kwargs` for the
    experiment settings that separate each variant (echo, none, another length) in the results folder.

    Args:
        spec: the model spec.
        folder: its local folder.
        hub_commit: the commit when loaded from the Hub.
        **overrides: ``ModelMeta`` fields to set (``name``, ``license``, ``training_datasets``...).

    Raises:
        ValueError: GRACE options for a model that is not GRACE, or unknown option names (with the valid ones).
    """
    kind = folder_kind(folder)
    config = read_json(folder / "config.json")
    st_config = read_json(folder / "config_sentence_transformers.json")
    grace_config = read_json(folder / GRACE_CONFIG_FILE)
    training = read_json(folder / TRAINING_INFO_FILE)
    n_parameters, n_bytes = folder_parameters(folder)
    options = dict(spec.options)
    if options and kind == "sentence-transformers":
        raise ValueError(
            f"GRACE options {sorted(options)} given for {spec.name_or_path!r}, which is not a GRACE model."
        )
    valid = list(_transformer_defaults()) + (["pooling_mode"] if kind == "backbone" else [])
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"Unknown GRACE option(s) {unknown}; valid: {valid}.")

    backbone_name = config.get("_name_or_path") or None
    if hub_commit is not None:
        name = spec.name_or_path
    elif kind == "backbone":
        name = backbone_name if backbone_name and "/" in backbone_name else f"local/{folder.name}"
    else:
        name = training.get("grace_model_name") or f"local/{folder.name}"
    is_grace = kind != "sentence-transformers"
    embed_dim = config.get("hidden_size")
    if not is_grace:
        embed_dim = read_json(folder / "1_Pooling" / "config.json").get("word_embedding_dimension") or embed_dim
    prompts = {k: v for k, v in (st_config.get("prompts") or {}).items() if v}
    fields: dict[str, Any] = dict(
        loader=load_encoder,
        loader_kwargs={"model_spec": spec},
        name=name,
        revision=hub_commit or folder_revision(folder),
        release_date=None,
        languages=["eng-Latn"],
        n_parameters=n_parameters,
        memory_usage_mb=round(n_bytes / 2**20, 1) if n_bytes else None,
        max_tokens=grace_config.get("max_input_tokens", _transformer_defaults()["max_input_tokens"])
        if is_grace
        else None,
        embed_dim=embed_dim,
        license=training.get("license"),
        open_weights=True,
        public_training_code=training.get("public_training_code"),
        public_training_data=training.get("public_training_data"),
        framework=["Sentence Transformers", "PyTorch"],
        reference=f"https://huggingface.co/{name}" if hub_commit else None,
        similarity_fn_name=st_config.get("similarity_fn_name") or "cosine",
        use_instructions=bool(prompts),
        training_datasets=set(training["training_datasets"]) if "training_datasets" in training else None,
        adapted_from=training.get("base_model") or (backbone_name if kind == "backbone" else None),
        citation=GRACE_CITATION if is_grace else None,
        experiment_kwargs=_experiment_kwargs(kind, options),
    )
    if kind == "backbone":
        fields["training_datasets"] = set()  # an untrained GRACE model: nothing beyond the backbone's own training
    fields.update(overrides)
    return ModelMeta(**fields)


def load_model(spec: ModelSpec, device: str | None = None) -> SentenceTransformer:
    """Load the SentenceTransformer of a :class:`ModelSpec`, with its GRACE options applied.

    Args:
        spec: what to load.
        device: ``"cpu"``, ``"cuda"``...; None lets sentence-transformers choose.

    Returns:
        The model (GRACE folders load with ``trust_remote_code=True``: their module classes live outside
        sentence-transformers).

    Raises:
        ValueError: options for a model that is not GRACE, or option names its module does not know.
    """
    from sentence_transformers import SentenceTransformer

    from grace_st.factory import from_backbone

    folder, _ = _resolve_folder(spec)
    kind = folder_kind(folder)
    options = dict(spec.options)
    if kind == "backbone":
        return from_backbone(str(folder), device=device, **options)
    model = SentenceTransformer(str(folder), device=device, trust_remote_code=kind == "grace")
    if options:
        first = model[0]
        valid = list(getattr(first, "config_keys", []))
        unknown = sorted(set(options) - set(valid))
        if not is_grace_model(model) or unknown:
            raise ValueError(f"Options {sorted(options)} cannot be applied to {spec.name_or_path!r}; valid: {valid}.")
        # A new module from the merged settings, so the module's own validation runs on them.
        module = type(first)(first.model, first.tokenizer, **{**first.get_config_dict(), **options})
        model[0] = module
        module.on_model_ready(model)
    return model


def load_encoder(model_name: str, revision: str | None = None, model_spec: ModelSpec | None = None, **kwargs):
    """mteb loader (``ModelMeta.loader``): the encoder of a model name or spec (:class:`GraceEncoder` for GRACE).

    Args:
        model_name: a name or path, used when ``model_spec`` is None.
        revision: Hub revision.
        model_spec: the spec (with its GRACE options).
        **kwargs: ``device``; mteb also passes the experiment settings, which the spec already holds.
    """
    spec = model_spec or ModelSpec(model_name, revision=revision)
    folder, commit = _resolve_folder(spec)
    return make_encoder(load_model(spec, device=kwargs.get("device")), build_model_meta(spec, folder, commit))


def make_encoder(model: SentenceTransformer, meta: ModelMeta):
    """mteb's ``SentenceTransformerEncoderWrapper`` for ``model`` (a :class:`GraceEncoder` for GRACE models).

    The metadata is mteb's ``ModelMeta.from_sentence_transformer_model`` of the loaded model, completed and
    overridden by ``meta`` (name, revision and experiment settings decide where results go).
    """
    if is_grace_model(model):
        return GraceEncoder(model, meta)
    with _mteb_meta_warnings():
        encoder = SentenceTransformerEncoderWrapper(model)
    encoder.mteb_model_meta = encoder.mteb_model_meta.merge(meta)
    return encoder


@contextlib.contextmanager
def _mteb_meta_warnings() -> Iterator[None]:
    """Silence what mteb 2.26's meta builder warns about its own calls, which users cannot act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The `get_sentence_embedding_dimension` method", FutureWarning)
        warnings.filterwarnings("ignore", "The fill_missing parameter is deprecated", DeprecationWarning)
        yield


class GraceEncoder(SentenceTransformerEncoderWrapper):
    """mteb's SentenceTransformer wrapper for GRACE models: one rationale per distinct text of a task, measured.

    Texts go through :func:`grace_st.evaluation.quickeval.encode` (that is, :func:`grace_st.encoding.encode_corpus`),
    at most
    ``chunk_size`` at a time; a text met again in the same task (a sentence in several pairs, a document in train and
    test) reuses its embedding. Rationale diagnostics accumulate in :attr:`stats` by task name. Prompts are resolved
    as mteb resolves them for any SentenceTransformer.

    Args:
        model: a GRACE SentenceTransformer.
        meta: its mteb ``ModelMeta`` (see :func:`build_model_meta`).
        chunk_size: texts per encoding call; bounds the memory of one call. Defaults to 256.
    """

    def __init__(self, model: SentenceTransformer, meta: ModelMeta, chunk_size: int = 256) -> None:
        if not is_grace_model(model):
            raise ValueError("GraceEncoder needs a GRACE model; use mteb's SentenceTransformerEncoderWrapper.")
        with _mteb_meta_warnings():
            super().__init__(model)
        self.mteb_model_meta = self.mteb_model_meta.merge(meta)
        self.chunk_size = chunk_size
        self.stats: dict[str, RationaleStats] = {}
        self._task: str | None = None
        self._seen: dict[tuple[str | None, str], np.ndarray] = {}

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
        if task_metadata.name != self._task:
            self._task, self._seen = task_metadata.name, {}
        name = self.get_prompt_name(task_metadata, prompt_type) if self.model_prompts else None
        prompt = self.model_prompts.get(name) if name else None
        texts = [text for batch in inputs for text in batch["text"]]
        missing = list(dict.fromkeys(t for t in texts if (prompt, t) not in self._seen))
        batch_size = int(kwargs.get("batch_size", 32))
        stats = self.stats.setdefault(task_metadata.name, RationaleStats())
        for start in range(0, len(missing), self.chunk_size):
            chunk = missing[start : start + self.chunk_size]
            encoded = encode_with_stats(self.model, chunk, batch_size=batch_size, prompt=prompt)
            self.stats[task_metadata.name] = stats = stats.merge(encoded.stats)
            for text, embedding in zip(chunk, encoded.embeddings, strict=True):
                self._seen[(prompt, text)] = embedding
        if not texts:
            return np.empty((0, self.model.get_embedding_dimension() or 0), dtype=np.float32)
        return np.stack([self._seen[(prompt, text)] for text in texts])


# ---------------------------------------- running
@dataclasses.dataclass
class ModelEvaluation:
    """Results of one model on some tasks: one row of a comparison table.

    Attributes:
        label: row label.
        meta: the model's mteb ``ModelMeta``.
        results: mteb ``TaskResult`` per task name.
        stats: rationale diagnostics per task name (GRACE models only).
        reused: task names whose results came from the output folder instead of being computed.
        seconds: wall time of this evaluation.
    """

    label: str
    meta: Any
    results: dict[str, Any]
    stats: dict[str, RationaleStats]
    reused: list[str]
    seconds: float = 0.0

    def score(self, task: str) -> float | None:
        """Main score of ``task`` (mean over evaluated splits and subsets), or None if not evaluated."""
        result = self.results.get(task)
        return float(result.get_score()) if result is not None else None

    def total_stats(self) -> RationaleStats | None:
        """Diagnostics summed over all tasks (None without any)."""
        if not self.stats:
            return None
        total = RationaleStats()
        for stats in self.stats.values():
            total = total.merge(stats)
        return total


def _diagnostics_path(cache: Any, task_name: str, meta: ModelMeta) -> Path:
    result_path = cache.get_task_result_path(task_name=task_name, model_name=meta)
    return result_path.parent / DIAGNOSTICS_FOLDER / f"{task_name}.json"


def evaluate_model(
    spec: ModelSpec | str,
    tasks: Sequence[AbsTask],
    output_dir: str | os.PathLike,
    batch_size: int = 16,
    device: str | None = None,
    overwrite: bool = False,
    meta_overrides: dict[str, Any] | None = None,
) -> ModelEvaluation:
    """Evaluate one model on tasks with ``mteb.evaluate`` and mteb's results layout under ``output_dir``.

    Results go to ``output_dir/results/<model name>/<revision>/[experiments/<settings>/]<task>.json`` (with
    ``model_meta.json``), rationale diagnostics beside them in ``grace_diagnostics/<task>.json``. A task whose
    finished results are there for the same dataset revision is reused; when every task is reused the model is not
    even loaded.

    Args:
        spec: the model (a :class:`ModelSpec` or its string form, see :meth:`ModelSpec.parse`).
        tasks: mteb tasks (see :func:`grace_st.evaluation.local_tasks.resolve_tasks`).
        output_dir: results root (an mteb ``ResultCache`` folder).
        batch_size: encode batch size. Defaults to 16.
        device: torch device; None lets sentence-transformers choose.
        overwrite: recompute even when results exist. Defaults to False.
        meta_overrides: ``ModelMeta`` fields to set (e.g. ``{"name": "org/model"}``).

    Returns:
        A :class:`ModelEvaluation`.
    """
    tick = time.perf_counter()
    spec = ModelSpec.parse(spec) if isinstance(spec, str) else spec
    folder, commit = _resolve_folder(spec)
    meta = build_model_meta(spec, folder, commit, **(meta_overrides or {}))
    cache = mteb.ResultCache(cache_path=output_dir)
    results: dict[str, Any] = {}
    stats: dict[str, RationaleStats] = {}
    pending = []
    for task in tasks:
        name = task.metadata.name
        existing = None if overwrite else cache.load_task_result(name, meta)
        # mteb reuses a complete result whatever its dataset revision; a local spec's revision hashes its data.
        if (
            existing is not None
            and existing.dataset_revision == task.metadata.revision
            and not existing.get_missing_evaluations(task)
        ):
            results[name] = existing
            saved = read_json(_diagnostics_path(cache, name, meta))
            if saved.get("stats"):
                stats[name] = RationaleStats.from_dict(saved["stats"])
            continue
        pending.append(task)
    reused = list(results)
    if pending:
        logger.info("Evaluating %s on %s", meta.name, [t.metadata.name for t in pending])
        encoder = make_encoder(load_model(spec, device=device), meta)
        run = mteb.evaluate(
            encoder,
            pending,
            cache=cache,
            overwrite_strategy="always",
            encode_kwargs={"batch_size": batch_size, "show_progress_bar": False},
            show_progress_bar=False,
            co2_tracker=False,
        )
        for result in run.task_results:
            results[result.task_name] = result
        encoder_stats = getattr(encoder, "stats", {})
        for task in pending:
            name = task.metadata.name
            if name in encoder_stats:
                stats[name] = encoder_stats[name]
            # Beside mteb's result: the task facts a model card needs (local tasks are not in mteb's registry) and
            # the rationale diagnostics.
            sidecar = {
                "task": {
                    "type": task.metadata.type,
                    "dataset": task.metadata.dataset["path"],
                    "revision": task.metadata.revision,
                    "main_score": task.metadata.main_score,
                    "description": task.metadata.description,
                },
                "stats": stats[name].to_dict() if name in stats else None,
            }
            path = _diagnostics_path(cache, name, meta)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    ordered = {t.metadata.name: results[t.metadata.name] for t in tasks if t.metadata.name in results}
    return ModelEvaluation(
        label=spec.display_name(meta),
        meta=meta,
        results=ordered,
        stats=stats,
        reused=reused,
        seconds=time.perf_counter() - tick,
    )


def standard_rows(
    backbone: str = "default",
    max_new_tokens: int = DEFAULT_BASELINE_MAX_NEW_TOKENS,
    trained: str | None = None,
    contrastive: str | None = None,
    **options: Any,
) -> list[ModelSpec]:
    """The comparison rows every GRACE table shows (issue 7), as model specs.

    Args:
        backbone: the backbone (folder, Hub id or ``"default"``).
        max_new_tokens: rationale length limit of the untrained GRACE row (and of ``trained`` if given).
            Defaults to 32.
        trained: folder of the trained GRACE model, if any.
        contrastive: folder of the contrastively fine-tuned (+CL) model, if any.
        **options: further GRACE options for the backbone rows (``system_prompt``...).

    Returns:
        no-rationale, echo, PromptEOL (``grace_st.factory.PROMPTEOL_OPTIONS``), untrained GRACE, then +CL and
        trained GRACE when given.
    """
    generate = tuple(sorted({**options, "max_new_tokens": max_new_tokens}.items()))
    rows = [
        ModelSpec(backbone, "no rationale", tuple(sorted({**options, "rationale_mode": "none"}.items()))),
        ModelSpec(backbone, "echo", tuple(sorted({**options, "rationale_mode": "echo"}.items()))),
        ModelSpec(backbone, "PromptEOL", tuple(sorted(PROMPTEOL_OPTIONS.items()))),
        ModelSpec(
            backbone, "untrained GRACE", tuple(sorted({**dict(generate), "rationale_mode": "generate"}.items()))
        ),
    ]
    if contrastive:
        rows.append(ModelSpec(contrastive, "contrastive (+CL)"))
    if trained:
        rows.append(ModelSpec(trained, "trained GRACE", generate))
    return rows


def baseline_options(spec: ModelSpec) -> dict[str, Any]:
    """The ``system_prompt`` and ``max_new_tokens`` of a GRACE model (saved settings, then the spec's overrides).

    The cheap baseline rows of a comparison use them, so untrained GRACE writes rationales from the same prompt and
    under the same limit as the model under test. Empty for other models and Hub ids (nothing is downloaded).
    """
    path = Path(spec.name_or_path).expanduser()
    if not path.is_dir() or folder_kind(path) != "grace":
        return {}
    saved = {**read_json(path / GRACE_CONFIG_FILE), **dict(spec.options)}
    return {key: saved[key] for key in ("system_prompt", "max_new_tokens") if key in saved}


# ---------------------------------------- tables
def comparison_table(rows: Sequence[ModelEvaluation], tasks: Iterable[str] | None = None) -> str:
    """Markdown table: one row per model, main scores (x100) per task, their average and rationale diagnostics.

    Args:
        rows: evaluated models, in display order; add rows by evaluating more :class:`ModelSpec` s.
        tasks: task columns; defaults to every task of any row, in first-seen order.

    Returns:
        A :func:`grace_st.tables.markdown_table`; "–" marks a task a row was not evaluated on (and then its average)
        and diagnostics a model does not have (see :class:`grace_st.diagnostics.RationaleStats`).
    """
    if tasks is None:
        tasks = list(dict.fromkeys(name for row in rows for name in row.results))
    tasks = list(tasks)
    header = ["model", *tasks, "avg", "copy rate", "mean length", "finish rate", "s/text"]
    body = []
    for row in rows:
        scores = [row.score(task) for task in tasks]
        average = sum(scores) / len(scores) if scores and None not in scores else None
        total = row.total_stats() or RationaleStats()
        body.append(
            [
                row.label,
                *(format_cell(score, 2, 100) for score in scores),
                format_cell(average, 2, 100),
                format_cell(total.copy_rate, 2),
                format_cell(total.mean_length, 1),
                format_cell(total.finish_rate, 2),
                format_cell(total.seconds_per_text, 3),
            ]
        )
    return markdown_table(header, body)
