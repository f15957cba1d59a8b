"""Tests of corpus encoding on Ray Data (grace_st/encoding/distributed.py): the same embeddings as one process,
resuming, a dying node and a killed driver, bad input, the reader and the CLI.

The Ray tests share one small simulated cluster (``ray.cluster_utils.Cluster``: a head and a worker node of one CPU
each) whose processes import this checkout's grace_st with one torch thread.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import TEXTS
from sentence_transformers import SentenceTransformer

import grace_st
from grace_st.encoding import encode_corpus
from grace_st.encoding.distributed import encode_corpus_on_ray, read_corpus_input, read_encoded

ray = pytest.importorskip("ray", reason='needs the distributed extra: pip install "grace-st[distributed]"')
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOPICS = ["cats", "rain", "prices"] * 8
# the thread name of Ray Data's usage metrics poller (ray/data/_internal/usage/poller.py)
USAGE_POLLER_PREFIX = "data-usage"
CORPUS = TEXTS + [f"Sentence number {i} talks about {topic}." for i, topic in enumerate(TOPICS)]


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node (one CPU each); the test process is the driver. Shut down after the module."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    env["OMP_NUM_THREADS"] = "1"
    # Ray Data's usage stats start a driver thread that never stops (ray.shutdown leaves it) and logs a formatted
    # traceback at DEBUG for each failed metrics query, every 10 s (no Prometheus here). Formatting a traceback calls
    # ast.parse on Python 3.11, and two threads in ast.parse at once can raise "SystemError: AST constructor recursion
    # depth mismatch" (python/cpython#106905) in a later test's ast.parse (transformers' check_imports of remote code).
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the nodes' processes, and the workers they start, inherit it
    nodes = None
    try:
        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        ray.init(address=nodes.address, logging_level="WARNING")  # before other nodes: the driver is on the head
        nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        yield nodes
    finally:
        ray.shutdown()
        if nodes is not None:
            nodes.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    left = [thread.name for thread in threading.enumerate() if thread.name.startswith(USAGE_POLLER_PREFIX)]
    assert not left, f"Ray Data's usage poller outlives the cluster ({left}): the tests after this module are flaky"


@pytest.fixture(scope="module")
def model_dir(tiny_backbone_dir, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-grace-ray")
    grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=8, device="cpu").save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def reference(model_dir):
    """encode_corpus in this process, on the model loaded from its folder as the actors load it."""
    return encode_corpus(SentenceTransformer(model_dir, trust_remote_code=True, device="cpu"), CORPUS)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def corpus_file(tmp_path: Path, texts: list[str] = CORPUS) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", [{"id": f"doc-{i}", "text": t} for i, t in enumerate(texts)])


def assert_equals_reference(output: Path, reference, n: int = len(CORPUS)) -> None:
    result = read_encoded(output)
    assert result.ids.tolist() == [f"doc-{i}" for i in range(n)], "each id once, in input order"
    assert np.abs(result.embeddings - reference.embeddings[:n]).max() < 1e-5
    assert result.rationales == reference.rationales[:n]
    assert result.finished.tolist() == reference.finished[:n]


def files_of(folder: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} if folder.exists() else {}


def shard_rows(folder: Path) -> int:
    return sum(pq.read_metadata(p).num_rows for p in folder.glob("part-*.parquet"))


def encoder_actor_pids(node) -> list[int]:
    """Process ids of the encoding actors that ``node`` (a node of the test cluster) runs: its raylet's children
    whose command line names the actor class (the processes of this cluster only, never another user's)."""
    raylet = node.all_processes["raylet"][0].process.pid
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == raylet and b"_ShardEncoder" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


# ------------------------------------------------------------------------------------------------ same embeddings
def test_two_actors_write_what_encode_corpus_writes_in_one_process(cluster, model_dir, reference, tmp_path):
    output = tmp_path / "out"
    summary = encode_corpus_on_ray(
        model_dir, corpus_file(tmp_path), output, num_workers=2, rows_per_shard=4, batch_size=3
    )
    assert (summary.encoded, summary.skipped, summary.shards) == (len(CORPUS), 0, 8)
    assert_equals_reference(output, reference)
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["model"] == model_dir and manifest["complete"] is True
    assert manifest["rows"] == {"input": len(CORPUS), "written": len(CORPUS)}
    assert manifest["grace_st_version"] == grace_st.__version__ and manifest["id_source"] == "column id"
    model = SentenceTransformer(model_dir, trust_remote_code=True, device="cpu")
    assert manifest["fingerprint"] == grace_st.encoding.model_fingerprint(model)
    shard = pq.read_table(next(output.glob("part-*.parquet")))
    assert shard.schema.field("embedding").type == pa.list_(pa.float32(), model.get_embedding_dimension())
    assert {"id", "embedding", "rationale", "finished"} <= set(shard.column_names)

    again = encode_corpus_on_ray(model_dir, corpus_file(tmp_path), output, num_workers=2)
    assert (again.encoded, again.skipped, again.shards) == (0, len(CORPUS), 0), "a finished run is not redone"

    dataset = read_encoded(output, format="datasets")
    assert dataset["id"] == [f"doc-{i}" for i in range(len(CORPUS))]
    np.testing.assert_allclose(np.asarray(dataset["embedding"]), reference.embeddings, atol=1e-5)


def test_a_rerun_encodes_only_new_ids_and_refuses_another_model(
    cluster, model_dir, tiny_backbone_dir, reference, tmp_path
):
    output = tmp_path / "out"
    first = encode_corpus_on_ray(model_dir, corpus_file(tmp_path, CORPUS[:12]), output, rows_per_shard=4)
    assert (first.encoded, first.skipped) == (12, 0)
    other = tmp_path / "other-model"
    grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=5, device="cpu").save(str(other))
    before = files_of(output)
    with pytest.raises(ValueError, match="holds embeddings of another model: fingerprint"):
        encode_corpus_on_ray(other, corpus_file(tmp_path), output)
    assert files_of(output) == before, "a refused run writes nothing"
    second = encode_corpus_on_ray(model_dir, corpus_file(tmp_path), output, rows_per_shard=4)
    assert (second.encoded, second.skipped) == (len(CORPUS) - 12, 12), "the input grew: only the new ids"
    assert_equals_reference(output, reference)


