"""Publishing: the publish folder, its card, loading without grace_st, and the upload to a local Hub stand-in."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from tiny_sts import THREE_PAIRS, write_sts_spec

from grace_st.artifacts import TRAINING_INFO_FILE, folder_revision
from grace_st.hub import model_card
from grace_st.hub import publish as hub
from grace_st.hub.publish import build_publish_folder, model_files, upload_folder

TEXTS = ["A man is playing a guitar.", "Kids are running in a park.", "The stock market fell today."]


@pytest.fixture(scope="module")
def tiny_grace_dir(tiny_backbone_dir, tmp_path_factory) -> str:
    from grace_st import from_backbone

    path = tmp_path_factory.mktemp("tiny-grace")
    from_backbone(tiny_backbone_dir, max_new_tokens=4, device="cpu").save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def results_dir(tiny_grace_dir, tmp_path_factory) -> Path:
    """mteb results of the tiny GRACE model on a three-pair local STS task."""
    evaluation = pytest.importorskip(
        "grace_st.evaluation.mteb_evaluation", reason='needs the eval extra: pip install "grace-st[eval]"'
    )
    folder = tmp_path_factory.mktemp("results-data")
    spec = write_sts_spec(folder, pairs=THREE_PAIRS)
    tasks = [evaluation.load_task_spec(spec, data_dir=folder)]
    out = folder / "out"
    row = evaluation.evaluate_model(evaluation.ModelSpec(tiny_grace_dir, "tiny GRACE"), tasks, out, device="cpu")
    (out / "comparison.md").write_text(evaluation.comparison_table([row]))
    return out


@pytest.fixture(scope="module")
def publish_dir(tiny_grace_dir, results_dir, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("publish") / "repo"
    return build_publish_folder(
        tiny_grace_dir,
        target,
        repo_id="grace-org/tiny-grace",
        results_dir=results_dir,
        comparison=results_dir / "comparison.md",
        license="apache-2.0",
        device="cpu",
    )


def test_publish_folder_contents(publish_dir, tiny_grace_dir):
    files = sorted(p.relative_to(publish_dir).as_posix() for p in publish_dir.rglob("*") if p.is_file())
    for expected in [
        "README.md",
        "grace_st.py",
        "model.safetensors",
        "config.json",
        "modules.json",
        "config_sentence_transformers.json",
        "grace_config.json",
        "1_RationalePooling/config.json",
        "2_Normalize/config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "results/TinySTS.json",
        "results/model_meta.json",
        "results/grace_diagnostics/TinySTS.json",
    ]:
        assert expected in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]
    import grace_st.model.modules

    assert (publish_dir / "grace_st.py").read_bytes() == Path(grace_st.model.modules.__file__).read_bytes()
    assert folder_revision(publish_dir) == folder_revision(tiny_grace_dir)
    assert not list(publish_dir.parent.glob("repo.tmp-*"))  # built aside and renamed


def test_card_has_real_numbers_and_parseable_metadata(publish_dir):
    from huggingface_hub import ModelCard

    card = ModelCard.load(publish_dir / "README.md")
    result = json.loads((publish_dir / "results" / "TinySTS.json").read_text())
    score = 100 * result["scores"]["test"][0]["main_score"]
    (entry,) = card.data.eval_results
    assert entry.task_type == "STS" and entry.metric_type == "cosine_spearman" and entry.dataset_name == "MTEB TinySTS"
    assert entry.metric_value == pytest.approx(score, abs=1e-3)
    assert card.data.license == "apache-2.0" and card.data.library_name == "sentence-transformers"
    assert card.data.model_name == "grace-org/tiny-grace"
    text = card.text
    (table_row,) = [line for line in text.splitlines() if line.startswith("| TinySTS ")]
    cells = [cell.strip() for cell in table_row.strip("|").split("|")]
    assert cells[:5] == ["TinySTS", "STS", "test", "cosine_spearman", f"{score:.2f}"]
    assert 'SentenceTransformer("grace-org/tiny-grace", trust_remote_code=True, revision=' in text
    assert "| tiny GRACE |" in text  # the comparison table
    assert "s per text" in text and "**Rationale:**" in text and "arXiv 2510.04506" in text
    assert "{{" not in text and "{%" not in text


def test_publish_folder_loads_without_grace_st(publish_dir, tiny_grace_dir, tmp_path):
    """The acceptance check on a small scale: a process where ``import grace_st`` fails loads the folder."""
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(tiny_grace_dir, trust_remote_code=True, device="cpu").encode(TEXTS)
    script = f"""
