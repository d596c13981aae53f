"""One training job, as a recipe: start this process's part, build what it trains, open its
run, fit and test, record. Errors a user causes end in one line; a sweep goes on past them."""

import contextlib
import os
import shlex
import shutil
import sys
from functools import partial
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vitexp.data.pipeline import predict_views
from vitexp.errors import fail
from vitexp.provenance import command_line
from vitexp.search.trial import trial_callbacks
from vitexp.tracking import FAILED, PARENT_ENV, StoreDown, Tracker, TrackingError, tag
from vitexp.train.build import USER_ERRORS, Built, build
from vitexp.train.callbacks import CheckpointDir, TargetWatch
from vitexp.train.fit import fit_and_record, tell
from vitexp.train.jobs import Job, in_multirun, job_dir
from vitexp.train.preempt import STOP, Terminated, requeue
from vitexp.train.record import config_params, log_setup, print_summary, run_tags
from vitexp.train.resume import finished_before, link_finished
from vitexp.train.role import Role
from vitexp.validate import check_config, doubts


def train(cfg: DictConfig, callbacks: tuple = ()) -> float:
    """Runs one job end to end and returns its best validation top-1 (for sweepers).

    Args:
        cfg: the composed config (`vitexp.config.compose`).
        callbacks: Keras callbacks to add to `fit`, after vitexp's own.
    """
    check_config(cfg)
    for doubt in doubts(cfg):
        print(f"vitexp: warning: {doubt}", file=sys.stderr, flush=True)
    role = Role.start(cfg)
    done = finished_before(role.tracker, role.cfg)
    if done is not None:  # a re-run sweep: this job already finished
        return skip_finished(role, done)
    resume = role.find_resume()
    tell(f"{cfg.run_name}: loading {cfg.data.name}, building {cfg.model.name}")
    built = build_or_record(role, resume)
    with contextlib.ExitStack() as recorded:
        with STOP.held():  # a run once opened is recorded: Ctrl-C waits until it ends KILLED
            place = role.open_run(resume)
            job = Job(
                cfg=role.cfg,
                tracker=role.tracker,
                run_id=place.run_id,
                model=built.model,
                schedule=built.schedule,
                splits=built.splits,
                steps=built.steps,
                out_dir=place.out_dir,
                first_epoch=place.first_epoch,
                class_names=built.data.class_names,
                in_epoch=resume.in_epoch if resume else None,
            )
            recorded.enter_context(recording(job))
        if not resume:
            record_setup(job, role, built)
        result = fit_and_record(job, (*callbacks, *watchers(job)))
    if role.workers:
        role.workers.report(job.model)
    if not role.records_privately:
        print_summary(job.cfg, job.tracker, job.run_id, result)
    return float(result["best_val_top1"])


def skip_finished(role: Role, done) -> float:
    """A job a re-run sweep finished before: linked under the new parent, not trained again."""
    link_finished(role.tracker, role.cfg, done)
    print(f"vitexp: {role.cfg.run_name} already FINISHED as run {done.id}; skipped", file=sys.stderr)
    return float(done.metrics.get("best_val_top1", float("nan")))


def build_or_record(role: Role, resume) -> Built:
    """`build`, and a sweep keeps a record of every job it ran: one that fails here is a FAILED run."""
    try:
        return build(role.cfg, role.strategy(), resume)
    except Exception as err:
        if in_multirun() and not resume:
            record_failed_job(role.tracker, role.cfg, err)
        raise


def record_setup(job: Job, role: Role, built: Built) -> None:
    """What a new run records before training: config, splits, model, replicas, class names."""
    log_setup(job.tracker, job.run_id, job.cfg, job.model, job.splits, job.out_dir)
    strategy = role.strategy()
    replicas = str(strategy.num_replicas_in_sync if strategy else 1)
    job.tracker.log_params(job.run_id, {"replicas": replicas, "precision_reason": role.precision_reason})
    job.tracker.log_class_names(job.run_id, built.data.class_names)


def watchers(job: Job) -> list:
    """Callbacks that watch training for others: the time-to-accuracy check on the test split
    (`trainer.target_top1`, `make speedrun`) and a search trial's reports to its pruner."""
    found = list(trial_callbacks(job.tracker, job.run_id))
    t = job.cfg.trainer
    if t.target_top1 is not None:
        x, y = job.splits.test
        predict = partial(predict_views, x=x, y=y, num_classes=job.cfg.data.num_classes,
                          batch_size=t.batch_size, tta=t.tta)  # fmt: skip
        found.insert(0, TargetWatch(job.tracker, job.run_id, predict, y, t.target_top1))
    return found


