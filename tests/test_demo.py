"""training/demo.py end to end on the tiny model (run as a user runs it): a short terminal output that ends with the
table, the full log in the output folder, a re-run that replaces only the demo's own outputs, and a refused folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "training" / "demo.py"


def run_demo(config: Path, output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, str(DEMO), "--config", str(config), "--output-dir", str(output_dir)]
    result = subprocess.run([*command, *extra], capture_output=True, env=env, cwd=ROOT, timeout=900, check=False)
    # Decoded here, not with text=True, which would turn a progress bar's \r redraws into separate lines.
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


@pytest.fixture
def tiny_config(tiny_backbone_dir, tmp_path) -> Path:
    """training/configs/demo.yaml with the tiny backbone, short rationales and 2 steps (one generated batch)."""
    options = yaml.safe_load((ROOT / "training" / "configs" / "demo.yaml").read_text(encoding="utf-8"))
    options.update(
        model_name_or_path=tiny_backbone_dir,
        max_completion_length=8,
        inference_max_new_tokens=8,
        max_steps=2,
        save_steps=1,
        truncation_penalty=None,
    )
    path = tmp_path / "tiny-demo.yaml"
    path.write_text(yaml.safe_dump(options), encoding="utf-8")
    return path


def test_demo_output_log_and_rerun(tiny_config, tmp_path):
    out = tmp_path / "demo-out"
    first = run_demo(tiny_config, out)
    assert first.returncode == 0, first.stderr[-3000:]
    terminal = (first.stdout + first.stderr).rstrip("\n").split("\n")  # a progress bar redraws with \r: one line
    text = "\n".join(terminal)
    assert "'loss'" not in text and '"loss"' not in text, "a raw log dict reached the terminal"
    assert len(terminal) <= 48, text  # 44 now; `make demo` may print ~80 lines in all, the install included
    assert not re.search(r"(Future|Deprecation|User)Warning", text), text
    # The stdout ends with the table, then where things are and the time.
    lines = first.stdout.splitlines()
    table_end = max(i for i, line in enumerate(lines) if line.startswith("|"))
    assert lines[table_end].startswith("| GRACE trained ") and len(lines) - table_end - 1 <= 4
    # header, rule, no rationale, echo, PromptEOL, GRACE untrained, contrastive (+CL), GRACE trained
    header = table_end - 7
    assert [line.split("|")[1].strip() for line in lines[header + 2 : table_end + 1]][:3] == [
        "no rationale",
        "echo",
        "PromptEOL",
    ]
    assert lines[header].startswith("| model ") and all(line.startswith("|") for line in lines[header:table_end])
    assert lines[-1].startswith("total time ")
    log = (out / "demo.log").read_text(encoding="utf-8")
    assert f"full log: {out / 'demo.log'}" in first.stdout
    steps = [json.loads(line.split(": ", 2)[2]) for line in log.splitlines() if " INFO grace_demo: step " in line]
    assert [entry.get("loss") is not None for entry in steps[:2]] == [True, True] and "grace/copy_rate" in steps[0]
    assert "Saved the GRACE model" in log and "Saved the contrastive baseline" in log
    assert re.search(r"INFO grace_st\.training\.contrastive: step 4: \{\"loss\": ", log), (
        "the +CL log dicts are in the log"
    )
    results = json.loads((out / "demo_results.json").read_text(encoding="utf-8"))
    assert results["grpo_steps"] == 2 and results["generated_batches"] == 1
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

    # A re-run replaces the demo's own outputs (a stale checkpoint of the earlier run included), keeps other files.
    (out / "checkpoint-7").mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    # The time cap stops this run after its first step, and the summary says so.
    second = run_demo(tiny_config, out, "--max-train-minutes", "0.0001", "--no-contrastive")
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert json.loads((out / "demo_results.json").read_text(encoding="utf-8"))["grpo_steps"] == 1
    assert "stopped training after 1 of 2 steps" in second.stdout
    assert (out / "grace-model" / "modules.json").is_file() and not (out / "contrastive-model").exists()


def test_demo_refuses_a_folder_it_did_not_write(tiny_config, tmp_path):
    out = tmp_path / "someone-elses"
    out.mkdir()
    (out / "data.txt").write_text("keep", encoding="utf-8")
    result = run_demo(tiny_config, out, "--no-contrastive")
    assert result.returncode != 0
    assert f"{out} exists and holds files that no demo run wrote" in result.stderr
    assert "--output-dir" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["data.txt"]
