"""grace_st.training.checkpoints on plain folders: completion markers, partial-checkpoint cleanup, one-step writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from grace_st.training.checkpoints import (
    CHECKPOINT_COMPLETE_FILE,
    check_writable_folder,
    checkpoint_folders,
    last_complete_checkpoint,
    remove_partial_checkpoints,
    write_folder,
)

MARKER = "made_by_me.json"


def make_checkpoint(run: Path, step: int, complete: bool) -> Path:
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w")
    if complete:
        (folder / CHECKPOINT_COMPLETE_FILE).write_text(f"step {step}\n")
    return folder


def test_checkpoints_are_ordered_by_step_and_only_complete_ones_resume(tmp_path):
    for step, complete in ((2, True), (10, True), (30, False)):
        make_checkpoint(tmp_path, step, complete)
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name
    (tmp_path / "checkpoint-40").write_text("a file, not a folder")
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["checkpoint-2", "checkpoint-10", "checkpoint-30"]
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_only_new_incomplete_checkpoints_are_removed(tmp_path):
    old_partial = make_checkpoint(tmp_path, 1, complete=False)  # there before the run: not ours to delete
    before = [str(p) for p in checkpoint_folders(tmp_path)]
    new_complete = make_checkpoint(tmp_path, 2, complete=True)
    new_partial = make_checkpoint(tmp_path, 3, complete=False)
    assert remove_partial_checkpoints(tmp_path, before) == [str(new_partial)]
    assert old_partial.is_dir() and new_complete.is_dir() and not new_partial.exists()


def _writer(content: str):
    def write(path: str) -> None:
        Path(path, "data.txt").write_text(content)
        Path(path, MARKER).write_text("{}")

    return write


def test_write_folder_writes_replaces_its_own_output_and_refuses_others(tmp_path):
    target = tmp_path / "out"
    write_folder(target, _writer("one"), marker=MARKER)
    write_folder(target, _writer("two"), marker=MARKER)  # its own previous output: replaced
    assert (target / "data.txt").read_text() == "two"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        write_folder(foreign, _writer("x"), marker=MARKER)
    assert os.listdir(foreign) == ["keep.txt"]
    write_folder(foreign, _writer("x"), marker=MARKER, overwrite=True)
    assert sorted(os.listdir(foreign)) == sorted([MARKER, "data.txt"])
    empty = tmp_path / "empty"
    empty.mkdir()
    write_folder(empty, _writer("e"), marker=MARKER)  # an empty folder holds nothing to lose
    assert sorted(os.listdir(tmp_path)) == ["empty", "foreign", "out"]  # no staging or backup folder left
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        check_writable_folder(tmp_path / "file", marker=MARKER)


def test_a_failed_write_leaves_the_old_folder_and_no_staging_folder(tmp_path):
    target = tmp_path / "out"
    write_folder(target, _writer("old"), marker=MARKER)

    def failing(path: str) -> None:
        Path(path, "half.bin").write_bytes(b"h")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_folder(target, failing, marker=MARKER)
    with pytest.raises(RuntimeError, match="marker"):
        write_folder(target, lambda path: Path(path, "data.txt").write_text("no marker"), marker=MARKER)
    assert (target / "data.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["out"]


def test_written_folder_gets_the_umasks_permissions_not_mkdtemps(tmp_path):
    def write(folder):
        Path(folder, "marker.json").write_text("{}")

    umask = os.umask(0o022)
    try:
        write_folder(tmp_path / "model", write, marker="marker.json")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "model").st_mode) == 0o755  # mkdtemp alone gives 0700