def test_a_model_that_cannot_be_loaded_is_named(cluster, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match=rf"the model {re.escape(repr(str(missing)))} \(revision None\) cannot be"):
        encode_corpus_on_ray(missing, corpus_file(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------- bad input
def bad_input(tmp_path: Path, case: str) -> tuple[list[Path], dict, str]:
    """(input files, options, the error it must raise) of each kind of bad input."""
    if case == "missing text column":
        return [write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "body": "x"}])], {}, r"c\.jsonl, line 1 .*'text'"
    if case == "missing id column":
        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"text": ["a", "b"]}), path)
        return [path], {"id_column": "doc"}, r"c\.parquet: no id column 'doc'"
    if case == "null text":
        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"id": [1, 2, 3], "text": ["a", None, "c"]}), path)
        return [path], {}, r"c\.parquet, row 1: the text \(column 'text'\) is null"
    if case == "non-string text":
        rows = [{"id": 1, "text": "a"}, {"id": 2, "text": 7}]
        return [write_jsonl(tmp_path / "c.jsonl", rows)], {}, r"c\.jsonl, line 2 \(row 1\): the text .* is 7"
    if case == "non-string text column":
        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"id": [1], "body": [3.5]}), path)
        return [path], {"text_column": "body"}, r"c\.parquet: column 'body' has type double"
    if case == "duplicate ids":
        a = write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "text": "a"}, {"id": "y", "text": "b"}])
        b = write_jsonl(tmp_path / "b.jsonl", [{"id": "z", "text": "c"}, {"id": "y", "text": "d"}])
        return [a, b], {}, r"the id 'y' appears twice: .*a\.jsonl, row 1 and .*b\.jsonl, row 1"
    if case == "empty input":
        (tmp_path / "c.csv").write_text("id,text\n")
        return [tmp_path / "c.csv"], {}, r"the input holds no rows: .*c\.csv"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing text column",
        "missing id column",
        "null text",
        "non-string text",
        "non-string text column",
        "duplicate ids",
        "empty input",
    ],
)
def test_bad_input_is_named_and_nothing_is_written(model_dir, tmp_path, case):
    files, options, message = bad_input(tmp_path, case)
    with pytest.raises(ValueError, match=message):
        encode_corpus_on_ray(model_dir, files, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_an_output_folder_with_files_of_others_is_refused_untouched(model_dir, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    (output / "part-0.parquet").write_text("not a shard")
    before = files_of(output)
    with pytest.raises(ValueError, match=r"holds files this encoder did not write: \['notes.txt', 'part-0.parquet'\]"):
        encode_corpus_on_ray(model_dir, corpus_file(tmp_path), output)
    assert files_of(output) == before and (output / "notes.txt").read_text() == "mine"


def test_row_positions_are_the_ids_without_an_id_column(tmp_path):
    table = pa.table({"text": CORPUS[:10]})
    pq.write_table(table.slice(0, 6), tmp_path / "a.parquet")
    pq.write_table(table.slice(6), tmp_path / "b.parquet")
    corpus = read_corpus_input(tmp_path)
    assert corpus.table["id"].to_pylist() == list(range(10)) and corpus.id_source == "row position"
    assert corpus.table["text"].to_pylist() == CORPUS[:10]
    assert corpus.files == [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]


def test_csv_texts_that_look_like_numbers_stay_texts(tmp_path):
    (tmp_path / "c.csv").write_text("id,text\n7,12\n8,hello\n")
    table = read_corpus_input(tmp_path / "c.csv").table
    assert table["id"].to_pylist() == [7, 8] and table["text"].to_pylist() == ["12", "hello"]


def test_the_cli_reports_bad_input_in_one_line(model_dir, tmp_path, capsys):
    from grace_st import cli

    path = write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "text": "a"}, {"id": 1, "text": "b"}])
    with pytest.raises(SystemExit) as exit:
        cli.encode(["--model", model_dir, "--input", str(path), "--output", str(tmp_path / "out")])
    assert exit.value.code == 2
    assert re.fullmatch(
        r"grace-st-encode: error: the id 1 appears twice: .*; ids must be unique\.\n", capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


def test_without_ray_the_error_names_the_extra(model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ImportError, match=re.escape('pip install "grace-st[distributed]"')):
        encode_corpus_on_ray(model_dir, corpus_file(tmp_path), tmp_path / "out")


# ----------------------------------------------------------------------------------------------------- failures
def test_a_worker_node_that_dies_mid_run_is_survived(cluster, model_dir, tmp_path):
    """A third node joins; once an actor on a worker node has written a shard, its node is killed. Ray restarts the
    actor and retries the batch it had in flight: the output holds each id once and equals one process."""
    extra = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    texts = CORPUS * 3  # ids doc-0..doc-95, one per batch: the run goes on after the node dies
    workers = {node.node_id: node for node in cluster.worker_nodes}
    killed: dict = {}

    def kill_a_worker_node(batch: dict) -> None:
        if not killed and batch["node"] in workers:
            killed.update(pid=batch["pid"], written=shard_rows(tmp_path / "out"))
            cluster.remove_node(workers[batch["node"]], allow_graceful=False)

    summary = encode_corpus_on_ray(
        model_dir,
        corpus_file(tmp_path, texts),
        tmp_path / "out",
        num_workers=2,
        rows_per_shard=1,
        batch_size=1,
        on_batch=kill_a_worker_node,
    )
    assert killed and 1 <= killed["written"] < len(texts), "fixture: the node must die mid-run"
    assert summary.encoded == len(texts)
    assert killed["pid"] in {b["pid"] for b in summary.batches}
    reference_of_texts = encode_corpus(SentenceTransformer(model_dir, trust_remote_code=True, device="cpu"), texts)
    assert_equals_reference(tmp_path / "out", reference_of_texts, n=len(texts))
    if extra in cluster.worker_nodes:
        cluster.remove_node(extra)


def test_a_killed_driver_is_resumed_by_rerunning_the_command(cluster, model_dir, tmp_path):
    """SIGKILL the ``grace-st-encode`` driver once a shard is written, then rerun the same command: it encodes only
    the rows not in a complete shard (what the killed run had in flight is among them), and the output is complete."""
    texts = CORPUS * 3
    command = [
        sys.executable,
        "-c",
        "from grace_st.cli import encode; encode()",
        *("--model", model_dir, "--input", str(corpus_file(tmp_path, texts)), "--output", str(tmp_path / "out")),
        *("--address", cluster.address, "--num-workers", "2", "--rows-per-shard", "1", "--batch-size", "1"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = tmp_path / "out"
    deadline = time.time() + 180
    while not list(output.glob("part-*.parquet")) and time.time() < deadline and driver.poll() is None:
        time.sleep(0.02)
    os.kill(driver.pid, signal.SIGKILL)
    at_kill = shard_rows(output)
    driver.communicate()
    deadline = time.time() + 60
    while any(encoder_actor_pids(node) for node in cluster.list_all_nodes()) and time.time() < deadline:
        time.sleep(0.5)  # Ray ends a dead driver's actors
    assert not any(encoder_actor_pids(node) for node in cluster.list_all_nodes())
    written = shard_rows(output)
    assert 1 <= at_kill <= written < len(texts), "fixture: the driver must die mid-run"
    assert written - at_kill <= 2, "at most the 2 actors' batches in flight (1 row each) completed after the kill"
    with pytest.raises(ValueError, match=rf"is not complete \({written} of {len(texts)} rows\)"):
        read_encoded(output)
    assert len(read_encoded(output, allow_partial=True).ids) == written

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith(f"Encoded {len(texts) - written} texts ({written} skipped as already done) in "), line
    assert line.endswith(f"output: {output}"), line
    reference_of_texts = encode_corpus(SentenceTransformer(model_dir, trust_remote_code=True, device="cpu"), texts)
    assert_equals_reference(output, reference_of_texts, n=len(texts))
