"""One training job: check the config, load data, build, fit, evaluate, record in MLflow."""

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

from vitexp.callbacks import Checkpointer, DivergenceError, DivergenceGuard, MlflowLogger
from vitexp.data import DataError, ImageData, load_data
from vitexp.data.augment import build_augment
from vitexp.data.pipeline import eval_dataset, split_validation, steps_per_epoch, train_dataset
from vitexp.models import adapt_input_norm
from vitexp.report import plot_curves
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
from vitexp.validate import ConfigError, check_config

USER_ERRORS = (ConfigError, DataError, TrackingError, DivergenceError)
# Keys that change where a run is recorded or how it resumes, not what it computes.
NOT_HASHED = ("tracking", "resume", "report")


@dataclass
class Splits:
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


def config_hash(cfg: DictConfig) -> str:
    """A short hash of what a run computes, to recognise the same job across sweeps."""
    body = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in NOT_HASHED}
    return hashlib.sha256(repr(sorted(flatten(body).items())).encode()).hexdigest()[:16]


def setup_tensorflow(trainer: DictConfig) -> None:
    """Threads, seeds, determinism and precision, before any model is built."""
    if trainer.threads:
        tf.config.threading.set_intra_op_parallelism_threads(trainer.threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, trainer.threads))
    keras.utils.set_random_seed(trainer.seed)
    if trainer.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(resolve_precision(trainer.precision))


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "mixed_bfloat16" if tf.config.list_physical_devices("GPU") else "float32"


def jit_setting(value: str) -> bool | str:
    return {"auto": "auto", "true": True, "false": False}[str(value).lower()]


def job_dir() -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(tempfile.mkdtemp(prefix="vitexp-"))


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def build_model(cfg: DictConfig, train_images: np.ndarray) -> keras.Model:
    model = instantiate(cfg.model, _convert_="all")
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
    return {
        "vitexp.command": command_line(),
        "vitexp.git_commit": git_commit(),
        "vitexp.hydra_job": job,
        "vitexp.output_dir": str(out_dir),
        "vitexp.config_hash": config_hash(cfg),
        "vitexp.model": cfg.model.name,
        "vitexp.data": cfg.data.name,
        "mlflow.source.git.commit": git_commit(),
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


def fit_and_record(cfg, tracker, run_id, model, schedule, splits, steps, out_dir) -> dict:
    t = cfg.trainer
    num_classes = cfg.data.num_classes
    augment = build_augment(cfg.data.augment)
    train_ds = train_dataset(
        *splits.train, num_classes, t.batch_size, t.seed, 0, t.epochs, steps=steps, augment=augment
    )
    val_ds = eval_dataset(*splits.val, num_classes, t.batch_size)
    logger = MlflowLogger(tracker, run_id, schedule, images_per_epoch=steps * t.batch_size)
    checkpoints = Checkpointer(out_dir / "checkpoints", keep=t.keep_checkpoints)
    model.fit(
        train_ds,
        epochs=t.epochs,
        steps_per_epoch=steps,
        validation_data=val_ds,
        shuffle=False,  # the dataset is already a seeded permutation per epoch
        callbacks=[DivergenceGuard(schedule), logger, checkpoints],
        verbose=t.verbose if t.verbose != 1 or sys.stdout.isatty() else 2,
    )
    test = model.evaluate(eval_dataset(*splits.test, num_classes, t.batch_size), return_dict=True, verbose=0)
    tracker.log_metrics(run_id, {f"test_{k}": float(v) for k, v in test.items()}, step=t.epochs)
    tracker.log_metrics(
        run_id, {"best_val_top1": checkpoints.best, "best_epoch": checkpoints.best_epoch}, step=t.epochs
    )
    tracker.flush_with_retry()
    keys = [f"{s}_{m}" for s in ("train", "val") for m in ("loss", "top1", "top5")]
    curves = plot_curves(metric_history(tracker, run_id, keys), out_dir / "curves.png", cfg.run_name)
    tracker.log_artifact(run_id, curves)
    if cfg.tracking.log_checkpoints:
        for path in (checkpoints.best_path, checkpoints.last):
            tracker.log_artifact(run_id, path, "checkpoints")
    return {
        "test": test,
        "best_val_top1": checkpoints.best,
        "best_epoch": checkpoints.best_epoch,
        "checkpoint": checkpoints.best_path,
    }


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


def train(cfg: DictConfig) -> float:
    """Runs one job end to end and returns its best validation top-1 (for sweepers)."""
    check_config(cfg)
    setup_tensorflow(cfg.trainer)
    tracker = Tracker.from_config(cfg.tracking)
    data = load_data(cfg.data)
    splits = split(data, cfg.trainer.validation_split)
    steps = cfg.trainer.steps_per_epoch or steps_per_epoch(len(splits.train[0]), cfg.trainer.batch_size)
    model = build_model(cfg, splits.train[0])
    schedule = compile_model(model, cfg, total_steps=steps * cfg.trainer.epochs)
    out_dir = job_dir()
    run_id = tracker.start_run(cfg.run_name, run_tags(cfg, out_dir), os.environ.get(PARENT_ENV))
    try:
        log_setup(tracker, run_id, cfg, model, splits, out_dir)
        tracker.log_params(run_id, {"class_names": ",".join(data.class_names)[:6000]})
        result = fit_and_record(cfg, tracker, run_id, model, schedule, splits, steps, out_dir)
    except KeyboardInterrupt:
        tracker.flush(raise_errors=False)
        tracker.end_run(run_id, KILLED)
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
    """Hydra's task function: user errors end a single run in one line with exit code 2."""
    try:
        return train(cfg)
    except USER_ERRORS as err:
        if in_multirun():
            raise
        print(f"vitexp: error: {err}", file=sys.stderr)
        sys.exit(2)