import json, sys
sys.modules["grace_st"] = None  # importing grace_st now raises ImportError
from sentence_transformers import SentenceTransformer
model = SentenceTransformer({str(publish_dir)!r}, trust_remote_code=True, device="cpu")
assert type(model[0]).__module__.startswith("transformers_modules"), type(model[0]).__module__
print(json.dumps(model.encode({TEXTS!r}).tolist()))
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.array(json.loads(done.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_model_files_refuses_non_grace_and_pickled(tmp_path, tiny_backbone_dir):
    with pytest.raises(ValueError, match="no modules.json"):
        model_files(tiny_backbone_dir)
    (tmp_path / "modules.json").write_text(
        json.dumps([{"idx": 0, "name": "0", "path": "", "type": "grace_st.Transformer"}])
    )
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="safetensors only"):
        model_files(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "x.Transformer"}]))
    with pytest.raises(ValueError, match="not a GRACE model"):
        model_files(tmp_path)


def test_build_refuses_a_non_empty_target(tiny_grace_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_publish_folder(tiny_grace_dir, tmp_path, measure_examples=False)


# ------------------------------------------------------------------------------------------- Hub stand-in
class FakeHub(BaseHTTPRequestHandler):
    """The four Hub API endpoints ``HfApi.create_repo`` + ``upload_folder`` use (without hf_xet), on 127.0.0.1.

    It answers "regular" upload mode for every file (the server decides; small repos may be committed inline), checks
    the README metadata like /api/validate-yaml does, and stores committed files in memory.
    """

    repos: dict[str, dict] = {}
    requests: list[tuple[str, str, str | None]] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.requests.append(("POST", self.path, self.headers.get("Authorization")))
        endpoint = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
        if self.path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            self.repos.setdefault(
                repo_id, {"private": payload.get("visibility") == "private", "files": {}, "commits": []}
            )
            return self._reply(200, {"url": f"{endpoint}/{repo_id}", "name": repo_id})
        if self.path == "/api/validate-yaml":
            import yaml

            content = json.loads(body)["content"]
            try:
                yaml.safe_load(content.split("---")[1])
            except Exception as error:  # noqa: BLE001 - report any parse error like the Hub does
                return self._reply(400, {"errors": [{"message": str(error)}]})
            return self._reply(200, {"errors": [], "warnings": []})
        parts = self.path.split("?")[0].strip("/").split("/")  # api/models/<org>/<name>/<action>/<revision>
        repo_id = f"{parts[2]}/{parts[3]}"
        if repo_id not in self.repos:
            return self._reply(404, {"error": "Repository not found"})
        if parts[4] == "preupload":
            files = json.loads(body)["files"]
            return self._reply(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if parts[4] == "commit":
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            committed = {}
            for line in lines:
                if line["key"] == "file":
                    value = line["value"]
                    committed[value["path"]] = base64.b64decode(value["content"])
            self.repos[repo_id]["files"].update(committed)
            oid = hashlib.sha1(body).hexdigest()
            self.repos[repo_id]["commits"].append((oid, committed))
            return self._reply(200, {"commitUrl": f"{endpoint}/{repo_id}/commit/{oid}", "commitOid": oid})
        return self._reply(404, {"error": f"unknown endpoint {self.path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    FakeHub.repos, FakeHub.requests = {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_TOKEN", "hf_fakeTOKEN1234567890")
    monkeypatch.setattr("huggingface_hub.utils._xet.is_xet_available", lambda: False, raising=False)
    monkeypatch.setattr("huggingface_hub.hf_api.is_xet_available", lambda: False, raising=False)
    yield url
    server.shutdown()


def test_upload_to_local_hub_stand_in(fake_hub, publish_dir, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    url = upload_folder(publish_dir, "grace-org/tiny-grace", private=True)
    assert url.startswith(f"{fake_hub}/grace-org/tiny-grace/commit/")
    repo = FakeHub.repos["grace-org/tiny-grace"]
    assert repo["private"] is True
    local = {p.relative_to(publish_dir).as_posix(): p.read_bytes() for p in publish_dir.rglob("*") if p.is_file()}
    (first_oid, first), (_, second) = repo["commits"]
    assert first == local  # the folder as built, then the card pinned to that commit
    assert set(second) == {"README.md"} and repo["files"] == {**local, "README.md": second["README.md"]}
    assert {path for _, path, _ in FakeHub.requests} >= {
        "/api/repos/create",
        "/api/validate-yaml",
        "/api/models/grace-org/tiny-grace/preupload/main",
        "/api/models/grace-org/tiny-grace/commit/main",
    }
    assert all(auth == "Bearer hf_fakeTOKEN1234567890" for _, _, auth in FakeHub.requests)
    captured = capsys.readouterr()
    assert "hf_fakeTOKEN" not in captured.out + captured.err + caplog.text
    # A second upload to the now existing repo works (create_repo with exist_ok).
    assert "/commit/" in upload_folder(publish_dir, "grace-org/tiny-grace")


def test_upload_refuses_a_folder_that_is_not_a_publish_folder(tmp_path):
    with pytest.raises(ValueError, match="publish folder"):
        upload_folder(tmp_path, "org/name")


def test_results_rows_fall_back_to_mteb_registry(tmp_path):
    pytest.importorskip("mteb")
    result = {
        "task_name": "STS13",
        "dataset_revision": "abc",
        "mteb_version": "2.26.0",
        "scores": {"test": [{"main_score": 0.5, "hf_subset": "default", "languages": ["eng-Latn"]}]},
        "evaluation_time": 1.0,
        "kg_co2_emissions": None,
    }
    (tmp_path / "STS13.json").write_text(json.dumps(result))
    (row,) = hub.read_results(tmp_path)
    assert row["type"] == "STS" and row["dataset"] == "mteb/sts13-sts" and row["metric"] == "cosine_spearman"


def test_card_pins_the_revision_of_the_uploaded_code(fake_hub, publish_dir):
    """The usage snippet loads remote code, so it pins ``revision=`` and says why."""
    import re

    local_card = (publish_dir / "README.md").read_text()
    pins = re.findall(
        r'SentenceTransformer\("grace-org/tiny-grace", trust_remote_code=True, revision="([^"]+)"\)', local_card
    )
    assert len(pins) == 1, "the usage snippet must pin revision="
    assert pins[0] == model_card.REVISION_PLACEHOLDER  # the commit is not known before the upload
    assert "runs on your machine" in local_card and "later pushes" in local_card

    url = upload_folder(publish_dir, "grace-org/tiny-grace")
    repo = FakeHub.repos["grace-org/tiny-grace"]
    (code_oid, code_files), (_, card_files) = repo["commits"]
    assert "grace_st.py" in code_files and url.endswith(code_oid)  # the pinned commit holds the module code
    pinned = card_files["README.md"].decode()
    assert f'trust_remote_code=True, revision="{code_oid}")' in pinned
    assert model_card.REVISION_PLACEHOLDER not in pinned
    assert pinned == local_card.replace(model_card.REVISION_PLACEHOLDER, code_oid)
    assert (publish_dir / "README.md").read_text() == local_card  # the local folder is left as built


RECORD = {
    "grace_st_version": "0.1.0",
    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "training_datasets": ["sick:/home/me/data/SICK_train.txt", "sentence-transformers/all-nli", "my_pairs.jsonl"],
    "license": None,
    "global_step": 120,
    "reward": {
        "mode": "supervised",
        "consistency_weight": 0.1,
        "hard_negative_weight": 1.0,
        "reward_temperature": 0.05,
        "truncation_penalty": 0.5,
        "copy_penalty": 0.25,
        "copy_min_span": 4,
    },
    "generation": {
        "num_generations": 4,
        "max_completion_length": 48,
        "temperature": 1.0,
        "query_temperature": 0.0,
        "system_prompt": "Describe the text.",
    },
    "config": {"learning_rate": 1e-06, "max_steps": 120, "hub_token": "hf_secretSECRET", "output_dir": "runs/x"},
}


def _grace_copy_with_record(tiny_grace_dir, tmp_path, record):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_grace_dir, folder)
    if record is not None:
        (folder / TRAINING_INFO_FILE).write_text(json.dumps(record))
    return folder


def _table_cells(text: str, first: str) -> list[str]:
    """The cells of the markdown table row of ``text`` whose first cell is ``first``."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines() if "|" in line]
    (row,) = [row for row in rows if row[0] == first]
    return row


def test_card_says_what_made_a_trained_model(tiny_grace_dir, tmp_path):
    """A trained model's card names its base model, data, steps and settings (not "untrained")."""
    from huggingface_hub import ModelCard

    folder = _grace_copy_with_record(tiny_grace_dir, tmp_path, RECORD)
    card = ModelCard(model_card.render_card(folder, "org/grace-sick"))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.datasets == ["sentence-transformers/all-nli"]  # Hub ids only; local sources are in the text
    assert card.data.license == "apache-2.0"  # the known backbone's licence, as the record names none
    text = card.text
    assert "untrained" not in text and "No GRACE training information" not in text
    assert _table_cells(text, "backbone") == ["backbone", "`HuggingFaceTB/SmolLM2-135M-Instruct`"]
    assert "by grace_st 0.1.0" in text and "for 120 optimizer steps" in text
    assert "SICK triplets built from a local copy of `SICK_train.txt`" in text and "/home/me" not in text
    assert "local file `my_pairs.jsonl`" in text
    assert "(https://huggingface.co/datasets/sentence-transformers/all-nli)" in text
    assert _table_cells(text, "reward: copy_penalty")[1] == "0.25"
    assert _table_cells(text, "generation: num_generations")[1] == "4"
    assert "System prompt during training:\n\n```text\nDescribe the text.\n```" in text
    assert '"learning_rate": 1e-06' in text
    assert "hf_secret" not in text and '"hub_token": "<redacted>"' in text
    assert "{{" not in text and "{%" not in text
    # An explicit licence and a record licence win over the fallback.
    assert ModelCard(model_card.render_card(folder, "org/x", license="mit")).data.license == "mit"
    folder_b = _grace_copy_with_record(tiny_grace_dir, tmp_path / "b", {**RECORD, "license": "cc-by-4.0"})
    assert ModelCard(model_card.render_card(folder_b, "org/x")).data.license == "cc-by-4.0"


def test_card_names_what_the_readout_reads(tiny_backbone_dir, tmp_path):
    from grace_st import from_backbone
    from grace_st.model.options import POOLING_MODES

    assert set(model_card.READOUTS) == set(POOLING_MODES)
    for mode, words in [("mean", "mean of the last hidden states"), ("mean+summary+text_summary", "user text alone")]:
        options = {"summary_suffix": " In one word:"} if "summary" in mode else {}
        folder = tmp_path / mode
        from_backbone(tiny_backbone_dir, max_new_tokens=2, pooling_mode=mode, device="cpu", **options).save(
            str(folder)
        )
        pooling_row = next(
            line for line in model_card.render_card(folder, "org/x").splitlines() if "| pooling |" in line
        )
        assert f"`{mode}`: " in pooling_row and words in pooling_row


def test_untrained_model_is_described_as_untrained(tiny_grace_dir):
    from huggingface_hub import ModelCard

    card = ModelCard(model_card.render_card(tiny_grace_dir, "org/untrained"))
    assert "*untrained* GRACE model" in card.text and "optimizer steps" not in card.text
    assert card.data.datasets is None and card.data.base_model is None


@pytest.mark.parametrize("shape", ["trainer", "path in base_model"])
def test_card_of_a_local_base_model_and_a_bad_record(shape, tiny_grace_dir, tiny_backbone_dir, tmp_path):
    from huggingface_hub import ModelCard

    base = {"base_model": None, "base_model_source": tiny_backbone_dir}  # as the trainer writes a local base model
    if shape != "trainer":
        base = {"base_model": tiny_backbone_dir}
    prompt = json.loads(Path(tiny_grace_dir, "grace_config.json").read_text())["system_prompt"]
    generation = {**RECORD["generation"], "system_prompt": prompt}
    record = {**RECORD, **base, "training_datasets": ["demo"], "global_step": 0, "generation": generation}
    folder = _grace_copy_with_record(tiny_grace_dir, tmp_path, record)
    card = ModelCard(model_card.render_card(folder, "org/x"))
    assert card.data.base_model is None and card.data.datasets is None and card.data.license is None
    assert f"`local folder {Path(tiny_backbone_dir).name}`" in card.text
    assert "demo triplets bundled with grace_st" in card.text and "weights are the base model's" in card.text
    assert "generated during training with the system prompt above" in card.text
    assert "System prompt during training" not in card.text
    bad = _grace_copy_with_record(tiny_grace_dir, tmp_path / "bad", {**RECORD, "global_step": "120"})
    with pytest.raises(ValueError, match="'global_step' is '120'"):
        model_card.render_card(bad, "org/x")


def test_results_table_uses_the_shared_formatter():
    rows = [
        {"task": "A", "type": "STS", "split": "test", "metric": "m", "score": 0.5, "diagnostics": None},
        {
            "task": "B",
            "type": "STS",
            "split": "test",
            "metric": "m",
            "score": 0.25,
            "diagnostics": {"copy_rate": 0.125, "mean_length": 7.25, "finish_rate": 1.0},
        },
    ]
    text = model_card.results_table(rows)
    assert text.splitlines()[1].startswith("|:")  # markdown_table's rule line
    assert _table_cells(text, "A")[4:] == ["50.00", "–", "–", "–"]
    assert _table_cells(text, "B")[4:] == ["25.00", "0.12", "7.2", "1.00"]


def test_trained_with_the_cli_then_published(tiny_backbone_dir, tmp_path):
    """A model trained one step with ``grace-st-train`` gets a card that says how it was made."""
    pytest.importorskip("trl", reason='needs the train extra: pip install "grace-st[train]"')
    from huggingface_hub import ModelCard

    from grace_st import cli

    rows = [
        {"query": "where is the cat", "positive": "A cat sleeps on the sofa.", "negative": "A dog runs outside."},
        {"query": "market news", "positive": "Stocks fell sharply today.", "negative": "The team won the match."},
    ]
    data = tmp_path / "triplets.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    flags = {
        "model_name_or_path": tiny_backbone_dir,
        "train_data": str(data),
        "output_dir": str(tmp_path / "run"),
        "max_steps": "1",
        "per_device_train_batch_size": "4",
        "num_generations": "2",
        "max_completion_length": "8",
        "use_cpu": "true",
        "bf16": "false",
        "report_to": "none",
        "save_strategy": "no",
        "gradient_checkpointing": "false",
        "disable_tqdm": "true",
    }
    cli.train([item for key, value in flags.items() for item in (f"--{key}", value)])
    model = tmp_path / "run" / "grace-model"
    card = ModelCard(model_card.render_card(model, "org/trained"))
    assert "untrained" not in card.text and "for 1 optimizer step." in card.text
    assert "local file `triplets.jsonl`" in card.text and card.data.datasets is None
    assert f"`local folder {Path(tiny_backbone_dir).name}`" in card.text


def test_doctests():
    import doctest

    assert doctest.testmod(model_card).failed == 0
