"""Command-line entry points (grace_st.cli): the installed commands, the checkout's scripts and their flags."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_sts import THREE_PAIRS, write_sts_spec

from grace_st import cli
from grace_st.scripts import publish as publish_script
from grace_st.scripts import train as train_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_grace_dir(tiny_backbone_dir, tmp_path_factory) -> str:
    from grace_st import from_backbone

    path = tmp_path_factory.mktemp("tiny-grace-cli")
    from_backbone(tiny_backbone_dir, max_new_tokens=4, device="cpu").save(str(path))
    return str(path)


def test_project_scripts_name_the_cli_functions():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {
        "grace-st-train": "grace_st.cli:train",
        "grace-st-eval": "grace_st.cli:evaluate",
        "grace-st-publish": "grace_st.cli:publish",
        "grace-st-encode": "grace_st.cli:encode",
    }


def test_publish_script_is_a_shim_of_the_entry_point(monkeypatch):
    """eval/publish.py only calls grace_st.cli.publish: same flags, same help as ``grace-st-publish``."""
    tree = ast.parse((REPO / "eval" / "publish.py").read_text())
    imports = [node for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert [(node.module, [alias.name for alias in node.names]) for node in imports] == [("grace_st.cli", ["publish"])]
    assert not [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign))]
    env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(REPO / "eval" / "publish.py"), "--help"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    monkeypatch.setenv("COLUMNS", "100")
    assert done.stdout == publish_script.publish_parser().format_help()


def test_train_parses_flags_and_yaml_config(tmp_path):
    pytest.importorskip("trl", reason='needs the train extra: pip install "grace-st[train]"')
    argv = ["--config", str(REPO / "training/configs/demo.yaml"), "--max_steps", "3", "--output_dir", str(tmp_path)]
    training_args, model_args, data_args = train_script.parse_train_args(argv)
    assert training_args.max_steps == 3 and training_args.output_dir == str(tmp_path)  # flag beats the YAML
    assert type(training_args).__name__ == "GraceGRPOConfig" and data_args.train_data == "demo"
    with pytest.raises(ValueError, match="no_such_flag"):  # TRL's parser names the unknown flag
        train_script.parse_train_args(argv + ["--no_such_flag", "1"])


def test_train_calls_run_training_with_the_parsed_configs(monkeypatch, tmp_path, capsys):
    pytest.importorskip("trl", reason='needs the train extra: pip install "grace-st[train]"')
    calls = []

    class Trainer:
        class accelerator:  # noqa: N801 - mimics trainer.accelerator
            is_main_process = True

    def fake_run_training(training_args, model_args, data_args, resume_from_checkpoint=None):
        calls.append((training_args, model_args, data_args, resume_from_checkpoint))
        return Trainer(), tmp_path / "grace-model"

    monkeypatch.setattr("grace_st.scripts.train.run_training", fake_run_training)
    argv = ["--train_data", "demo", "--use_cpu", "true", "--bf16", "false", "--output_dir", str(tmp_path)]
    argv += ["--resume_from_checkpoint", "last"]
    assert cli.train(argv) is None  # a console script exits with the return value
    ((training_args, model_args, data_args, resume),) = calls
    assert resume == "last" and data_args.train_data == "demo" and training_args.output_dir == str(tmp_path)
    assert f"GRACE model saved to {tmp_path / 'grace-model'}" in capsys.readouterr().out


def test_evaluate_then_publish_dry_run(tiny_grace_dir, tmp_path, capsys):
    """The documented flow through the entry points: evaluate on a local task, then write the publish folder."""
    pytest.importorskip("mteb", reason='needs the eval extra: pip install "grace-st[eval]"')
    spec = write_sts_spec(tmp_path, pairs=THREE_PAIRS)
    out = tmp_path / "mteb"
    argv = ["--model", f"tiny GRACE={tiny_grace_dir}", "--local-task", str(spec)]
    assert cli.evaluate(argv + ["--data-dir", str(tmp_path), "--output-dir", str(out), "--device", "cpu"]) is None
    table = (out / "comparison.md").read_text()
    printed = capsys.readouterr().out
    assert "| tiny GRACE " in table and table in printed and "tiny GRACE: " in printed

    target = tmp_path / "dry"
    cli.publish(
        ["--model", tiny_grace_dir, "--repo-id", "org/name", "--dry-run", str(target), "--results-dir", str(out)]
        + ["--no-examples"]
    )
    assert f"Wrote {target} (" in capsys.readouterr().out
    card = (target / "README.md").read_text()
    assert (target / "results" / "TinySTS.json").is_file()
    assert "Does the rationale help?" in card and "| tiny GRACE " in card  # comparison.md found in --results-dir


def test_evaluate_without_tasks_is_a_usage_error(capsys):
    pytest.importorskip("mteb", reason='needs the eval extra: pip install "grace-st[eval]"')
    with pytest.raises(SystemExit):
        cli.evaluate(["--model", "default"])
    assert "no tasks" in capsys.readouterr().err


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "/name", "org/"])
def test_publish_refuses_a_bad_repo_id(repo_id, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.publish(["--model", str(tmp_path), "--repo-id", repo_id, "--dry-run", str(tmp_path / "x")])
    assert f"--repo-id must be ORG/NAME, got {repo_id!r}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_publish_uploads_a_folder_built_in_a_temporary_directory(tiny_grace_dir, monkeypatch, capsys):
    uploads = []

    def fake_upload(folder, repo_id, private=False):
        uploads.append((repo_id, private, sorted(p.name for p in Path(folder).iterdir())))
        return "https://hub.example/org/name/commit/abc"

    monkeypatch.setattr("grace_st.scripts.publish.upload_folder", fake_upload)
    argv = ["--model", tiny_grace_dir, "--repo-id", "org/name", "--private", "--no-examples"]
    cli.publish(argv)
    ((repo_id, private, names),) = uploads
    assert (
        repo_id == "org/name" and private is True and {"README.md", "grace_st.py", "model.safetensors"} <= set(names)
    )
    assert "Uploaded to org/name: https://hub.example/org/name/commit/abc" in capsys.readouterr().out
