"""Recognising a job again: its config hash, the interrupted run to resume, the finished
run a re-run sweep skips."""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import keras
from omegaconf import DictConfig, OmegaConf

from vitexp.callbacks import CheckpointDir
from vitexp.jobs import in_multirun
from vitexp.preempt import SLURM_TAG, requeued, slurm_job_id
from vitexp.tracking import CONFIG_HASH_TAG, FINISHED, KILLED, PARENT_ENV, Tracker, flatten
from vitexp.trial import is_trial
from vitexp.validate import ConfigError

# Keys that change where a run is recorded or how it resumes, not what it computes (the
# shortcuts act through model.*, which is hashed).
NOT_HASHED = ("tracking", "resume", "report", "patch_size", "depth")


def config_hash(cfg: DictConfig) -> str:
    """A short hash of what a run computes, to recognise the same job across sweeps."""
    body = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in NOT_HASHED}
    return hashlib.sha256(repr(sorted(flatten(body).items())).encode()).hexdigest()[:16]


@dataclass
class Resume:
    run_id: str
    out_dir: Path
    epoch: int


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
        raise ConfigError(
            f"resume=true: no interrupted run of this config with a checkpoint in experiment "
            f"{tracker.experiment!r}: run without resume, or give resume=<mlflow run id>"
        )
    run = tracker.get_run(str(cfg.resume))
    if run is None:
        raise ConfigError(f"resume={cfg.resume}: no such MLflow run in {tracker.uri}")
    if run.info.status == FINISHED:
        raise ConfigError(f"resume={cfg.resume}: that run already FINISHED; nothing to resume")
    if run.data.tags.get(CONFIG_HASH_TAG) != wanted:
        raise ConfigError(
            f"resume={cfg.resume}: that run was started with another config; repeat its command "
            f"({run.data.tags.get('vitexp.command', '?')}) with resume={cfg.resume}"
        )
    found = _resumable(run)
    if found is None:
        raise ConfigError(f"resume={cfg.resume}: the run has no checkpoint to continue from")
    return found


def requeued_run(tracker: Tracker) -> Resume | None:
    """The unfinished run this Slurm job wrote before it was requeued, if any."""
    runs = tracker.find_runs({SLURM_TAG: slurm_job_id()}, unfinished=True, newest_first=True, limit=1)
    if not runs:
        return None
    tracker.set_tags(runs[0].info.run_id, {"vitexp.slurm_restarts": os.environ["SLURM_RESTART_COUNT"]})
    return _resumable(runs[0])


def _resumable(run) -> Resume | None:
    """The run's last committed epoch; a run stopped (KILLED) in its first epoch starts over
    in the same run and folder."""
    folder = run.data.tags.get("vitexp.output_dir")
    if not folder:
        return None
    out_dir = Path(folder)
    epoch = CheckpointDir(out_dir / "checkpoints").latest_epoch() if out_dir.is_dir() else 0
    return Resume(run.info.run_id, out_dir, epoch) if epoch or run.info.status == KILLED else None


def restore(model: keras.Model, resume: Resume) -> None:
    """Loads weights and optimizer state (moments, step) of the last committed epoch."""
    model.optimizer.build(model.trainable_variables)
    model.load_weights(CheckpointDir(resume.out_dir / "checkpoints").model_file(resume.epoch))


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
    earlier = done.info.run_id
    run_id = tracker.start_run(f"{cfg.run_name}-reused", {"vitexp.reused_run": earlier}, parent)
    with tracker.run(run_id):
        tracker.describe(run_id, f"Not trained again: the same config FINISHED earlier as run {earlier}.")
        tracker.log_params(run_id, dict(done.data.params))
        tracker.log_metrics(run_id, dict(done.data.metrics), step=cfg.trainer.epochs)
    return run_id
