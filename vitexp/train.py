"""One training job: check the config, load data, build, fit, evaluate, record in MLflow."""

import contextlib
import hashlib
import os
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

from vitexp.callbacks import CheckpointDir, DivergenceError, DivergenceGuard, EpochRecorder, replay_missing
from vitexp.data import DataError, ImageData, load_data
from vitexp.data.augment import build_augment
from vitexp.data.pipeline import eval_dataset, split_validation, steps_per_epoch, train_dataset
from vitexp.models import adapt_input_norm
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
    return tf.distribute.MultiWorkerMirroredStrategy()


def resolve_precision(precision: str) -> str:
    """`auto`: bfloat16 compute on GPUs that have it (Ampere and newer), float16 with loss
    scaling on older GPUs, float32 on the CPU (where mixed precision buys little for small
    models; see `make bench`). Logits and softmax stay float32 in every case."""
    if precision != "auto":
        return precision
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "float32"
    major, _ = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
    return "mixed_bfloat16" if major >= 8 else "mixed_float16"


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
            # what trainer.jit_compile=auto became: Keras turns XLA on with a GPU, off on the CPU
            "xla": str(bool(model.jit_compile)),
        }
    )
    tracker.log_params(run_id, params)
    config_dir = out_dir / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, config_dir / "config.yaml", resolve=True)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    OmegaConf.save(OmegaConf.create(overrides), config_dir / "overrides.yaml")
    tracker.log_artifact(run_id, config_dir / "config.yaml", "config")
    tracker.log_artifact(run_id, config_dir / "overrides.yaml", "config")
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line), line_length=110)
    (out_dir / "model_summary.txt").write_text("\n".join(lines) + "\n")
    tracker.log_artifact(run_id, out_dir / "model_summary.txt")


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


