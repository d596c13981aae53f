"""Recognising a job again: its config hash, the interrupted run to resume, the finished
run a re-run sweep skips."""

import copy
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import keras
from omegaconf import DictConfig, OmegaConf

from vitexp.config import Precision
from vitexp.search.study import owner_alive
from vitexp.search.trial import is_trial
from vitexp.tracking import FINISHED, KILLED, PARENT_ENV, Tracker, flatten, tag
from vitexp.train.callbacks import CheckpointDir
from vitexp.train.jobs import in_multirun
from vitexp.train.preempt import requeued
from vitexp.validate import ConfigError

# Keys that change where a run is recorded or how it resumes, not what it computes (the
# shortcuts act through model.*, which is hashed).
NOT_HASHED = ("tracking", "resume", "report", "patch_size", "depth")
# The process that trains a run, `host:pid` (vitexp.search.owner): a RUNNING run whose
# process is gone was killed (SIGKILL, a crash of the machine) and may be resumed.


def config_hash(cfg: DictConfig) -> str:
    """A short hash of what a run computes, to recognise the same job across sweeps."""
    body = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in NOT_HASHED}
    return hashlib.sha256(repr(sorted(flatten(body).items())).encode()).hexdigest()[:16]


@dataclass
class Resume:
    """Where an interrupted run goes on: after `epoch` committed epochs and, when it was
    checkpointed inside the next one (a Slurm pre-emption), from `in_epoch`, the state of
    that step checkpoint (`CheckpointDir.commit_step`), kept in `step_file`."""

    run_id: str
    out_dir: Path
    epoch: int
    in_epoch: dict | None = None
    step_file: Path | None = None
    precision: str | None = None  # the Keras policy it trained in (its `precision` param)

    def describe(self) -> str:
        if self.in_epoch is None:
            return f"after epoch {self.epoch}"
        return f"in epoch {self.epoch + 1} after its step {self.in_epoch['step']}"


def find_resume(tracker: Tracker, cfg: DictConfig) -> Resume | None:
    """The interrupted run that `resume=true` / `resume=<run id>` asks to continue."""
    if requeued():  # Slurm runs this job again after a pre-emption: continue its run
        return requeued_run(tracker)
    if cfg.resume is False or str(cfg.resume).lower() == "false":
        return None
    wanted = config_hash(cfg)
    if cfg.resume is True or str(cfg.resume).lower() == "true":
        for run in tracker.unfinished_runs(wanted):
            found = _resumable(run)
            if found:
                return found
        other_precision(tracker, cfg)
        raise ConfigError(
            f"resume=true: no interrupted run of this config with a checkpoint in experiment "
            f"{tracker.experiment!r}: run without resume, or give resume=<mlflow run id>"
        )
    run = tracker.get_run(str(cfg.resume))
    if run is None:
        raise ConfigError(f"resume={cfg.resume}: no such MLflow run in {tracker.uri}")
    if run.status == FINISHED:
        raise ConfigError(f"resume={cfg.resume}: that run already FINISHED; nothing to resume")
    if run.tags.get(tag.CONFIG_HASH) != wanted:
        other_precision(tracker, cfg, run)
        raise ConfigError(
            f"resume={cfg.resume}: that run was started with another config; repeat its command "
            f"({run.tags.get(tag.COMMAND, '?')}) with resume={cfg.resume}"
        )
    found = _resumable(run)
    if found is None and run.status == "RUNNING" and owner_alive(run.tags.get(tag.PROCESS)):
        raise ConfigError(
            f"resume={cfg.resume}: that run is still training (process {run.tags[tag.PROCESS]}): "
            "let it finish, or stop it first"
        )
    if found is None:
        raise ConfigError(f"resume={cfg.resume}: the run has no checkpoint to continue from")
    return found


def other_precision(tracker: Tracker, cfg: DictConfig, run=None) -> None:
    """Fails in one line when the run to resume (`run`, else an interrupted run of this
    config) differs from this command in `trainer.precision` alone: its checkpoints hold
    that precision's weights and optimizer state (a float16 loss scale, say)."""
    for precision in Precision:
        if precision == cfg.trainer.precision:
            continue
        changed = copy.deepcopy(cfg)
        changed.trainer.precision = precision
        wanted = config_hash(changed)
        candidates = [run] if run is not None else tracker.unfinished_runs(wanted)
        for candidate in candidates:
            if candidate.tags.get(tag.CONFIG_HASH) == wanted and _resumable(candidate):
                trained = candidate.params.get("precision", precision)
                raise ConfigError(
                    f"resume: run {candidate.id} trained with trainer.precision={precision} "
                    f"({trained}), this command asks for trainer.precision={cfg.trainer.precision}: "
                    f"resume it with trainer.precision={precision}, or start a new run without resume"
                )


