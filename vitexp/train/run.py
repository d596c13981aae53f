"""One training job: check the config, load data, build, fit, evaluate, record in MLflow."""

import contextlib
import os
import shlex
import shutil
import sys
from functools import partial
from pathlib import Path

import keras
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from vitexp.data import DataError, ImageData, load_data
from vitexp.data.augment import build_augment
from vitexp.data.pipeline import eval_dataset, predict_views, split_validation, steps_per_epoch, train_dataset
from vitexp.errors import fail
from vitexp.metrics import score_views
from vitexp.models import adapt_input_norm
from vitexp.provenance import command_line
from vitexp.search.study import owner
from vitexp.search.trial import trial_callbacks
from vitexp.tracking import FAILED, PARENT_ENV, StoreDown, Tracker, TrackingError, tag
from vitexp.train.callbacks import (
    CheckpointDir,
    DivergenceError,
    DivergenceGuard,
    EarlyStopping,
    EpochRecorder,
    ProfileSteps,
    SwapEMAWeights,
    TargetWatch,
    replay_missing,
)
from vitexp.train.devices import distribution, jit_setting, setup_tensorflow
from vitexp.train.jobs import Job, Splits, in_multirun, job_dir
from vitexp.train.multiworker import start_workers
from vitexp.train.preempt import STOP, StopAtStepEnd, Terminated, requeue, slurm_job_id
from vitexp.train.record import (
    config_params,
    log_pictures,
    log_setup,
    print_summary,
    record_training,
    run_tags,
)
from vitexp.train.resume import (
    EndResumedEpoch,
    find_resume,
    finished_before,
    link_finished,
    restore,
)
from vitexp.validate import ConfigError, check_config

USER_ERRORS = (ConfigError, DataError, TrackingError, DivergenceError)


def build_model(cfg: DictConfig, train_images: np.ndarray) -> keras.Model:
    from hydra.errors import InstantiationException

    try:
        model = instantiate(cfg.model, _convert_="all")
    except InstantiationException as err:  # a factory's own one-line error, unwrapped
        if isinstance(err.__cause__, USER_ERRORS):
            raise err.__cause__ from None
        raise
    adapt_input_norm(model, train_images)
    return model


def compile_model(model: keras.Model, cfg: DictConfig, total_steps: int):
    schedule = instantiate(cfg.schedule)(peak_lr=cfg.optimizer.learning_rate, total_steps=total_steps)
    optimizer = instantiate(cfg.optimizer)(learning_rate=schedule)
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        # wrapped here rather than by `compile`, so that a checkpoint's compile config names
        # the loss-scale optimizer and a reload gets its state back, the loss scale included
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, name="loss_scale_optimizer")
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=cfg.trainer.label_smoothing
        ),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="top1"),
            keras.metrics.TopKCategoricalAccuracy(k=5, name="top5"),
        ],
        jit_compile=jit_setting(cfg.trainer.jit_compile),
        steps_per_execution=cfg.trainer.steps_per_execution,
    )
    return schedule


def check_split(cfg: DictConfig, count: int) -> None:
    """Fails in one line when `trainer.validation_split` of `count` training images would
    leave a split empty, or fewer images to train on than `trainer.batch_size` (a batch
    larger than the data would repeat images to fill each step)."""
    t, limit = cfg.trainer, cfg.data.train_limit
    given = f"{count} training image{'s' if count != 1 else ''}"
    given += f" (data.train_limit={limit})" if limit else ""
    if count < 2:
        more = "raise data.train_limit" if limit else "add images"
        raise DataError(f"{given}: a run needs at least 2, one to train on and one to validate; {more}")
    kept = int(count * (1.0 - t.validation_split))
    if kept in (0, count):
        empty = "none to train on" if kept == 0 else "none to validate on"
        raise DataError(
            f"trainer.validation_split={t.validation_split} of {given} leaves {empty}: "
            "use a fraction that keeps both splits, e.g. trainer.validation_split=0.2"
        )
    if t.batch_size > kept:
        raise DataError(
            f"trainer.batch_size={t.batch_size} is larger than the training split: {kept} of {given} "
            f"after trainer.validation_split={t.validation_split}; set trainer.batch_size={kept} or less"
        )