def fit_and_record(job: Job, extra_callbacks=()) -> dict:
    t = job.cfg.trainer
    num_classes = job.cfg.data.num_classes
    checkpoints = CheckpointDir(job.out_dir / "checkpoints", keep=t.keep_checkpoints)
    callbacks = [
        DivergenceGuard(job.schedule),
        EpochRecorder(job.tracker, job.run_id, job.schedule, job.steps * t.batch_size, checkpoints),
        *extra_callbacks,
    ]
    if job.model.optimizer.use_ema:  # validate and checkpoint the averaged weights
        callbacks.insert(1, keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    if job.first_epoch < t.epochs:
        augment = build_augment(job.cfg.data.augment)
        job.model.fit(
            train_dataset(
                *job.splits.train,
                num_classes,
                t.batch_size,
                t.seed,
                job.first_epoch,
                t.epochs,
                steps=job.steps,
                augment=augment,
            ),
            epochs=t.epochs,
            initial_epoch=job.first_epoch,
            steps_per_epoch=job.steps,
            validation_data=eval_dataset(*job.splits.val, num_classes, t.batch_size),
            shuffle=False,  # the dataset is already a seeded permutation per epoch
            callbacks=callbacks,
            verbose=t.verbose if t.verbose != 1 or sys.stdout.isatty() else 2,
        )
    logits = job.model.predict(eval_dataset(*job.splits.test, num_classes, t.batch_size), verbose=0)
    probs = softmax(logits.astype(np.float64))
    test = score_predictions(probs, job.splits.test[1])
    best, best_epoch = checkpoints.best_so_far()
    job.tracker.log_metrics(job.run_id, {f"test_{k}": float(v) for k, v in test.items()}, step=t.epochs)
    job.tracker.log_metrics(job.run_id, {"best_val_top1": best, "best_epoch": best_epoch}, step=t.epochs)
    if not job.tracker.flush_with_retry():
        raise TrackingError(
            f"tracking store {job.tracker.uri} stayed unreachable; metrics are kept in {checkpoints.folder}"
        )
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
    if job.cfg.tracking.log_checkpoints:
        for path in (checkpoints.best, checkpoints.last):
            job.tracker.log_artifact(job.run_id, path, "checkpoints")
    return {"test": test, "best_val_top1": best, "best_epoch": best_epoch, "checkpoint": checkpoints.best}


@dataclass
class Resume:
    run_id: str
    out_dir: Path
    epoch: int


def find_resume(tracker: Tracker, cfg: DictConfig) -> Resume | None:
    """The interrupted run that `resume=true` / `resume=<run id>` asks to continue."""
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


def _resumable(run) -> Resume | None:
    out_dir = Path(run.data.tags.get("vitexp.output_dir", ""))
    epoch = CheckpointDir(out_dir / "checkpoints").latest_epoch() if out_dir.is_dir() else 0
    return Resume(run.info.run_id, out_dir, epoch) if epoch else None


def restore(model: keras.Model, resume: Resume) -> None:
    """Loads weights and optimizer state (moments, step) of the last committed epoch."""
    model.optimizer.build(model.trainable_variables)
    model.load_weights(CheckpointDir(resume.out_dir / "checkpoints").model_file(resume.epoch))


def print_summary(cfg, tracker: Tracker, run_id: str, result: dict) -> None:
    test = result["test"]
    ui = (
        "make ui"
        if tracker.uri.startswith("sqlite") and "mlflow.db" in tracker.uri
        else f"mlflow ui --backend-store-uri {tracker.uri}"
    )
    print(
        f"\nvitexp: run {cfg.run_name} ({run_id}) finished\n"
        f"  test top-1 {test['top1']:.4f}  top-5 {test['top5']:.4f}  loss {test['loss']:.4f}\n"
        f"  best val top-1 {result['best_val_top1']:.4f} at epoch {result['best_epoch']}\n"
        f"  checkpoint {result['checkpoint']}\n"
        f"  tracking {tracker.uri} (experiment {tracker.experiment}); open the UI with: {ui}"
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


def train(cfg: DictConfig, callbacks: tuple = ()) -> float:
    """Runs one job end to end and returns its best validation top-1 (for sweepers).

    Args:
        cfg: the composed config (`vitexp.cli.compose`).
        callbacks: Keras callbacks to add to `fit`, after vitexp's own.
    """
    check_config(cfg)
    setup_tensorflow(cfg.trainer)
    tracker = Tracker.from_config(cfg.tracking)
    done = finished_before(tracker, cfg)
    if done is not None:  # a re-run sweep: this job already finished, join it to this sweep
        parent = os.environ.get(PARENT_ENV)
        if parent:
            tracker.set_tags(done.info.run_id, {"mlflow.parentRunId": parent})
        print(f"vitexp: {cfg.run_name} already FINISHED as run {done.info.run_id}; skipped", file=sys.stderr)
        return float(done.data.metrics.get("best_val_top1", float("nan")))
    resume = find_resume(tracker, cfg)
    data = load_data(cfg.data)
    splits = split(data, cfg.trainer.validation_split)
    steps = cfg.trainer.steps_per_epoch or steps_per_epoch(len(splits.train[0]), cfg.trainer.batch_size)
    strategy = distribution(cfg.trainer.strategy)
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = build_model(cfg, splits.train[0])
        schedule = compile_model(model, cfg, total_steps=steps * cfg.trainer.epochs)
        if resume:
            restore(model, resume)
    if resume:
        run_id, out_dir, first_epoch = resume.run_id, resume.out_dir, resume.epoch
        tracker.client.update_run(run_id, status="RUNNING")
        replay_missing(tracker, run_id, CheckpointDir(out_dir / "checkpoints"))
        print(f"vitexp: resuming run {run_id} after epoch {first_epoch}", file=sys.stderr)
    else:
        out_dir, first_epoch = job_dir(), 0
        run_id = tracker.start_run(cfg.run_name, run_tags(cfg, out_dir), os.environ.get(PARENT_ENV))
    try:
        if not resume:
            log_setup(tracker, run_id, cfg, model, splits, out_dir)
            replicas = strategy.num_replicas_in_sync if strategy else 1
            tracker.log_params(
                run_id, {"class_names": ",".join(data.class_names)[:6000], "replicas": str(replicas)}
            )
        job = Job(
            cfg, tracker, run_id, model, schedule, splits, steps, out_dir, first_epoch, data.class_names
        )
        result = fit_and_record(job, (*callbacks, *trial_callbacks(tracker, run_id)))
    except KeyboardInterrupt:
        tracker.flush(raise_errors=False)
        tracker.end_run(run_id, KILLED)
        print(
            f"vitexp: interrupted; run {run_id} is KILLED, its last checkpoint is in "
            f"{out_dir / 'checkpoints'}; continue it with: {command_line(resume=True)}",
            file=sys.stderr,
        )
        raise
    except BaseException as err:
        tracker.flush(raise_errors=False)
        tracker.set_tags(run_id, {"vitexp.error": f"{type(err).__name__}: {err}"[:5000]})
        tracker.end_run(run_id, FAILED)
        raise
    tracker.end_run(run_id, FINISHED)
    print_summary(cfg, tracker, run_id, result)
    return float(result["best_val_top1"])


def run_job(cfg: DictConfig) -> float:
    """Hydra's task function: user errors end a single run in one line with exit code 2,
    Ctrl-C ends it (and a sweep) with 130."""
    try:
        return train(cfg)
    except KeyboardInterrupt:
        sys.exit(130)
    except USER_ERRORS as err:
        if in_multirun():
            raise
        print(f"vitexp: error: {err}", file=sys.stderr)
        sys.exit(2)