def requeued_run(tracker: Tracker) -> Resume | None:
    """The unfinished run this Slurm job wrote before it was requeued, if any."""
    job = os.environ["SLURM_JOB_ID"]  # in each task: a non-chief worker resumes the chief's run
    runs = tracker.find_runs({tag.SLURM_JOB: job}, unfinished=True, newest_first=True, limit=1)
    if not runs:
        return None
    tracker.set_tags(runs[0].id, {tag.SLURM_RESTARTS: os.environ["SLURM_RESTART_COUNT"]})
    return _resumable(runs[0])


def _resumable(run) -> Resume | None:
    """The run's last committed epoch, or the step checkpoint after it; a run stopped in its
    first epoch with neither (KILLED, or RUNNING with its process gone) starts over in the
    same run and folder."""
    folder = run.tags.get(tag.OUTPUT_DIR)
    if not folder:
        return None
    out_dir = Path(folder)
    checkpoints = CheckpointDir(out_dir / "checkpoints")
    epoch = checkpoints.latest_epoch() if out_dir.is_dir() else 0
    step_file, in_epoch = (checkpoints.step_checkpoint() if out_dir.is_dir() else None) or (None, None)
    resume = Resume(run.id, out_dir, epoch, in_epoch, step_file, run.params.get("precision"))
    return resume if epoch or step_file or _stopped(run) else None


def _stopped(run) -> bool:
    """Whether the run's process ended without finishing it: KILLED (Ctrl-C, SIGTERM), or
    left RUNNING by a process that is gone (SIGKILL); unknown for older runs and other hosts."""
    process = run.tags.get(tag.PROCESS)
    return run.status == KILLED or (
        run.status == "RUNNING" and process is not None and not owner_alive(process)
    )


def restore(model: keras.Model, resume: Resume) -> None:
    """Loads weights and optimizer state (moments, EMA, step) of the step checkpoint, else
    of the last committed epoch; nothing when the run resumes before its first."""
    if resume.step_file is None and not resume.epoch:
        return
    model.optimizer.build(model.trainable_variables)
    epoch_file = CheckpointDir(resume.out_dir / "checkpoints").model_file(resume.epoch)
    model.load_weights(resume.step_file or epoch_file)


class EndResumedEpoch(keras.callbacks.Callback):
    """Ends the `fit` that trains the rest of a resumed epoch when that epoch ends (a later
    `fit` trains the epochs after it), and keeps Keras from putting the weight averages
    (EMA) into the model at that `fit`'s end: they stay in the optimizer, as in one `fit`.

    Args:
        epochs: the run's epochs; the last one ends training as usual.
    """

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs
        self._use_ema = False

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 < self.epochs:
            self.model.stop_training = True
            self._use_ema, self.model.optimizer.use_ema = self.model.optimizer.use_ema, False

    def on_train_end(self, logs=None):
        if self._use_ema:
            self.model.optimizer.use_ema = True


def finished_before(tracker: Tracker, cfg: DictConfig):
    """A FINISHED run of exactly this config, when a re-run sweep may skip the job."""
    if not (in_multirun() and cfg.tracking.skip_finished) or cfg.resume not in (False, "false") or is_trial():
        return None
    return tracker.finished_run(config_hash(cfg))


def link_finished(tracker: Tracker, cfg: DictConfig, done) -> str | None:
    """Gives the sweep a child that stands for an earlier FINISHED run of the same config.

    The earlier run keeps its own place (its parent, or none); the link names it and
    carries its params and final metrics, so the new sweep's table and plots are whole.
    """
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return None
    earlier = done.id
    run_id = tracker.start_run(f"{cfg.run_name}-reused", {tag.REUSED_RUN: earlier}, parent)
    with tracker.run(run_id):
        tracker.describe(run_id, f"Not trained again: the same config FINISHED earlier as run {earlier}.")
        tracker.log_params(run_id, dict(done.params))
        tracker.log_metrics(run_id, dict(done.metrics), step=cfg.trainer.epochs)
    return run_id
