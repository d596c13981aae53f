"""Groups a Hydra multirun in MLflow: one parent run, a child run per job.

The parent is created before the first job and its id handed to every job through the
environment, which works for in-process, joblib, submitit and Slurm launchers alike. It
is closed when the sweep ends, and also when the sweep process exits early (a failing
job, Ctrl-C): FAILED if any child failed or the sweep was cut short, else FINISHED.
"""

import atexit
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vitexp.errors import fail
from vitexp.provenance import command_line
from vitexp.tracking import ERROR_TAG, FAILED, FINISHED, PARENT_ENV, Tracker, TrackingError


class MlflowSweepCallback(Callback):
    def __init__(self) -> None:
        self.tracker: Tracker | None = None
        self.parent_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from vitexp.search import resumed_parent

        try:
            self.tracker = Tracker.from_config(config.tracking)
        except TrackingError as err:  # before any job ran: one line, as a single run says it
            fail(str(err))
        # an interrupted Optuna search that is run again continues under its own parent
        self.parent_id = resumed_parent(config, self.tracker) or self.new_parent(config)
        os.environ[PARENT_ENV] = self.parent_id
        atexit.register(self.close, interrupted=True)
        self.close_stale(command_line())

    def new_parent(self, config: DictConfig) -> str:
        name = f"sweep-{config.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        parent_id = self.tracker.start_run(
            name,
            tags={
                "vitexp.sweep": "true",
                "vitexp.command": command_line(),
                "vitexp.sweep_dir": str(config.hydra.sweep.dir),
            },
        )
        self.tracker.log_params(parent_id, {"sweep.overrides": " ".join(config.hydra.overrides.task)})
        return parent_id

    def close_stale(self, command: str) -> None:
        """Marks FAILED the parents of earlier runs of this same sweep left RUNNING by a kill."""
        stale = self.tracker.find_runs({"vitexp.sweep": "true"}, "RUNNING")
        for run in stale:
            if run.info.run_id != self.parent_id and run.data.tags.get("vitexp.command") == command:
                self.tracker.set_tags(run.info.run_id, {"vitexp.superseded_by": self.parent_id})
                self.tracker.end_run(run.info.run_id, FAILED)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.tracker is None or self.parent_id is None:
            return
        parent = self.parent_id
        self.log_outcome(Path(config.hydra.sweep.dir))
        self.close(interrupted=False)
        failed = self.report(parent)
        if failed:
            sys.exit(1)  # after every job ran and was recorded

    def report(self, parent: str) -> int:
        """Prints what the sweep left and what to run next; returns how many jobs failed."""
        children = self.tracker.children(parent)
        counts = Counter(run.info.status for run in children)
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        uri = self.tracker.uri
        serve = f" (after: {self.tracker.ui_command()})" if self.tracker.ui_command() else ""
        print(
            f"vitexp: sweep {parent}: {summary or 'no jobs'}\n"
            f"  compare: python -m vitexp.compare {parent} --tracking-uri {uri}\n"
            f"  UI: {self.tracker.ui_link(parent)}{serve}",
            file=sys.stderr,
        )
        # a search's trial that a kill cut short is FAILED but was run again
        failed = [r for r in children if r.info.status == FAILED and "vitexp.retried" not in r.data.tags]
        if failed:
            first = failed[0].data.tags.get(ERROR_TAG, "no error recorded").splitlines()[0]
            print(
                f"vitexp: error: {len(failed)} of {len(children)} jobs failed (they are FAILED runs "
                f"under {parent}); first: {failed[0].info.run_name}: {first}",
                file=sys.stderr,
            )
        return len(failed)

    def log_outcome(self, sweep_dir: Path) -> None:
        """The sweep's comparison table and plot (a search logs its own results: vitexp.search_report)."""
        from vitexp.compare import compare

        try:
            compare(self.parent_id, self.tracker.uri, "best_val_top1", sweep_dir / "comparison")
        except ValueError as err:  # no finished child to compare
            print(f"vitexp: no comparison for the sweep: {err}", file=sys.stderr)

    def close(self, interrupted: bool) -> None:
        """Ends the parent run once: FAILED if a child failed or the sweep stopped early."""
        if self.tracker is None or self.parent_id is None:
            return
        parent, self.parent_id = self.parent_id, None
        os.environ.pop(PARENT_ENV, None)
        children = self.tracker.children(parent)
        failed = interrupted or any(
            run.info.status != FINISHED and "vitexp.retried" not in run.data.tags for run in children
        )
        self.tracker.end_run(parent, FAILED if failed else FINISHED)
