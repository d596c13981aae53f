"""One training job: check the config, load data, build, fit, evaluate, record in MLflow."""

import contextlib
import hashlib
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vitexp.callbacks import (
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
from vitexp.data import DataError, ImageData, load_data
from vitexp.data.augment import build_augment
from vitexp.data.pipeline import eval_dataset, split_validation, steps_per_epoch, train_dataset
from vitexp.machine import native_bfloat16
from vitexp.models import adapt_input_norm
from vitexp.multiworker import start_workers
from vitexp.preempt import SLURM_TAG, STOP, StopAtStepEnd, Terminated, requeue, requeued, slurm_job_id
from vitexp.report import plot_curves, score_predictions, softmax, write_report
from vitexp.tracking import (
    FAILED,
    FINISHED,
    KILLED,
    PARENT_ENV,
    Tracker,
    TrackingError,
    command_line,
    flatten,
    git_commit,
)
from vitexp.trial import is_trial, trial_callbacks
from vitexp.validate import ConfigError, check_config

USER_ERRORS = (ConfigError, DataError, TrackingError, DivergenceError)
# Keys that change where a run is recorded or how it resumes, not what it computes (the
# shortcuts act through model.*, which is hashed).
NOT_HASHED = ("tracking", "resume", "report", "patch_size", "depth")


@dataclass
class Splits:
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


def config_hash(cfg: DictConfig) -> str:
    """A short hash of what a run computes, to recognise the same job across sweeps."""
    body = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in NOT_HASHED}
    return hashlib.sha256(repr(sorted(flatten(body).items())).encode()).hexdigest()[:16]


def parallel_jobs() -> int:
    """How many jobs a parallel launcher (joblib) runs at once on this machine; 1 otherwise."""
    if not HydraConfig.initialized():
        return 1
    n_jobs = HydraConfig.get().launcher.get("n_jobs") or 1
    return os.cpu_count() if n_jobs < 0 else n_jobs


def setup_tensorflow(trainer: DictConfig) -> None:
    """Threads, device, seeds, determinism and precision, before any model is built.

    Jobs that a parallel launcher runs side by side share the CPU cores evenly and, on a
    machine with several GPUs, each take one GPU (by job number).
    """
    keras.backend.clear_session()  # a sweep's jobs may share this process
    if trainer.logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * trainer.logical_cpus
            )
        except RuntimeError:
            pass  # devices already initialised in this process
    jobs = parallel_jobs()
    threads = trainer.threads or (max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None)
    try:
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
        gpus = tf.config.list_physical_devices("GPU")
        if jobs > 1 and len(gpus) > 1:
            tf.config.set_visible_devices(gpus[HydraConfig.get().job.num % len(gpus)], "GPU")
    except RuntimeError:
        pass  # a worker process that already ran a job keeps its first settings
    keras.utils.set_random_seed(trainer.seed)
    if trainer.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(resolve_precision(trainer.precision))


def distribution(name: str) -> tf.distribute.Strategy | None:
    """The tf.distribute strategy for `trainer.strategy`; None trains on the default device.

    `auto` mirrors over all GPUs when there are several. `mirrored` uses every GPU, else
    every logical CPU device (`trainer.logical_cpus`). `trainer.batch_size` is the global
    batch, split over the replicas; the learning rate is not changed for you: when you
    scale the batch by k, scale `optimizer.learning_rate` by k too (the linear rule), with
    the warmup the schedule already has.
    """
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else None
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    raise ValueError(f"{name}: multi_worker comes from vitexp.multiworker.start_workers")


def worker_config(cfg: DictConfig) -> DictConfig:
    """A non-chief worker's config: the same job, recorded in a private store in its own folder
    (the chief alone writes the MLflow run)."""
    folder = job_dir() / "worker-store"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = cfg.copy()
    cfg.tracking.uri = f"sqlite:///{folder / 'mlflow.db'}"
    return cfg


def resolve_precision(precision: str) -> str:
    return choose_precision(precision)[0]


