"""Corpus encoding past one machine, on Ray Data: an actor pool where each actor holds one loaded model and encodes
its batches with :func:`grace_st.encoding.encode_corpus`; output shards that are complete or absent, so a rerun
resumes; Ray's retries when an actor or a node dies.

::

    from grace_st.encoding.distributed import encode_corpus_on_ray, read_encoded

    summary = encode_corpus_on_ray("runs/grace-sick", "corpus.parquet", "encoded/", num_workers=2)
    print(summary.line())
    result = read_encoded("encoded/")  # numpy arrays in input order
    result.embeddings  # (n, dim) float32

The output folder holds ``manifest.json`` (model, revision, :func:`grace_st.encoding.model_fingerprint`, grace_st
version, row counts) and ``part-<hash of its ids>.parquet`` shards with the columns ``id``, ``position`` (the row's
position in the input), ``embedding`` (fixed-size float32 list), ``rationale`` and ``finished``. A shard is written
under a temporary name and renamed, so it is complete or absent; it is named by the ids it holds, so a batch that Ray
retries after its actor died rewrites the same shard instead of adding a second copy. Ray, and this module, need the
``distributed`` extra: ``pip install "grace-st[distributed]"``.

GRACE embeddings need the last-layer states of the generated tokens, which Ray Data's LLM processors (vLLM) do not
return; so each actor runs grace_st's own generation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from grace_st.model import __version__

logger = logging.getLogger(__name__)

OUTPUT_FORMAT = "grace-st-encoded-corpus-1"
MANIFEST = "manifest.json"
INPUT_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}
_FINGERPRINT_KEY = b"grace_st.fingerprint"
_SHARD = re.compile(r"part-[0-9a-f]{40}\.parquet")
_TEMPORARY = re.compile(r"\.(part-[0-9a-f]{40}\.parquet|manifest\.json)\.[0-9a-f]{32}\.tmp")
_EXTRA = 'pip install "grace-st[distributed]"'


def _require_ray():
    """Import Ray (with Ray Data) and pyarrow, or raise an ImportError that names the extra."""
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        raise ImportError(f"Encoding on Ray needs the distributed extra: {_EXTRA} ({error})") from error
    return ray


# ------------------------------------------------------------------------------------------------------------ input
@dataclass
class CorpusInput:
    """The validated input: one row per text, in input order.

    Attributes:
        table: a pyarrow table with the columns ``id`` (int64 or string), ``position`` (int64) and ``text``.
        files: the files read, in order.
        id_source: ``"column <name>"`` or ``"row position"`` (0-based, over the files in this order).
    """

    table: Any
    files: list[str]
    id_source: str


def _input_files(input: str | os.PathLike | Iterable[str | os.PathLike]) -> list[tuple[Any, str, str, str]]:
    """``(filesystem, path, display name, format)`` of each input file; a folder gives its files in name order."""
    from pyarrow import fs as pafs

    items = [input] if isinstance(input, (str, os.PathLike)) else list(input)
    if not items:
        raise ValueError("input is an empty list; give a file, a folder or a list of files.")
    found = []
    for item in items:
        name = os.fspath(item)
        if "://" in name:
            filesystem, path = pafs.FileSystem.from_uri(name)
        else:
            filesystem, path = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(name))
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input {name!r} does not exist.")
        if info.type == pafs.FileType.Directory:
            entries = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
            files = sorted(
                e.path
                for e in entries
                if e.type == pafs.FileType.File
                and not e.base_name.startswith((".", "_"))
                and Path(e.base_name).suffix.lower() in INPUT_FORMATS
            )
            if not files:
                raise ValueError(f"input folder {name!r} holds no {sorted(INPUT_FORMATS)} files.")
            prefix = name.rstrip("/")
            found += [
                (filesystem, f, f"{prefix}/{Path(f).name}", INPUT_FORMATS[Path(f).suffix.lower()]) for f in files
            ]
        else:
            suffix = Path(path).suffix.lower()
            if suffix not in INPUT_FORMATS:
                raise ValueError(f"input file {name!r} has suffix {suffix!r}; allowed: {sorted(INPUT_FORMATS)}.")
            found.append((filesystem, path, name, INPUT_FORMATS[suffix]))
    return found


def _read_file(filesystem, path: str, name: str, fmt: str, text_column: str, id_name: str) -> tuple[list, list | None]:
    """The texts and ids (None without an id column) of one file; errors name the file, row and column."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "jsonl":
        return _read_jsonl(filesystem, path, name, text_column, id_name)
    if fmt == "parquet":
        table = pq.read_table(path, filesystem=filesystem)
    else:  # csv: the text column is text even where it looks like numbers
        with filesystem.open_input_stream(path) as stream:
            table = pacsv.read_csv(
                stream, convert_options=pacsv.ConvertOptions(column_types={text_column: pa.string()})
            )
    if text_column not in table.column_names:
        raise ValueError(
            f"{name}: no text column {text_column!r}; its columns: {table.column_names}. Name the text column with "
            "text_column= (--text-column)."
        )
    if not table.num_rows:  # an empty file has no column types to check (CSV infers "null")
        return [], ([] if id_name in table.column_names else None)
    columns = [(text_column, "text")] + ([(id_name, "id")] if id_name in table.column_names else [])
    for column, what in columns:
        values = table[column]
        allowed = pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
        if what == "id":
            allowed = allowed or pa.types.is_integer(values.type)
        if not allowed:
            kinds = "strings" if what == "text" else "integers or strings"
            raise ValueError(f"{name}: column {column!r} has type {values.type}; {what}s must be {kinds}.")
        if values.null_count:
            row = pc.index(pc.is_null(values), True).as_py()
            raise ValueError(f"{name}, row {row}: the {what} (column {column!r}) is null; every row needs one.")
    ids = table[id_name].to_pylist() if id_name in table.column_names else None
    return table[text_column].to_pylist(), ids