def split(data: ImageData, fraction: float) -> Splits:
    train, val = split_validation(data.train_x, data.train_y, fraction)
    return Splits(train, val, (data.test_x, data.test_y))


def training_callbacks(job: Job, checkpoints: CheckpointDir, extra=()) -> list:
    """vitexp's callbacks in the order they must run, then `extra`."""
    t = job.cfg.trainer
    recorder = EpochRecorder(
        job.tracker, job.run_id, job.schedule, job.steps * t.batch_size, checkpoints, job.in_epoch
    )
    callbacks = [DivergenceGuard(job.schedule), recorder]
    if job.model.optimizer.use_ema:  # validate and checkpoint the averaged weights
        callbacks.insert(1, SwapEMAWeights(restored=job.first_epoch > 0 and job.in_epoch is None))
    stop = t.early_stopping
    if stop.patience is not None:  # after EpochRecorder: it reads the committed metrics
        callbacks.append(EarlyStopping(checkpoints, stop.patience, str(stop.monitor), stop.min_delta))
    if t.profile:
        callbacks.append(ProfileSteps(job.out_dir / "profile", *t.profile_steps))
    if t.strategy == "multi_worker":  # workers train in lockstep: epoch checkpoints only
        return [*callbacks, *extra, StopAtStepEnd(strategy=job.model.distribute_strategy)]
    return [*callbacks, *extra, StopAtStepEnd(recorder)]


def fit(job: Job, callbacks: list) -> None:
    """Trains epochs `job.first_epoch ..`; a run resumed inside that epoch trains its
    remaining steps first, as a `fit` of their own, on the same batches it would have seen."""
    done = job.in_epoch["step"] if job.in_epoch else 0
    if done:
        fit_epochs(job, [*callbacks, EndResumedEpoch(job.cfg.trainer.epochs)], job.first_epoch, done)
    fit_epochs(job, callbacks, job.first_epoch + bool(done), 0)


def fit_epochs(job: Job, callbacks: list, first_epoch: int, done: int) -> None:
    t = job.cfg.trainer
    num_classes = job.cfg.data.num_classes
    stoppers = [c for c in callbacks if isinstance(c, EarlyStopping)]
    if first_epoch >= t.epochs or any(s.should_stop() for s in stoppers):
        return  # a resumed run that had already finished training (or stopped early)
    job.model.fit(
        train_dataset(
            *job.splits.train,
            num_classes,
            t.batch_size,
            t.seed,
            first_epoch,
            t.epochs,
            steps=job.steps,
            augment=build_augment(job.cfg.data.augment),
            skip=done,
        ),
        epochs=t.epochs,
        initial_epoch=first_epoch,
        steps_per_epoch=job.steps - done,
        validation_data=eval_dataset(*job.splits.val, num_classes, t.batch_size),
        shuffle=False,  # the dataset is already a seeded permutation per epoch
        callbacks=callbacks,
        verbose=t.verbose if t.verbose != 1 or sys.stdout.isatty() else 2,
    )


def test_scores(job: Job, checkpoint: Path) -> tuple[dict, np.ndarray]:
    """Test metrics of `checkpoint`'s weights, loaded into the job's model, on the mean of
    the test-time views' logits (`trainer.tta`; `top1_1view` too when there are several)."""
    t = job.cfg.trainer
    job.model.load_weights(checkpoint)
    views = predict_views(job.model, *job.splits.test, job.cfg.data.num_classes, t.batch_size, t.tta)
    return score_views(views, job.splits.test[1])