def choose_precision(precision: str) -> tuple[str, str]:
    """The Keras policy for `trainer.precision`, and why (recorded as run params).

    `auto`: bfloat16 compute on GPUs that have it (Ampere and newer), float16 with loss
    scaling on older GPUs; on a CPU, bfloat16 where its instruction set runs bfloat16
    matmuls natively (AVX-512 BF16, AMX: same accuracy, faster; see `make bench`), float32
    elsewhere, where bfloat16 would be emulated. Logits and softmax stay float32 always.
    """
    if precision != "auto":
        return precision, "set by trainer.precision"
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        major, _ = details.get("compute_capability", (0, 0))
        name = details.get("device_name", "GPU")
        if major >= 8:
            return "mixed_bfloat16", f"auto: {name} has bfloat16 (compute capability {major}.x)"
        return "mixed_float16", f"auto: {name} has no bfloat16 (compute capability {major}.x)"
    isa = native_bfloat16()
    if isa:
        return "mixed_bfloat16", f"auto: CPU runs bfloat16 natively ({isa})"
    return "float32", "auto: CPU without native bfloat16 (no avx512_bf16 or amx_bf16)"


def jit_setting(value: str) -> bool | str:
    return {"auto": "auto", "true": True, "false": False}[str(value).lower()]


def job_dir() -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(tempfile.mkdtemp(prefix="vitexp-"))


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


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


def split(data: ImageData, fraction: float) -> Splits:
    train, val = split_validation(data.train_x, data.train_y, fraction)
    return Splits(train, val, (data.test_x, data.test_y))


def run_tags(cfg: DictConfig, out_dir: Path) -> dict[str, str]:
    import mlflow

    job = HydraConfig.get().job.name if HydraConfig.initialized() else "vitexp"
    commit = git_commit()
    return {
        "vitexp.command": command_line(),
        "vitexp.git_commit": commit,
        "vitexp.hydra_job": job,
        "vitexp.output_dir": str(out_dir),
        "vitexp.config_hash": config_hash(cfg),
        "vitexp.model": cfg.model.name,
        "vitexp.data": cfg.data.name,
        "mlflow.source.git.commit": commit,
        "version.tensorflow": tf.__version__,
        "version.keras": keras.__version__,
        "version.mlflow": mlflow.__version__,
        "version.python": sys.version.split()[0],
    }


def log_setup(tracker: Tracker, run_id: str, cfg: DictConfig, model, splits: Splits, out_dir: Path):
    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    params.update(
        {
            "num_params": str(model.count_params()),
            "trainable_params": str(trainable),
            "train_images": str(len(splits.train[0])),
            "val_images": str(len(splits.val[0])),
            "test_images": str(len(splits.test[0])),
            "precision": keras.mixed_precision.global_policy().name,
            "precision_reason": choose_precision(cfg.trainer.precision)[1],
            # what trainer.jit_compile=auto became: Keras turns XLA on with a GPU, off on the CPU
            "xla": str(bool(model.jit_compile)),
        }
    )
    tracker.log_params(run_id, params)
    source = str(cfg.data.get("path") or cfg.data._target_)
    inputs = {"training": splits.train, "validation": splits.val, "test": splits.test}
    tracker.log_datasets(run_id, cfg.data.name, source, inputs)
    config_dir = out_dir / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, config_dir / "config.yaml", resolve=True)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    OmegaConf.save(OmegaConf.create(overrides), config_dir / "overrides.yaml")
    tracker.log_artifact(run_id, config_dir / "config.yaml", "config")
    tracker.log_artifact(run_id, config_dir / "overrides.yaml", "config")
    (out_dir / "model_summary.txt").write_text(summary_text(model))
    tracker.log_artifact(run_id, out_dir / "model_summary.txt")


def summary_text(model, width: int = 120) -> str:
    """`model.summary()` with every column whole: Keras prints through rich, which crops the
    table to the terminal's width (80 columns when there is none), cutting off `Param #`."""
    lines: list[str] = []
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        model.summary(print_fn=lambda text, **_: lines.append(text), line_length=width)
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    return "\n".join(lines).rstrip("\n") + "\n"


def metric_history(tracker: Tracker, run_id: str, keys: list[str]) -> dict[str, list[float]]:
    history = {}
    for key in keys:
        points = sorted(tracker.client.get_metric_history(run_id, key), key=lambda m: m.step)
        history[key] = [m.value for m in points]
    return history


@dataclass
class Job:
    """What a training job holds once its model is built and its MLflow run exists."""

    cfg: DictConfig
    tracker: Tracker
    run_id: str
    model: keras.Model
    schedule: object
    splits: Splits
    steps: int
    out_dir: Path
    first_epoch: int
    class_names: list[str]


