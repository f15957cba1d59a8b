"""Folders that training writes: completed checkpoints, and the final GRACE model folder written in one step.

Checkpoints are written by transformers itself (``Trainer._save_checkpoint``, straight into ``checkpoint-N``; no
staging folder, so ``trainer_state.json`` and a Hub push name the real folder). Writing a checkpoint is not atomic,
so GRACE marks a checkpoint complete once transformers has finished it (:class:`CheckpointCompletion`, a public
``on_save`` callback), resumes only from a complete one (:func:`last_complete_checkpoint`) and removes the partial
``checkpoint-N`` that a failed save of the same run left behind (:func:`remove_partial_checkpoints`).

The final model is written into a fresh staging folder beside its target and renamed into place
(:func:`write_folder`); an existing target is replaced only when it is a previous output of the same writer or the
caller asks for it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

CHECKPOINT_COMPLETE_FILE = "grace_checkpoint_complete"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_folders(run_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of a run, by step (complete or not)."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """True when transformers finished writing ``folder`` (GRACE wrote its completion marker after the save)."""
    return (Path(folder) / CHECKPOINT_COMPLETE_FILE).is_file()


def last_complete_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The complete checkpoint with the highest step in ``run_dir``, or None; incomplete ones are skipped (logged)."""
    folders = checkpoint_folders(run_dir)
    partial = [p.name for p in folders if not is_complete_checkpoint(p)]
    if partial:
        logger.warning("Skipping incomplete checkpoint(s) %s in %s (their save did not finish).", partial, run_dir)
    complete = [p for p in folders if is_complete_checkpoint(p)]
    return str(complete[-1]) if complete else None


def remove_partial_checkpoints(run_dir: str | os.PathLike, existing_before: Iterable[str | os.PathLike]) -> list[str]:
    """Remove ``checkpoint-N`` folders of ``run_dir`` that appeared since ``existing_before`` and are incomplete.

    Only folders that did not exist when the run began and carry no completion marker are removed: the partial
    output of a save of this run that failed. Nothing else is touched.

    Returns:
        The removed folders.
    """
    before = {os.path.abspath(p) for p in existing_before}
    removed = []
    for folder in checkpoint_folders(run_dir):
        if os.path.abspath(folder) not in before and not is_complete_checkpoint(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    if removed:
        logger.warning("Removed the partial checkpoint(s) of a failed save: %s", removed)
    return removed


class CheckpointCompletion(TrainerCallback):
    """Marks ``<output_dir>/checkpoint-N`` complete after transformers saved it (``on_save`` runs after the save)."""

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            (folder / CHECKPOINT_COMPLETE_FILE).write_text(f"step {state.global_step}\n", encoding="utf-8")
        else:  # e.g. a hyperparameter search, which saves under run-<trial>/
            logger.warning("Checkpoint folder %s not found; it is not marked complete.", folder)


def write_folder(
    target: str | os.PathLike,
    write: Callable[[str], None],
    *,
    marker: str,
    overwrite: bool = False,
) -> str:
    """Write a folder with ``write(staging)`` in a fresh staging folder beside ``target``, then rename it into place.

    The staging folder is a new ``tempfile.mkdtemp`` folder (``_<name>.tmp-*``; the leading underscore keeps it out
    of Trainer's Hub uploads); it is removed if ``write`` fails. An existing ``target`` is replaced only when it is
    empty, when it holds the file ``marker`` (a previous output of the same writer) or when ``overwrite`` is True;
    otherwise nothing is written and an error names the folder.

    Args:
        target: the folder to write.
        write: writes the folder's content into the path it is given; it must write ``marker``.
        marker: file name that identifies a previous output of this writer.
        overwrite: replace any existing ``target``. Defaults to False.

    Returns:
        ``target`` as a string.

    Raises:
        FileExistsError: ``target`` exists, is not empty, holds no ``marker`` and ``overwrite`` is False; or it is a
            file.
    """
    target = Path(target)
    check_writable_folder(target, marker=marker, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"_{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; the final folder gets the usual permissions
    try:
        write(str(staging))
        if not (staging / marker).is_file():
            raise RuntimeError(f"The folder writer did not write its marker file {marker!r}.")
        if target.exists():
            # Move the old folder aside (a fresh name we created), put the new one in place, then delete the old one.
            backup = Path(tempfile.mkdtemp(prefix=f"_{target.name}.old-", dir=target.parent))
            os.replace(target, backup)
            try:
                os.replace(staging, target)
            except OSError:
                os.replace(backup, target)  # put the old folder back
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def check_writable_folder(target: str | os.PathLike, *, marker: str, overwrite: bool = False) -> None:
    """Raise unless :func:`write_folder` may write ``target`` (see there); nothing is written.

    Raises:
        FileExistsError: naming the folder and how to proceed.
    """
    target = Path(target)
    if target.is_file():
        raise FileExistsError(f"{target} is a file; the model is written as a folder. Choose another path.")
    if not target.is_dir() or overwrite or (target / marker).is_file() or not any(target.iterdir()):
        return
    raise FileExistsError(
        f"{target} exists and holds files that this trainer did not write (no {marker}); refusing to replace it. "
        "Choose another folder, empty it yourself, or pass overwrite=True."
    )