def fit_and_record(job: Job, extra_callbacks=()) -> dict:
    t = job.cfg.trainer
    checkpoints = CheckpointDir(job.out_dir / "checkpoints", keep=t.keep_checkpoints)
    callbacks = training_callbacks(job, checkpoints, extra_callbacks)
    monitor = job.tracker.monitor_system(job.run_id, resume=job.first_epoch > 0 or job.in_epoch is not None)
    try:
        fit(job, callbacks)
        record_training(job, checkpoints)
        chosen = checkpoints.best if t.test_checkpoint == "best" else checkpoints.last
        tell(f"testing the {t.test_checkpoint} checkpoint on {len(job.splits.test[0])} test images")
        test, probs = test_scores(job, chosen)
    finally:
        monitor.finish()
    best, best_epoch = checkpoints.best_so_far()
    last_epoch = checkpoints.latest_epoch()
    job.tracker.log_metrics(job.run_id, {f"test_{k}": float(v) for k, v in test.items()}, step=last_epoch)
    test_epoch = best_epoch if chosen == checkpoints.best else last_epoch
    job.tracker.log_metrics(
        job.run_id,
        {"best_val_top1": best, "best_epoch": best_epoch, "test_epoch": test_epoch},
        step=last_epoch,
    )
    tell("drawing the curves" + (" and the report's pictures" if job.cfg.report.enabled else ""))
    log_pictures(job, probs)
    if job.cfg.tracking.log_checkpoints:
        tell("logging the checkpoints")
        for path in (checkpoints.best, checkpoints.last):
            job.tracker.log_artifact(job.run_id, path, "checkpoints")
    if job.cfg.tracking.log_model:
        tell("logging the model (MLflow Model with signature and input example)")
        job.tracker.settle()  # the model is logged at once, after every record kept back
        job.tracker.log_model(job.run_id, chosen, job.class_names, job.model, str(t.tta))
    return {"test": test, "best_val_top1": best, "best_epoch": best_epoch, "checkpoint": chosen}


def tell(doing: str) -> None:
    """Says what a stretch of seconds without progress bars is spent on."""
    print(f"vitexp: {doing}...", file=sys.stderr, flush=True)


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


def interrupted_message(run_id: str, out_dir: Path, stop: KeyboardInterrupt) -> str:
    """What to do after Ctrl-C or SIGTERM: resume from the last checkpoint, or start again;
    under Slurm, a pre-empted job requeues itself."""
    how = f"terminated ({stop.signal_name})" if isinstance(stop, Terminated) else "interrupted"
    checkpoints = CheckpointDir(out_dir / "checkpoints")
    epoch = checkpoints.latest_epoch() if checkpoints.folder.is_dir() else 0
    if getattr(stop, "requeue", False):
        where = stop.where or f"after epoch {epoch}"
        return f"vitexp: {how}; run {run_id} is KILLED {where}; {requeue()}"
    if getattr(stop, "where", ""):  # where the workers stopped together
        how = f"{how} {stop.where}"
    if not epoch:
        return (
            f"vitexp: {how} in the first epoch; run {run_id} is KILLED with no checkpoint; "
            f"start it again with: {command_line()}"
        )
    return (
        f"vitexp: {how}; run {run_id} is KILLED, its last checkpoint (epoch {epoch}) is in "
        f"{checkpoints.folder}; continue it with: {command_line(resume=True)}"
    )


def resume_command() -> str:
    """The command that resumes this job's run: a sweep's job on its own, with its overrides."""
    if not in_multirun():
        return command_line(resume=True)
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]
    return " ".join(["python -m vitexp", *map(shlex.quote, overrides), "resume=true"])


