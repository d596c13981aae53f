"""Groups a Hydra multirun in MLflow: one parent run, a child run per job.

The parent is created before the first job and its id handed to every job through the
environment, which works for in-process, joblib, submitit and Slurm launchers alike. It
is closed when the sweep ends, and also when the sweep process exits early (a failing
job, Ctrl-C): FAILED if any child failed or the sweep was cut short, else FINISHED.
"""

import atexit
import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vitexp.tracking import FAILED, FINISHED, PARENT_ENV, Tracker, command_line


class MlflowSweepCallback(Callback):
    def __init__(self) -> None:
        self.tracker: Tracker | None = None
        self.parent_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.tracker = Tracker.from_config(config.tracking)
        name = f"sweep-{config.model.name}-{os.path.basename(config.hydra.sweep.dir)}"
        self.parent_id = self.tracker.start_run(
            name,
            tags={
                "vitexp.sweep": "true",
                "vitexp.command": command_line(),
                "vitexp.sweep_dir": str(config.hydra.sweep.dir),
            },
        )
        self.tracker.log_params(self.parent_id, {"sweep.overrides": " ".join(config.hydra.overrides.task)})
        os.environ[PARENT_ENV] = self.parent_id
        atexit.register(self.close, interrupted=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.close(interrupted=False)

    def close(self, interrupted: bool) -> None:
        """Ends the parent run once: FAILED if a child failed or the sweep stopped early."""
        if self.tracker is None or self.parent_id is None:
            return
        parent, self.parent_id = self.parent_id, None
        os.environ.pop(PARENT_ENV, None)
        children = self.tracker.children(parent)
        failed = interrupted or any(run.info.status != FINISHED for run in children)
        self.tracker.end_run(parent, FAILED if failed else FINISHED)