def training_callbacks(job: Job, checkpoints: CheckpointDir, extra=()) -> list:
    """vitexp's callbacks in the order they must run, then `extra`."""
    t = job.cfg.trainer
    callbacks = [
        DivergenceGuard(job.schedule),
        EpochRecorder(job.tracker, job.run_id, job.schedule, job.steps * t.batch_size, checkpoints),
    ]
    if job.model.optimizer.use_ema:  # validate and checkpoint the averaged weights
        callbacks.insert(1, SwapEMAWeights(restored=job.first_epoch > 0))
    stop = t.early_stopping
    if stop.patience is not None:  # after EpochRecorder: it reads the committed metrics
        callbacks.append(EarlyStopping(checkpoints, stop.patience, str(stop.monitor), stop.min_delta))
    if t.profile:
        callbacks.append(ProfileSteps(job.out_dir / "profile", *t.profile_steps))
    return [*callbacks, *extra]


def fit(job: Job, callbacks: list) -> None:
    t = job.cfg.trainer
    num_classes = job.cfg.data.num_classes
    stoppers = [c for c in callbacks if isinstance(c, EarlyStopping)]
    if job.first_epoch >= t.epochs or any(s.should_stop() for s in stoppers):
        return  # a resumed run that had already finished training (or stopped early)
    job.model.fit(
        train_dataset(
            *job.splits.train,
            num_classes,
            t.batch_size,
            t.seed,
            job.first_epoch,
            t.epochs,
            steps=job.steps,
            augment=build_augment(job.cfg.data.augment),
        ),
        epochs=t.epochs,
        initial_epoch=job.first_epoch,
        steps_per_epoch=job.steps,
        validation_data=eval_dataset(*job.splits.val, num_classes, t.batch_size),
        shuffle=False,  # the dataset is already a seeded permutation per epoch
        callbacks=callbacks,
        verbose=t.verbose if t.verbose != 1 or sys.stdout.isatty() else 2,
    )


def record_training(job: Job, checkpoints: CheckpointDir) -> None:
    """Where training ended: the early stop's epoch, and the profiler trace."""
    t = job.cfg.trainer
    if t.early_stopping.patience is not None and checkpoints.latest_epoch() < t.epochs:
        stopped = checkpoints.latest_epoch()
        job.tracker.log_metrics(job.run_id, {"stopped_epoch": stopped}, step=stopped)
        job.tracker.set_tags(job.run_id, {"vitexp.stopped_early": "true"})
    if t.profile and (job.out_dir / "profile").is_dir():
        job.tracker.log_artifacts(job.run_id, job.out_dir / "profile", "profile")


def test_scores(job: Job, checkpoint: Path) -> tuple[dict, np.ndarray]:
    """Test metrics of `checkpoint`'s weights, loaded into the job's model."""
    t = job.cfg.trainer
    job.model.load_weights(checkpoint)
    test_ds = eval_dataset(*job.splits.test, job.cfg.data.num_classes, t.batch_size)
    probs = softmax(job.model.predict(test_ds, verbose=0).astype(np.float64))
    return score_predictions(probs, job.splits.test[1]), probs


def fit_and_record(job: Job, extra_callbacks=()) -> dict:
    t = job.cfg.trainer
    checkpoints = CheckpointDir(job.out_dir / "checkpoints", keep=t.keep_checkpoints)
    callbacks = training_callbacks(job, checkpoints, extra_callbacks)
    monitor = job.tracker.monitor_system(job.run_id, resume=job.first_epoch > 0)
    try:
        fit(job, callbacks)
        record_training(job, checkpoints)
        chosen = checkpoints.best if t.test_checkpoint == "best" else checkpoints.last
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
    if not job.tracker.flush_with_retry():
        raise TrackingError(
            f"tracking store {job.tracker.uri} stayed unreachable; metrics are kept in {checkpoints.folder}"
        )
    log_pictures(job, probs)
    if job.cfg.tracking.log_checkpoints:
        for path in (checkpoints.best, checkpoints.last):
            job.tracker.log_artifact(job.run_id, path, "checkpoints")
    job.tracker.log_model(job.run_id, chosen, job.class_names, job.model)
    return {"test": test, "best_val_top1": best, "best_epoch": best_epoch, "checkpoint": chosen}