def _read_jsonl(filesystem, path: str, name: str, text_column: str, id_name: str) -> tuple[list, list | None]:
    texts, ids, has_id = [], [], None
    with filesystem.open_input_stream(path) as stream:
        lines = stream.read().decode("utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}, line {number} (row {len(texts)})"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error}).") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: a JSON object is needed, got {type(record).__name__}.")
        if text_column not in record:
            raise ValueError(
                f"{where}: no text column {text_column!r}; its keys: {sorted(record)}. Name the text column with "
                "text_column= (--text-column)."
            )
        text = record[text_column]
        if not isinstance(text, str):
            raise ValueError(f"{where}: the text (column {text_column!r}) is {text!r}, not a string.")
        if has_id is None:
            has_id = id_name in record
        elif has_id != (id_name in record):
            raise ValueError(f"{where}: the id column {id_name!r} is in some rows of this file and not in others.")
        if has_id:
            value = record[id_name]
            if value is None or isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError(
                    f"{where}: the id (column {id_name!r}) is {value!r}; ids must be integers or strings."
                )
            ids.append(value)
        texts.append(text)
    return texts, (ids if has_id else None)


def _where(spans: list[tuple[str, int]], position: int) -> str:
    """``"<file>, row <r>"`` of the row at ``position`` of the whole input."""
    name, start = next((name, start) for name, start in reversed(spans) if start <= position)
    return f"{name}, row {position - start}"