@contextlib.contextmanager
def recording(job: Job):
    """The run's records while it trains: FAILED with its error, KILLED with the way on after
    Ctrl-C or SIGTERM, and after a store that stayed away, the command that records the rest."""
    try:
        with job.tracker.run(job.run_id, error_text):
            STOP.check()  # one dropped while the run was set up
            yield
            STOP.check()
    except KeyboardInterrupt as stop:
        STOP.handled()
        print(interrupted_message(job.run_id, job.out_dir, stop, job.tracker.unsent), file=sys.stderr)
        raise
    except StoreDown as down:  # trained, but not all of it recorded
        raise TrackingError(
            f"{down}: run {job.run_id} trained to its end, its checkpoints are in "
            f"{job.out_dir / 'checkpoints'}; once the store is back, record the rest with: {resume_command()}"
        ) from None


def record_failed_job(tracker: Tracker, cfg: DictConfig, err: BaseException) -> str:
    """A sweep job that failed before its run existed (data, model) still gets a FAILED run."""
    run_id = tracker.start_run(cfg.run_name, run_tags(cfg, job_dir()), os.environ.get(PARENT_ENV))
    tracker.log_params(run_id, config_params(cfg))
    tracker.set_tags(run_id, {tag.ERROR: error_text(err)})
    tracker.end_run(run_id, FAILED)
    return run_id


def error_text(err: BaseException) -> str:
    """What a FAILED run records: the one-line message of a user error, else type and text."""
    text = str(err) if isinstance(err, USER_ERRORS) else f"{type(err).__name__}: {err}"
    return text[:5000]


def interrupted_message(run_id: str, out_dir: Path, stop: KeyboardInterrupt, unsent: int = 0) -> str:
    """What to do after Ctrl-C or SIGTERM: resume from the last checkpoint, or start again;
    under Slurm, a pre-empted job requeues itself. `unsent`: writes a store that did not
    answer never took, its KILLED status among them: the run stays RUNNING there."""
    how = f"terminated ({stop.signal_name})" if isinstance(stop, Terminated) else "interrupted"
    killed = "is KILLED"
    if unsent:
        killed = f"stays RUNNING in the tracking store (it did not take the last {unsent} records)"
    checkpoints = CheckpointDir(out_dir / "checkpoints")
    epoch = checkpoints.latest_epoch() if checkpoints.folder.is_dir() else 0
    if getattr(stop, "requeue", False):
        where = stop.where or f"after epoch {epoch}"
        return f"vitexp: {how}; run {run_id} {killed} {where}; {requeue()}"
    if getattr(stop, "where", ""):  # where the workers stopped together
        how = f"{how} {stop.where}"
    if not epoch:
        return (
            f"vitexp: {how} in the first epoch; run {run_id} {killed} with no checkpoint; "
            f"start it again with: {command_line()}"
        )
    return (
        f"vitexp: {how}; run {run_id} {killed}, its last checkpoint (epoch {epoch}) is in "
        f"{checkpoints.folder}; continue it with: {command_line(resume=True)}"
    )


def resume_command() -> str:
    """The command that resumes this job's run: a sweep's job on its own, with its overrides."""
    if not in_multirun():
        return command_line(resume=True)
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]
    return " ".join(["python -m vitexp", *map(shlex.quote, overrides), "resume=true"])


def run_job(cfg: DictConfig) -> float:
    """Hydra's task function: user errors end a single run in one line with exit code 2,
    Ctrl-C ends it (and a sweep) with 130, SIGTERM with 143. In a sweep, a failing job is
    recorded FAILED, says why in one line and returns NaN, so every launcher goes on with the
    other jobs (the sweep's callback reports the failures and exits non-zero at the end)."""
    try:
        return train(cfg)
    except Terminated:
        sys.exit(143)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as err:
        if in_multirun():
            job = HydraConfig.get().job
            reason = error_text(err).splitlines()[0]
            print(f"vitexp: error: job {job.num} ({job.override_dirname}): {reason}", file=sys.stderr)
            return float("nan")
        if not isinstance(err, USER_ERRORS):
            raise
        discard_unused_job_dir()
        fail(str(err))


def discard_unused_job_dir() -> None:
    """Removes the run folder Hydra made for a job that failed before it wrote anything of its
    own (only Hydra's `.hydra/` and log are there), and the folders above it that this
    leaves empty, up to the working directory."""
    if not HydraConfig.initialized():
        return
    folder, cwd = Path(HydraConfig.get().runtime.output_dir).resolve(), Path.cwd().resolve()
    if cwd == folder or cwd.is_relative_to(folder) or not folder.is_dir():
        return
    if any(p.name != ".hydra" and p.suffix != ".log" for p in folder.iterdir()):
        return
    shutil.rmtree(folder, ignore_errors=True)
    for parent in folder.parents:
        if parent == cwd or not parent.is_relative_to(cwd) or any(parent.iterdir()):
            break
        parent.rmdir()