def log_pictures(job: Job, probs: np.ndarray) -> None:
    keys = [f"{s}_{m}" for s in ("train", "val") for m in ("loss", "top1", "top5")]
    curves = plot_curves(
        metric_history(job.tracker, job.run_id, keys), job.out_dir / "curves.png", job.cfg.run_name
    )
    job.tracker.log_artifact(job.run_id, curves)
    if job.cfg.report.enabled:
        pictures = write_report(
            job.model,
            job.cfg,
            *job.splits.train,
            *job.splits.test,
            probs,
            job.class_names,
            job.out_dir / "report",
        )
        for path in pictures:
            job.tracker.log_artifact(job.run_id, path, "report")


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
        runs = tracker.client.search_runs(
            [tracker.experiment_id],
            filter_string=f"tags.`vitexp.config_hash` = '{wanted}'",
            order_by=["attributes.start_time DESC"],
            max_results=50,
        )
        for run in runs:
            if run.info.status != FINISHED:
                found = _resumable(run)
                if found:
                    return found
        raise ConfigError(
            f"resume=true: no interrupted run of this config with a checkpoint in experiment "
            f"{tracker.experiment!r}: run without resume, or give resume=<mlflow run id>"
        )
    try:
        run = tracker.client.get_run(str(cfg.resume))
    except Exception:
        raise ConfigError(f"resume={cfg.resume}: no such MLflow run in {tracker.uri}") from None
    if run.info.status == FINISHED:
        raise ConfigError(f"resume={cfg.resume}: that run already FINISHED; nothing to resume")
    if run.data.tags.get("vitexp.config_hash") != wanted:
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
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`{SLURM_TAG}` = '{slurm_job_id()}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
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


def print_summary(cfg, tracker: Tracker, run_id: str, result: dict) -> None:
    test = result["test"]
    served = tracker.uri.startswith(("http://", "https://"))
    ui = f"open {tracker.uri}" if served else f"mlflow ui --backend-store-uri {shlex.quote(tracker.uri)}"
    print(
        f"\nvitexp: run {cfg.run_name} ({run_id}) finished\n"
        f"  test top-1 {test['top1']:.4f}  top-5 {test['top5']:.4f}  loss {test['loss']:.4f}\n"
        f"  best val top-1 {result['best_val_top1']:.4f} at epoch {result['best_epoch']}\n"
        f"  checkpoint {result['checkpoint']}\n"
        f"  tracking {tracker.uri} (experiment {tracker.experiment}); open the UI with: {ui}\n"
        f"  then {tracker.ui_link(run_id)}"
    )


def finished_before(tracker: Tracker, cfg: DictConfig):
    """A FINISHED run of exactly this config, when a re-run sweep may skip the job."""
    if not (in_multirun() and cfg.tracking.skip_finished) or cfg.resume not in (False, "false") or is_trial():
        return None
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`vitexp.config_hash` = '{config_hash(cfg)}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return runs[0] if runs else None


def record_failed_job(tracker: Tracker, cfg: DictConfig, err: BaseException) -> str:
    """A sweep job that failed before its run existed (data, model) still gets a FAILED run."""
    run_id = tracker.start_run(cfg.run_name, run_tags(cfg, job_dir()), os.environ.get(PARENT_ENV))
    tracker.log_params(run_id, flatten(OmegaConf.to_container(cfg, resolve=True)))
    tracker.set_tags(run_id, {"vitexp.error": error_text(err)})
    tracker.end_run(run_id, FAILED)
    return run_id


def error_text(err: BaseException) -> str:
    """What a FAILED run records: the one-line message of a user error, else type and text."""
    text = str(err) if isinstance(err, USER_ERRORS) else f"{type(err).__name__}: {err}"
    return text[:5000]


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
    tracker.describe(run_id, f"Not trained again: the same config FINISHED earlier as run {earlier}.")
    tracker.log_params(run_id, dict(done.data.params))
    tracker.log_metrics(run_id, dict(done.data.metrics), step=cfg.trainer.epochs)
    tracker.end_run(run_id, FINISHED)
    return run_id


def interrupted_message(run_id: str, out_dir: Path, stop: KeyboardInterrupt) -> str:
    """What to do after Ctrl-C or SIGTERM: resume from the last checkpoint, or start again;
    under Slurm, a pre-empted job requeues itself."""
    how = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
    checkpoints = CheckpointDir(out_dir / "checkpoints")
    epoch = checkpoints.latest_epoch() if checkpoints.folder.is_dir() else 0
    if getattr(stop, "requeue", False):
        return f"vitexp: {how}; run {run_id} is KILLED after epoch {epoch}; {requeue()}"
    if not epoch:
        return (
            f"vitexp: {how} in the first epoch; run {run_id} is KILLED with no checkpoint; "
            f"start it again with: {command_line()}"
        )
    return (
        f"vitexp: {how}; run {run_id} is KILLED, its last checkpoint (epoch {epoch}) is in "
        f"{checkpoints.folder}; continue it with: {command_line(resume=True)}"
    )