def read_corpus_input(
    input: str | os.PathLike | Iterable[str | os.PathLike], text_column: str = "text", id_column: str | None = None
) -> CorpusInput:
    """Read and check the texts and ids of Parquet, JSONL or CSV files (local paths or any filesystem pyarrow reads).

    Args:
        input: a file, a folder (its ``.parquet``/``.pq``/``.jsonl``/``.json``/``.csv`` files in name order) or a
            list of them.
        text_column: the column of the texts. Defaults to ``"text"``.
        id_column: the column of the ids (integers or strings, unique). Defaults to None: ``"id"`` where every file
            has it, else each row's 0-based position in the input (recorded as the id source).

    Returns:
        A :class:`CorpusInput`.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a missing text or id column, a null or non-string text, a null or duplicate id, an empty input;
            the message names the file, row (0-based, without a header) and column.
    """
    import pyarrow as pa

    if not isinstance(text_column, str) or not text_column:
        raise ValueError(f"text_column={text_column!r} must be a column name.")
    if id_column is not None and (not isinstance(id_column, str) or not id_column):
        raise ValueError(f"id_column={id_column!r} must be a column name or None (ids from 'id' or row positions).")
    id_name = id_column or "id"
    files = _input_files(input)
    texts: list[str] = []
    ids: list = []
    with_ids: list[str] = []
    without_ids: list[str] = []
    spans: list[tuple[str, int]] = []  # (file, position of its first row)
    for filesystem, path, name, fmt in files:
        file_texts, file_ids = _read_file(filesystem, path, name, fmt, text_column, id_name)
        if file_ids is None:
            if id_column is not None:
                raise ValueError(
                    f"{name}: no id column {id_column!r}. Name the id column with id_column= (--id-column)."
                )
            without_ids.append(name)
        else:
            with_ids.append(name)
            ids += file_ids
        if with_ids and without_ids:
            raise ValueError(
                f"the id column {id_name!r} is in {with_ids[0]} but not in {without_ids[0]}; every file needs it, or "
                "none (then ids are row positions)."
            )
        spans.append((name, len(texts)))
        texts += file_texts
    names = [name for _, _, name, _ in files]
    if not texts:
        raise ValueError(f"the input holds no rows: {names}.")
    if without_ids:
        id_array = pa.array(range(len(texts)), pa.int64())
        id_source = "row position"
    else:
        kinds = {type(value) for value in ids}
        if len(kinds) > 1:
            first = next(i for i, value in enumerate(ids) if type(value) is not type(ids[0]))
            raise ValueError(
                f"{_where(spans, first)}: the id {ids[first]!r} is a {type(ids[first]).__name__}, earlier ids are "
                f"{type(ids[0]).__name__}s; ids must be all integers or all strings."
            )
        seen: dict = {}
        for position, value in enumerate(ids):
            if value in seen:
                raise ValueError(
                    f"the id {value!r} appears twice: {_where(spans, seen[value])} and "
                    f"{_where(spans, position)} (column {id_name!r}); ids must be unique."
                )
            seen[value] = position
        id_array = pa.array(ids, pa.string() if isinstance(ids[0], str) else pa.int64())
        id_source = f"column {id_name}"
    table = pa.table(
        {"id": id_array, "position": pa.array(range(len(texts)), pa.int64()), "text": pa.array(texts, pa.string())}
    )
    return CorpusInput(table=table, files=names, id_source=id_source)


# ----------------------------------------------------------------------------------------------------------- output
def _write_atomically(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, then rename it to ``path``: a
    reader, or a later run, sees the whole file or none."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_manifest(folder: Path, manifest: dict) -> None:
    _write_atomically(folder / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode() + b"\n"))


def _scan_output(folder: Path) -> tuple[dict | None, list[Path], list[Path]]:
    """``(manifest or None, shards, temporary files of killed runs)`` of an output folder.

    Raises:
        ValueError: the folder holds files this encoder did not write (nothing is changed), or shards without a
            manifest, or a manifest of another format.
    """
    if not folder.exists():
        return None, [], []
    if not folder.is_dir():
        raise ValueError(f"output {str(folder)!r} is a file; give a folder (new, or one this encoder wrote).")
    names = sorted(p.name for p in folder.iterdir())
    foreign = [n for n in names if n != MANIFEST and not _SHARD.fullmatch(n) and not _TEMPORARY.fullmatch(n)]
    if foreign:
        raise ValueError(
            f"output folder {str(folder)!r} holds files this encoder did not write: {foreign[:5]}"
            f"{' ...' if len(foreign) > 5 else ''}; nothing was written. Choose a new or empty folder."
        )
    shards = [folder / n for n in names if _SHARD.fullmatch(n)]
    temporary = [folder / n for n in names if _TEMPORARY.fullmatch(n)]
    if MANIFEST not in names:
        if shards:
            raise ValueError(f"output folder {str(folder)!r} holds shards but no {MANIFEST}; nothing was written.")
        return None, [], temporary
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder / MANIFEST} cannot be read ({error}); nothing was written.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != OUTPUT_FORMAT:
        raise ValueError(
            f"{folder / MANIFEST} was not written by this encoder (format {OUTPUT_FORMAT!r} expected); nothing was "
            "written. Choose a new or empty folder."
        )
    return manifest, shards, temporary


