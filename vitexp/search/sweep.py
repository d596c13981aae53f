"""Groups a Hydra multirun in MLflow: one parent run, a child run per job.

The parent is created before the first job and its id handed to every job through the
environment, which works for in-process, joblib, submitit and Slurm launchers alike. It
is closed when the sweep ends, and also when the sweep process exits early (a failing
job, Ctrl-C): FAILED if any child failed or the sweep was cut short, else FINISHED.

When the sweep ends, the parent answers it: metrics `best_val_top1` and `best_test_top1` (of
the job with the best validation top-1; `best_test_top1_1view` too where it was scored with
test-time views), `trials_finished`, `trials_failed` and
`trials_pruned`; tags `best.run_id`, `best.run_name` and `best.<swept param>` (the values
that won); a description saying the same; and the comparison (`vitexp.compare`). The link
printed last opens the MLflow runs table on the sweep: its jobs best first, with the swept
parameters and their validation and test top-1 as columns, the parent's row beside the
winner's (`vitexp.tracking.views`).
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
from vitexp.report.compare import compare, swept_params
from vitexp.search.study import resumed_parent
from vitexp.tracking import FAILED, FINISHED, PARENT_ENV, Tracker, TrackingError, tag
from vitexp.tracking.views import sweep_view

SCORES = ("best_val_top1", "test_top1", "best_test_top1")  # the columns of the sweep's table


def best_job(children):
    """The finished job with the best validation top-1, None if there is none."""
    done = [r for r in children if r.status == FINISHED and "best_val_top1" in r.metrics]
    return max(done, key=lambda r: r.metrics["best_val_top1"], default=None)


def sweep_answer(children, swept: list[str]) -> tuple[dict[str, float], dict[str, str], str]:
    """The sweep's result for its parent run: metrics, tags and a one-line description.

    Args:
        children: the sweep's jobs (MLflow runs); a search's trial that was run again is left out.
        swept: the params that differ between the jobs (`vitexp.compare.swept_params`).
    """
    jobs = [r for r in children if tag.RETRIED not in r.tags]
    pruned = [r for r in jobs if tag.PRUNED_EPOCH in r.tags]
    finished = [r for r in jobs if r.status == FINISHED and r not in pruned]
    metrics = {
        "trials_finished": len(finished),
        "trials_failed": sum(r.status != FINISHED for r in jobs),
        "trials_pruned": len(pruned),
    }
    counts = f"{metrics['trials_finished']} finished, {metrics['trials_failed']} failed"
    counts += f", {metrics['trials_pruned']} pruned" if pruned else ""
    best = best_job(jobs)
    if best is None:
        return metrics, {}, f"No job finished ({counts})."
    won = {k: best.params.get(k, "") for k in swept}
    metrics["best_val_top1"] = best.metrics["best_val_top1"]
    scores = f"val top-1 {metrics['best_val_top1']:.4f}"
    if "test_top1" in best.metrics:
        metrics["best_test_top1"] = best.metrics["test_top1"]
        scores += f", test top-1 {metrics['best_test_top1']:.4f}"
        if "test_top1_1view" in best.metrics:  # scored with test-time views (trainer.tta)
            metrics["best_test_top1_1view"] = best.metrics["test_top1_1view"]
            scores += f" (one view {metrics['best_test_top1_1view']:.4f})"
    tags = {"best.run_id": best.id, "best.run_name": best.name}
    tags.update({f"best.{k}": v for k, v in won.items()})
    values = " ".join(f"{k}={v}" for k, v in won.items())
    note = f"Best: {best.name}{f' ({values})' if values else ''}: {scores} ({counts})."
    return metrics, tags, note


class MlflowSweepCallback(Callback):
    def __init__(self) -> None:
        self.tracker: Tracker | None = None
        self.parent_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
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
                tag.SWEEP: "true",
                tag.COMMAND: command_line(),
                tag.SWEEP_DIR: str(config.hydra.sweep.dir),
            },
        )
        self.tracker.log_params(parent_id, {"sweep.overrides": " ".join(config.hydra.overrides.task)})
        return parent_id

    def close_stale(self, command: str) -> None:
        """Marks FAILED the parents of earlier runs of this same sweep left RUNNING by a kill."""
        stale = self.tracker.find_runs({tag.SWEEP: "true"}, "RUNNING")
        for run in stale:
            if run.id != self.parent_id and run.tags.get(tag.COMMAND) == command:
                self.tracker.set_tags(run.id, {tag.SUPERSEDED_BY: self.parent_id})
                self.tracker.end_run(run.id, FAILED)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.tracker is None or self.parent_id is None:
            return
        parent = self.parent_id
        if not self.tracker.wait_reachable():
            self.parent_id = None  # nothing more can be written to it
            print(
                f"vitexp: error: tracking store {self.tracker.uri} still unreachable after "
                f"{self.tracker.reconnect_s:.0f} s: sweep {parent} stays RUNNING; once the store is back, "
                "record each job the outage cut short with the command its line gave, then run this "
                "sweep again: its FINISHED jobs are skipped and grouped under a new parent",
                file=sys.stderr,
            )
            sys.exit(1)
        note, link = self.log_outcome(Path(config.hydra.sweep.dir))
        self.close(interrupted=False)
        failed = self.report(parent, note, link)
        if failed:
            sys.exit(1)  # after every job ran and was recorded

    def report(self, parent: str, note: str, link: str) -> int:
        """Prints what the sweep left and what to run next; returns how many jobs failed."""
        children = self.tracker.children(parent)
        counts = Counter(run.status for run in children)
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        uri = self.tracker.uri
        serve = f" (after: {self.tracker.ui_command()})" if self.tracker.ui_command() else ""
        print(
            f"vitexp: sweep {parent}: {summary or 'no jobs'}\n"
            f"  {note}\n"
            f"  compare: python -m vitexp.compare {parent} --tracking-uri {uri}\n"
            f"  UI: {link}{serve}",
            file=sys.stderr,
        )
        # a search's trial that a kill cut short is FAILED but was run again
        failed = [r for r in children if r.status == FAILED and tag.RETRIED not in r.tags]
        if failed:
            first = failed[0].tags.get(tag.ERROR, "no error recorded").splitlines()[0]
            print(
                f"vitexp: error: {len(failed)} of {len(children)} jobs failed (they are FAILED runs "
                f"under {parent}); first: {failed[0].name}: {first}",
                file=sys.stderr,
            )
        return len(failed)

    def log_outcome(self, sweep_dir: Path) -> tuple[str, str]:
        """The sweep's answer on its parent, its comparison table and pictures (a search also
        logs its own results: vitexp.search.report), and the runs table's view of it; returns
        the answer in words and the view's link."""
        parent = self.parent_id
        jobs = [r for r in self.tracker.children(parent) if tag.EVALUATES not in r.tags]
        print(f"vitexp: comparing the sweep's {len(jobs)} jobs, drawing its pictures...", file=sys.stderr)
        swept = swept_params(jobs)
        metrics, tags, note = sweep_answer(jobs, swept)
        if "trials_complete" in self.tracker.get_run(parent).metrics:  # a search counts its own
            metrics = {k: v for k, v in metrics.items() if k not in ("trials_failed", "trials_pruned")}
        self.tracker.log_metrics(parent, metrics, step=0)
        self.tracker.flush(raise_errors=False)
        self.tracker.set_tags(parent, tags)
        self.tracker.describe(parent, note)
        try:
            compare(parent, self.tracker.uri, "best_val_top1", sweep_dir / "comparison")
        except ValueError as err:  # no finished child to compare
            print(f"vitexp: no comparison for the sweep: {err}", file=sys.stderr)
        view = sweep_view(parent, [r.id for r in jobs], swept, list(SCORES), [f"best.{k}" for k in swept])
        return note, self.tracker.share_view(f"sweep-{parent}", view)

    def close(self, interrupted: bool) -> None:
        """Ends the parent run once: FAILED if a child failed or the sweep stopped early."""
        if self.tracker is None or self.parent_id is None:
            return
        parent, self.parent_id = self.parent_id, None
        os.environ.pop(PARENT_ENV, None)
        children = self.tracker.children(parent)
        failed = interrupted or any(
            run.status != FINISHED and tag.RETRIED not in run.tags for run in children
        )
        self.tracker.end_run(parent, FAILED if failed else FINISHED)