def train(cfg: DictConfig, callbacks: tuple = ()) -> float:
    """Runs one job end to end and returns its best validation top-1 (for sweepers).

    Args:
        cfg: the composed config (`vitexp.cli.compose`).
        callbacks: Keras callbacks to add to `fit`, after vitexp's own.
    """
    check_config(cfg)
    STOP.install()
    workers = start_workers() if cfg.trainer.strategy == "multi_worker" else None  # before TF's devices
    setup_tensorflow(cfg.trainer)
    if workers and not workers.is_chief:
        cfg = worker_config(cfg)
    tracker = Tracker.from_config(cfg.tracking)
    done = finished_before(tracker, cfg)
    if done is not None:  # a re-run sweep: this job already finished
        link_finished(tracker, cfg, done)
        print(f"vitexp: {cfg.run_name} already FINISHED as run {done.info.run_id}; skipped", file=sys.stderr)
        return float(done.data.metrics.get("best_val_top1", float("nan")))
    resume = find_resume(tracker, cfg)
    try:
        data = load_data(cfg.data)
        splits = split(data, cfg.trainer.validation_split)
        steps = cfg.trainer.steps_per_epoch or steps_per_epoch(len(splits.train[0]), cfg.trainer.batch_size)
        strategy = workers.strategy if workers else distribution(cfg.trainer.strategy)
        with strategy.scope() if strategy else contextlib.nullcontext():
            model = build_model(cfg, splits.train[0])
            schedule = compile_model(model, cfg, total_steps=steps * cfg.trainer.epochs)
            if resume and resume.epoch:
                restore(model, resume)
    except Exception as err:
        if in_multirun() and not resume:  # a sweep keeps a record of every job it ran
            record_failed_job(tracker, cfg, err)
        raise
    if resume:
        run_id, out_dir, first_epoch = resume.run_id, resume.out_dir, resume.epoch
        tracker.client.update_run(run_id, status="RUNNING")
        replay_missing(tracker, run_id, CheckpointDir(out_dir / "checkpoints"))
        print(f"vitexp: resuming run {run_id} after epoch {first_epoch}", file=sys.stderr)
    else:
        out_dir, first_epoch = job_dir(), 0
        tags = {**run_tags(cfg, out_dir), **({SLURM_TAG: slurm_job_id()} if slurm_job_id() else {})}
        run_id = tracker.start_run(cfg.run_name, tags, os.environ.get(PARENT_ENV))
    try:
        if not resume:
            log_setup(tracker, run_id, cfg, model, splits, out_dir)
            replicas = strategy.num_replicas_in_sync if strategy else 1
            tracker.log_params(run_id, {"replicas": str(replicas)})
            tracker.log_class_names(run_id, data.class_names)
        if cfg.trainer.target_top1 is not None:  # time to accuracy, on the test split
            test_batches = eval_dataset(*splits.test, cfg.data.num_classes, cfg.trainer.batch_size)
            watch = TargetWatch(tracker, run_id, test_batches, splits.test[1], cfg.trainer.target_top1)
            callbacks = (*callbacks, watch)
        job = Job(
            cfg, tracker, run_id, model, schedule, splits, steps, out_dir, first_epoch, data.class_names
        )
        result = fit_and_record(job, (*callbacks, *trial_callbacks(tracker, run_id), StopAtStepEnd()))
    except KeyboardInterrupt as stop:
        tracker.flush(raise_errors=False)
        tracker.end_run(run_id, KILLED)
        print(interrupted_message(run_id, out_dir, stop), file=sys.stderr)
        raise
    except BaseException as err:
        tracker.flush(raise_errors=False)
        tracker.set_tags(run_id, {"vitexp.error": error_text(err)})
        tracker.end_run(run_id, FAILED)
        raise
    tracker.end_run(run_id, FINISHED)
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
        print(f"vitexp: error: {err}", file=sys.stderr)
        sys.exit(2)


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