def _read_shards(shards: list[Path], fingerprint: str | None, columns: list[str] | None = None):
    """The rows of ``shards`` as one pyarrow table; each shard must carry ``fingerprint`` (None: any)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for shard in shards:
        try:
            table = pq.read_table(shard, columns=columns)
        except (OSError, pa.ArrowException) as error:
            raise ValueError(f"shard {shard} cannot be read ({error}).") from None
        found = (pq.read_schema(shard).metadata or {}).get(_FINGERPRINT_KEY, b"").decode()
        if fingerprint is not None and found != fingerprint:
            raise ValueError(
                f"shard {shard} was written by a model with fingerprint {found!r}, the manifest's is {fingerprint!r}."
            )
        tables.append(table)
    return pa.concat_tables(tables) if tables else None


def _shard_name(ids: list) -> str:
    """A shard's name follows from the ids it holds: Ray's retry of a batch rewrites the same file."""
    return f"part-{hashlib.blake2b(json.dumps(ids).encode(), digest_size=20).hexdigest()}.parquet"


def _shard_table(batch, corpus, fingerprint: str):
    """The shard of an encoded batch: ``id``, ``position``, ``embedding``, ``rationale``, ``finished``."""
    import pyarrow as pa

    embeddings = np.ascontiguousarray(corpus.embeddings, dtype=np.float32)
    table = pa.table(
        {
            "id": batch["id"],
            "position": batch["position"],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), embeddings.shape[1]),
            "rationale": pa.array(corpus.rationales, pa.string()),
            "finished": pa.array(corpus.finished, pa.bool_()),
        }
    )
    return table.replace_schema_metadata({_FINGERPRINT_KEY: fingerprint.encode()})


# ------------------------------------------------------------------------------------------------------- the actors
def _load_model(model: str, revision: str | None, device: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model, trust_remote_code=True, revision=revision, device=device)


def _probe(model: str, revision: str | None, device: str, prompt: str | None, prompt_name: str | None) -> dict:
    """Load the model once where the actors will run: its fingerprint, prompt and dimension, or a clear error."""
    from grace_st.encoding.cache import model_fingerprint
    from grace_st.encoding.corpus import resolve_prompt
    from grace_st.model_kind import is_grace_model

    try:
        loaded = _load_model(model, revision, device)
    except Exception as error:  # any loading failure (missing folder, bad config, network): one clear message
        raise ValueError(
            f"the model {model!r} (revision {revision!r}) cannot be loaded on {device}: "
            f"{type(error).__name__}: {error}"
        ) from None
    if not is_grace_model(loaded):
        raise ValueError(f"the model {model!r} is not a GRACE model (its first module is {type(loaded[0]).__name__}).")
    if loaded[0].num_rationales != 1:
        raise ValueError(f"the model {model!r} writes num_rationales={loaded[0].num_rationales}; only 1 is supported.")
    prompt = resolve_prompt(loaded, prompt, prompt_name)
    return {
        "fingerprint": model_fingerprint(loaded, prompt),
        "prompt": prompt,
        "dim": loaded.get_embedding_dimension(),
    }


class _ShardEncoder:
    """A Ray Data actor: loads the model once, then encodes each batch with ``encode_corpus`` and writes it as one
    shard. Returns one summary row per batch (shard name, rows, start and end time, process id, node id)."""

    def __init__(
        self,
        model: str,
        revision: str | None,
        device: str,
        threads: int,
        output: str,
        fingerprint: str,
        prompt: str | None,
        normalize_embeddings: bool,
        batch_size: int,
    ) -> None:
        import torch

        from grace_st.encoding.cache import model_fingerprint

        # One torch thread per CPU this actor holds (Ray sets OMP_NUM_THREADS alike): actors do not oversubscribe.
        torch.set_num_threads(threads)
        self.model = _load_model(model, revision, device)
        found = model_fingerprint(self.model, prompt)
        if found != fingerprint:  # e.g. a node with other library versions or another device type
            raise RuntimeError(f"this actor's model has fingerprint {found}, the run's is {fingerprint}.")
        self.output = Path(output)
        self.fingerprint = fingerprint
        self.prompt = prompt
        self.normalize_embeddings = normalize_embeddings
        self.batch_size = batch_size

    def __call__(self, batch):
        import pyarrow as pa
        import pyarrow.parquet as pq
        import ray

        from grace_st.encoding.corpus import encode_corpus

        start = time.time()
        corpus = encode_corpus(
            self.model,
            batch["text"].to_pylist(),
            batch_size=self.batch_size,
            prompt=self.prompt,
            normalize_embeddings=self.normalize_embeddings,
        )
        table = _shard_table(batch, corpus, self.fingerprint)
        name = _shard_name(batch["id"].to_pylist())
        _write_atomically(self.output / name, lambda handle: pq.write_table(table, handle))
        return pa.table(
            {
                "shard": [name],
                "rows": [len(table)],
                "start": [start],
                "end": [time.time()],
                "pid": [os.getpid()],
                "node": [ray.get_runtime_context().get_node_id()],
            }
        )


# ----------------------------------------------------------------------------------------------------------- driver
@dataclass
class EncodeRunSummary:
    """What :func:`encode_corpus_on_ray` did.

    Attributes:
        output: the output folder.
        encoded: texts encoded by this run.
        skipped: texts skipped because an earlier run had written them.
        seconds: wall time of the run (cluster start and model loads included).
        encode_seconds: from the first batch's start to the last batch's end in the actors (0.0 when nothing was
            encoded): the steady-state time, without start-up.
        shards: shards written by this run.
        batches: one dict per batch written (``shard``, ``rows``, ``start``, ``end``, ``pid``, ``node``).
    """

    output: str
    encoded: int
    skipped: int
    seconds: float
    encode_seconds: float
    shards: int
    batches: list[dict]

    @property
    def texts_per_second(self) -> float:
        """Texts encoded per second of wall time."""
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """A one-line summary for people."""
        return (
            f"Encoded {self.encoded} texts ({self.skipped} skipped as already done) in {self.seconds:.1f} s, "
            f"{self.texts_per_second:.2f} texts/s; output: {self.output}"
        )


def encode_corpus_on_ray(
    model: str | os.PathLike,
    input: str | os.PathLike | Iterable[str | os.PathLike],
    output: str | os.PathLike,
    *,
    revision: str | None = None,
    text_column: str = "text",
    id_column: str | None = None,
    num_workers: int = 1,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    batch_size: int = 32,
    rows_per_shard: int | None = None,
    prompt_name: str | None = None,
    prompt: str | None = None,
    normalize_embeddings: bool = True,
    address: str | None = None,
    max_restarts: int = -1,
    max_task_retries: int = -1,
    on_batch: Callable[[dict], None] | None = None,
) -> EncodeRunSummary:
    """Encode a corpus with a GRACE model on Ray Data, resuming what an earlier run into ``output`` wrote.

    The input is read and checked on the driver; the rows not yet in ``output`` go to a ``map_batches`` over a pool
    of ``num_workers`` actors, each holding one loaded model and encoding its batches with
    :func:`grace_st.encoding.encode_corpus`; each batch becomes one shard (see the module docstring). An actor or node
    that dies is restarted by Ray and its batches retried (``max_restarts``, ``max_task_retries``); each id is in the
    output exactly once, which is checked at the end.

    Args:
        model: a saved GRACE model folder (on a path every node reads) or a Hub id.
        input: Parquet, JSONL or CSV file(s) or a folder of them; see :func:`read_corpus_input`.
        output: the output folder (created; every node must be able to write it, e.g. a shared filesystem). A folder
            an earlier run wrote is resumed when the model fingerprint is the same, refused otherwise.
        revision: the model's Hub revision (a commit, branch or tag). Defaults to None.
        text_column: the input's text column. Defaults to ``"text"``.
        id_column: the input's id column. Defaults to None: ``"id"`` where the input has it, else row positions.
        num_workers: actors, one model each. Defaults to 1.
        cpus_per_worker: CPUs per actor (its torch threads). Defaults to 1.0.
        gpus_per_worker: GPUs per actor; above 0 the model runs on ``cuda``. Defaults to 0.0.
        batch_size: texts decoded together in an actor (``encode_corpus``'s batch size). Defaults to 32.
        rows_per_shard: texts per Ray batch and output shard. Defaults to None: ``1024``, or fewer so that every
            actor gets at least 4 batches.
        prompt_name: a saved prompt of the model. Defaults to the model's default prompt.
        prompt: a prompt prepended to every text (instead of ``prompt_name``). Defaults to None.
        normalize_embeddings: L2-normalise the embeddings. Defaults to True.
        address: the Ray cluster to use (``"auto"``, ``"ray://host:10001"``, a GCS address). Defaults to None: the
            cluster this process is connected to, else a local one started for the run and shut down after it.
        max_restarts: restarts of a dead actor (``-1``: unlimited). Defaults to -1.
        max_task_retries: retries of a batch whose actor died (``-1``: unlimited). Defaults to -1.
        on_batch: called on the driver with each written batch's summary (see :class:`EncodeRunSummary`
            ``batches``) as it arrives, e.g. for progress. Defaults to None.

    Returns:
        An :class:`EncodeRunSummary`.

    Raises:
        ImportError: Ray is not installed (the message names the ``distributed`` extra).
        ValueError: bad input (see :func:`read_corpus_input`), an output folder this encoder did not write or written
            with another model fingerprint, a model that cannot be loaded, bad options.
        RuntimeError: the output does not hold each input row exactly once at the end (never seen in the tests).
    """
    ray = _require_ray()
    started = time.time()
    for key, value in (("num_workers", num_workers), ("batch_size", batch_size), ("rows_per_shard", rows_per_shard)):
        if value is None and key == "rows_per_shard":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key}={value!r} must be an int >= 1.")
    if not cpus_per_worker > 0 or gpus_per_worker < 0:
        raise ValueError(f"cpus_per_worker={cpus_per_worker!r} must be > 0, gpus_per_worker={gpus_per_worker!r} >= 0.")
    model = os.fspath(model)
    if os.path.exists(os.path.expanduser(model)):  # actors run elsewhere: a local folder by its absolute path
        model = os.path.abspath(os.path.expanduser(model))
    folder = Path(output).expanduser().absolute()
    corpus = read_corpus_input(input, text_column=text_column, id_column=id_column)
    manifest, shards, temporary = _scan_output(folder)

    own_init = address is not None or not ray.is_initialized()
    if own_init:
        ray.init(address=address, logging_level=logging.WARNING)
    try:
        device = "cuda" if gpus_per_worker > 0 else "cpu"
        probe = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_retries=1)(_probe)
        try:
            found = ray.get(probe.remote(model, revision, device, prompt, prompt_name))
        except ray.exceptions.RayTaskError as error:
            raise error.cause from None
        fingerprint = found["fingerprint"]
        done = _check_resume(folder, manifest, shards, corpus, fingerprint, normalize_embeddings)
        for path in temporary:  # units a killed run was writing: never complete, never read
            path.unlink(missing_ok=True)
        import pyarrow as pa
        import pyarrow.compute as pc

        table = corpus.table
        if done:
            table = table.filter(pc.invert(pc.is_in(table["position"], value_set=pa.array(done, pa.int64()))))
        total, remaining = len(corpus.table), len(table)
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": OUTPUT_FORMAT,
            "model": model,
            "revision": revision,
            "fingerprint": fingerprint,
            "prompt": found["prompt"],
            "normalize_embeddings": normalize_embeddings,
            "dimension": found["dim"],
            "grace_st_version": __version__,
            "input": corpus.files,
            "text_column": text_column,
            "id_source": corpus.id_source,
            "rows": {"input": total, "written": total - remaining},
            "complete": remaining == 0,
        }
        _write_manifest(folder, manifest)
        logger.info("%d of %d texts to encode (%d already in %s).", remaining, total, total - remaining, folder)
        batches: list[dict] = []
        if remaining:
            if rows_per_shard is None:
                rows_per_shard = max(1, min(1024, math.ceil(remaining / (4 * num_workers))))
            # One block per shard-sized slice: the actor pool hands each actor whole slices.
            blocks = [table.slice(i, rows_per_shard) for i in range(0, remaining, rows_per_shard)]
            dataset = ray.data.from_arrow(blocks).map_batches(
                _ShardEncoder,
                batch_size=rows_per_shard,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=num_workers, max_tasks_in_flight_per_actor=1),
                num_cpus=cpus_per_worker,
                num_gpus=gpus_per_worker,
                fn_constructor_kwargs={
                    "model": model,
                    "revision": revision,
                    "device": device,
                    "threads": max(1, int(cpus_per_worker)),
                    "output": str(folder),
                    "fingerprint": fingerprint,
                    "prompt": found["prompt"],
                    "normalize_embeddings": normalize_embeddings,
                    "batch_size": batch_size,
                },
                max_restarts=max_restarts,
                max_task_retries=max_task_retries,
            )
            written, logged = 0, time.time()
            for rows in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in rows.to_pylist():
                    batches.append(row)
                    written += row["rows"]
                    if on_batch is not None:
                        on_batch(row)
                if time.time() - logged > 30 or written == remaining:  # a line per 30 s, beside Ray's progress
                    logged = time.time()
                    logger.info(
                        "%d/%d texts written to %s (%.1f texts/s)",
                        written,
                        remaining,
                        folder,
                        written / (logged - started),
                    )
        _manifest, shards, _ = _scan_output(folder)
        table = _read_shards(shards, fingerprint, columns=["id", "position"])
        _check_complete(table, total, folder)
        manifest["rows"]["written"] = total
        manifest["complete"] = True
        _write_manifest(folder, manifest)
    finally:
        if own_init:
            ray.shutdown()
    encode_seconds = max(b["end"] for b in batches) - min(b["start"] for b in batches) if batches else 0.0
    return EncodeRunSummary(
        output=str(folder),
        encoded=remaining,
        skipped=total - remaining,
        seconds=time.time() - started,
        encode_seconds=encode_seconds,
        shards=len({b["shard"] for b in batches}),
        batches=batches,
    )


def _check_resume(folder: Path, manifest, shards, corpus: CorpusInput, fingerprint: str, normalize: bool) -> list:
    """Positions of the input rows an earlier run wrote, after checking that run used the same model and input."""
    if manifest is None:
        return []
    if manifest.get("fingerprint") != fingerprint:
        raise ValueError(
            f"output folder {str(folder)!r} holds embeddings of another model: fingerprint "
            f"{manifest.get('fingerprint')!r} (model {manifest.get('model')!r}, "
            f"revision {manifest.get('revision')!r}), "
            f"this run's is {fingerprint!r}. Use a new output folder; outputs of two models are never mixed."
        )
    for key, value in (("normalize_embeddings", normalize), ("id_source", corpus.id_source)):
        if manifest.get(key) != value:
            raise ValueError(
                f"output folder {str(folder)!r} was written with {key}={manifest.get(key)!r}, this run has {value!r}."
            )
    table = _read_shards(shards, fingerprint, columns=["id", "position"])
    if table is None:
        return []
    positions = table["position"].to_pylist()
    ids = corpus.table["id"].to_pylist()
    for position, value in zip(positions, table["id"].to_pylist(), strict=True):
        if not 0 <= position < len(ids) or ids[position] != value:
            raise ValueError(
                f"output folder {str(folder)!r} holds id {value!r} at input position {position}, which the input does "
                "not have there: the input changed since that run. Use a new output folder."
            )
    return positions


def _check_complete(table, total: int, folder: Path) -> None:
    """Each input row exactly once in the output."""
    positions = np.asarray(table["position"].to_pylist() if table is not None else [], dtype=np.int64)
    counts = np.bincount(positions, minlength=total)
    if (counts != 1).any():
        missing, repeated = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
        raise RuntimeError(
            f"output folder {str(folder)!r} does not hold each input row once: {len(missing)} missing (positions "
            f"{missing[:5].tolist()}), {len(repeated)} repeated (positions {repeated[:5].tolist()})."
        )


# ----------------------------------------------------------------------------------------------------------- reader
@dataclass
class EncodedOutput:
    """An output folder's rows in input order.

    Attributes:
        ids: ``(n,)`` the input ids (int64, or object for string ids).
        embeddings: ``(n, dim)`` float32.
        rationales: the rationale of each text.
        finished: ``(n,)`` bool, True where the rationale ended before ``max_new_tokens``.
    """

    ids: np.ndarray
    embeddings: np.ndarray
    rationales: list[str]
    finished: np.ndarray


def read_encoded(
    output: str | os.PathLike, *, format: Literal["numpy", "datasets"] = "numpy", allow_partial: bool = False
):
    """Load what :func:`encode_corpus_on_ray` wrote, in input order, for search with any vector index.

    Args:
        output: the output folder.
        format: ``"numpy"`` (default): an :class:`EncodedOutput`; ``"datasets"``: a Hugging Face ``datasets.Dataset``
            with the columns ``id``, ``embedding``, ``rationale``, ``finished``.
        allow_partial: return the rows of an unfinished run instead of raising. Defaults to False.

    Returns:
        An :class:`EncodedOutput` or a ``datasets.Dataset``.

    Raises:
        ValueError: not an output folder of this encoder, an unfinished run (without ``allow_partial``), an unknown
            ``format``.
    """
    if format not in ("numpy", "datasets"):
        raise ValueError(f"format={format!r} is not supported; choose 'numpy' or 'datasets'.")
    try:
        import pyarrow  # noqa: F401
    except ImportError as error:
        raise ImportError(f"Reading the output needs pyarrow: {_EXTRA}") from error
    folder = Path(output).expanduser()
    if not folder.is_dir():
        raise ValueError(f"output folder {str(folder)!r} does not exist.")
    manifest, shards, _ = _scan_output(folder)
    if manifest is None:
        raise ValueError(f"{str(folder)!r} has no {MANIFEST}: not an output of encode_corpus_on_ray.")
    table = _read_shards(shards, manifest["fingerprint"])
    rows = 0 if table is None else len(table)
    if not allow_partial and (not manifest.get("complete") or rows != manifest["rows"]["input"]):
        raise ValueError(
            f"the run into {str(folder)!r} is not complete ({rows} of {manifest['rows']['input']} rows); rerun it, or "
            "pass allow_partial=True."
        )
    dim = manifest["dimension"]
    if table is None:
        return EncodedOutput(np.zeros(0, np.int64), np.zeros((0, dim), np.float32), [], np.zeros(0, bool))
    table = table.sort_by("position")
    embeddings = table["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, dim)
    result = EncodedOutput(
        ids=table["id"].to_numpy(),
        embeddings=np.ascontiguousarray(embeddings, dtype=np.float32),
        rationales=table["rationale"].to_pylist(),
        finished=table["finished"].to_numpy(),
    )
    if format == "numpy":
        return result
    try:
        import datasets
    except ImportError as error:
        raise ImportError('format="datasets" needs the datasets library: pip install datasets') from error
    return datasets.Dataset.from_dict(
        {
            "id": result.ids.tolist(),
            "embedding": result.embeddings,
            "rationale": result.rationales,
            "finished": result.finished.tolist(),
        }
    )
