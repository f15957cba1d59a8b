"""Trainer callbacks of GRACE training: a time budget, and training logs sent to a logger instead of stdout."""

from __future__ import annotations

import json
import logging
import time

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class TimeBudget(TrainerCallback):
    """Stops training once ``minutes`` have passed since training began (checked after each step).

    Args:
        minutes: the budget.
        clock: ``"wall"`` (elapsed time) or ``"cpu"`` (this process's CPU time, all threads: an equal budget for runs
            sharing a machine). Defaults to ``"wall"``.
    """

    CLOCKS = {"wall": time.monotonic, "cpu": time.process_time}

    def __init__(self, minutes: float, clock: str = "wall") -> None:
        if clock not in self.CLOCKS:
            raise ValueError(f"clock={clock!r} is not supported; choose one of {sorted(self.CLOCKS)}.")
        self.seconds = minutes * 60.0
        self.clock = self.CLOCKS[clock]
        self.start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = 0.0 if self.start is None else self.clock() - self.start
        if elapsed > self.seconds and not control.should_training_stop:
            logger.warning("Time budget %.1f min reached at step %d; stopping.", self.seconds / 60, state.global_step)
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"


class LogsToLogger(TrainerCallback):
    """Sends each training log dict to ``log`` (INFO, as JSON) instead of printing it.

    Args:
        log: the logger of the module that trains.
    """

    def __init__(self, log: logging.Logger) -> None:
        self.log = log

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.log.info("step %d: %s", state.global_step, json.dumps(logs, default=str))
