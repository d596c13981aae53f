"""What this process is in its job: alone, the chief of several workers, or another worker,
which trains in lockstep and records into a private store of its own. A `Role` sets up
signals, the workers and TensorFlow, opens the tracker, and finds and opens the run this
process writes."""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import keras
from omegaconf import DictConfig

from vitexp.search.study import owner
from vitexp.tracking import PARENT_ENV, Tracker, tag
from vitexp.train.callbacks import CheckpointDir, replay_missing
from vitexp.train.devices import distribution, setup_tensorflow
from vitexp.train.jobs import job_dir
from vitexp.train.multiworker import Workers, start_workers
from vitexp.train.preempt import STOP, slurm_job_id
from vitexp.train.record import run_tags
from vitexp.train.resume import Resume, find_resume


@dataclass
class RunPlace:
    """Where a run's records and files go: its MLflow run, its folder, its first epoch."""

    run_id: str
    out_dir: Path
    first_epoch: int


@dataclass
class Role:
    """This process's part in its job.

    Attributes:
        cfg: the config as this process records it (a non-chief worker's store is private).
        tracker: the store this process writes.
        workers: the job's workers, None for a job of one process.
        precision_reason: why it trains in its precision (`trainer.precision=auto`'s choice).
    """

    cfg: DictConfig
    tracker: Tracker
    workers: Workers | None = None
    precision_reason: str = ""

    @classmethod
    def start(cls, cfg: DictConfig) -> "Role":
        """Signals, the workers (before anything touches TensorFlow's devices), threads,
        seeds and precision, then the tracker."""
        several = cfg.trainer.strategy == "multi_worker"
        STOP.install(workers=several)
        workers = start_workers() if several else None
        if workers:
            STOP.reclaim()
        _, precision_reason = setup_tensorflow(cfg)
        if workers and not workers.is_chief:
            cfg = workers.private_config(cfg)
        return cls(cfg, Tracker.from_config(cfg.tracking, shield=STOP.held), workers, precision_reason)

    @property
    def records_privately(self) -> bool:
        """A non-chief worker: the chief writes the run everyone trains."""
        return self.workers is not None and not self.workers.is_chief

    def strategy(self):
        """The tf.distribute strategy to build in (None: the default device)."""
        if self.workers:
            return self.workers.strategy
        return distribution(self.cfg.trainer.strategy, self.cfg.trainer.jit_compile)

    def find_resume(self) -> Resume | None:
        """The interrupted run to continue (the chief's, for every worker), in its precision."""
        found = self.workers.find_resume() if self.records_privately else find_resume(self.tracker, self.cfg)
        if found:
            continue_in_precision(found)
        return found

    def open_run(self, resume: Resume | None) -> RunPlace:
        """The MLflow run this process writes: the resumed one, reopened, or a new one."""
        if self.records_privately:
            return RunPlace(*self.workers.open_run(self.tracker, self.cfg, resume))
        return RunPlace(*open_run(self.tracker, self.cfg, resume))


def continue_in_precision(resume) -> None:
    """A resumed run trains on in the precision its checkpoints hold, also where
    `trainer.precision=auto` would choose another here (a requeued job on another node)."""
    now = keras.mixed_precision.global_policy().name
    if resume.precision and resume.precision != now:
        print(
            f"vitexp: run {resume.run_id} trained in {resume.precision}, and goes on in it "
            f"(auto would choose {now} here)",
            file=sys.stderr,
        )
        keras.mixed_precision.set_global_policy(resume.precision)


def open_run(tracker: Tracker, cfg: DictConfig, resume) -> tuple[str, Path, int]:
    """The MLflow run this job writes: the resumed one, reopened, or a new one."""
    if resume:
        tracker.reopen(resume.run_id)
        tracker.set_tags(resume.run_id, {tag.PROCESS: owner()})  # the process training it now
        replay_missing(tracker, resume.run_id, CheckpointDir(resume.out_dir / "checkpoints"))
        if resume.in_epoch:  # the optimizer step it goes on from: none is trained twice
            step = resume.in_epoch["iterations"]
            tracker.log_metrics(resume.run_id, {"resumed_step": step}, step=resume.epoch + 1)
        print(f"vitexp: resuming run {resume.run_id} {resume.describe()}", file=sys.stderr)
        return resume.run_id, resume.out_dir, resume.epoch
    out_dir = job_dir()
    tags = {**run_tags(cfg, out_dir), **({tag.SLURM_JOB: slurm_job_id()} if slurm_job_id() else {})}
    return tracker.start_run(cfg.run_name, tags, os.environ.get(PARENT_ENV)), out_dir, 0