def prepare(cfg: DictConfig, tracker: Tracker, resume, workers) -> tuple:
    """Data, splits, steps per epoch, strategy, model and schedule (restored when resuming).

    A sweep keeps a record of every job it ran: one that fails here is a FAILED run.
    """
    try:
        data = load_data(cfg.data)
        check_split(cfg, len(data.train_x))
        splits = split(data, cfg.trainer.validation_split)
        steps = cfg.trainer.steps_per_epoch or steps_per_epoch(len(splits.train[0]), cfg.trainer.batch_size)
        strategy = (
            workers.strategy if workers else distribution(cfg.trainer.strategy, cfg.trainer.jit_compile)
        )
        with strategy.scope() if strategy else contextlib.nullcontext():
            model = build_model(cfg, splits.train[0])
            schedule = compile_model(model, cfg, total_steps=steps * cfg.trainer.epochs)
            if resume:
                restore(model, resume)
    except Exception as err:
        if in_multirun() and not resume:
            record_failed_job(tracker, cfg, err)
        raise
    return data, splits, steps, strategy, model, schedule


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


def train(cfg: DictConfig, callbacks: tuple = ()) -> float:
    """Runs one job end to end and returns its best validation top-1 (for sweepers).

    Args:
        cfg: the composed config (`vitexp.config.compose`).
        callbacks: Keras callbacks to add to `fit`, after vitexp's own.
    """
    check_config(cfg)
    STOP.install(workers=cfg.trainer.strategy == "multi_worker")
    workers = start_workers() if cfg.trainer.strategy == "multi_worker" else None  # before TF's devices
    if workers:
        STOP.reclaim()
    setup_tensorflow(cfg.trainer)
    private = workers and not workers.is_chief  # records into a store of its own; the chief writes the run
    if private:
        cfg = workers.private_config(cfg)
    tracker = Tracker.from_config(cfg.tracking)
    done = finished_before(tracker, cfg)
    if done is not None:  # a re-run sweep: this job already finished
        link_finished(tracker, cfg, done)
        print(f"vitexp: {cfg.run_name} already FINISHED as run {done.id}; skipped", file=sys.stderr)
        return float(done.metrics.get("best_val_top1", float("nan")))
    resume = workers.find_resume() if private else find_resume(tracker, cfg)
    if resume:
        continue_in_precision(resume)
    tell(f"{cfg.run_name}: loading {cfg.data.name}, building {cfg.model.name}")
    data, splits, steps, strategy, model, schedule = prepare(cfg, tracker, resume, workers)
    run_id, out_dir, first_epoch = (workers.open_run if private else open_run)(tracker, cfg, resume)
    try:
        with tracker.run(run_id, error_text):
            if not resume:
                log_setup(tracker, run_id, cfg, model, splits, out_dir)
                replicas = strategy.num_replicas_in_sync if strategy else 1
                tracker.log_params(run_id, {"replicas": str(replicas)})
                tracker.log_class_names(run_id, data.class_names)
            if cfg.trainer.target_top1 is not None:  # time to accuracy, on the test split
                t = cfg.trainer
                predict = partial(
                    predict_views,
                    x=splits.test[0],
                    y=splits.test[1],
                    num_classes=cfg.data.num_classes,
                    batch_size=t.batch_size,
                    tta=t.tta,
                )
                watch = TargetWatch(tracker, run_id, predict, splits.test[1], t.target_top1)
                callbacks = (*callbacks, watch)
            job = Job(
                cfg, tracker, run_id, model, schedule, splits, steps, out_dir, first_epoch, data.class_names
            )
            job.in_epoch = resume.in_epoch if resume else None
            result = fit_and_record(job, (*callbacks, *trial_callbacks(tracker, run_id)))
    except KeyboardInterrupt as stop:  # the run is KILLED: say how to go on
        print(interrupted_message(run_id, out_dir, stop), file=sys.stderr)
        raise
    except StoreDown as down:  # trained, but not all of it recorded: say how to record it
        raise TrackingError(
            f"{down}: run {run_id} trained to its end, its checkpoints are in {out_dir / 'checkpoints'}; "
            f"once the store is back, record the rest with: {resume_command()}"
        ) from None
    if workers:
        workers.report(model)
    if not private:
        print_summary(cfg, tracker, run_id, result)
    return float(result["best_val_top1"])


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
