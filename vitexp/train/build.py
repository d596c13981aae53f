"""What a run trains, made before its MLflow run exists: the data split and checked, the
model built, compiled and, when resuming, restored."""

import contextlib
from dataclasses import dataclass

import keras
import numpy as np
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from vitexp.data import DataError, ImageData, load_data
from vitexp.data.pipeline import split_validation, steps_per_epoch
from vitexp.models import adapt_input_norm
from vitexp.tracking import TrackingError
from vitexp.train.callbacks import DivergenceError
from vitexp.train.devices import jit_setting
from vitexp.train.jobs import Splits
from vitexp.train.resume import restore
from vitexp.validate import ConfigError

# the errors a user causes and fixes: one line, no traceback
USER_ERRORS = (ConfigError, DataError, TrackingError, DivergenceError)


@dataclass
class Built:
    """A run's data, its splits and steps per epoch, and its compiled model and schedule."""

    data: ImageData
    splits: Splits
    steps: int
    model: keras.Model
    schedule: object


def build(cfg: DictConfig, strategy, resume) -> Built:
    """Loads and splits the data, then builds and compiles the model inside `strategy` (None:
    the default device), restored from `resume`'s checkpoint when there is one."""
    data = load_data(cfg.data)
    check_split(cfg, len(data.train_x))
    splits = split(data, cfg.trainer.validation_split)
    steps = cfg.trainer.steps_per_epoch or steps_per_epoch(len(splits.train[0]), cfg.trainer.batch_size)
    check_execution(cfg, steps)
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = build_model(cfg, splits.train[0])
        schedule = compile_model(model, cfg, total_steps=steps * cfg.trainer.epochs)
        if resume:
            restore(model, resume)
    return Built(data, splits, steps, model, schedule)


def build_model(cfg: DictConfig, train_images: np.ndarray) -> keras.Model:
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


def check_execution(cfg: DictConfig, steps: int) -> None:
    """Fails in one line when `trainer.steps_per_execution` does not divide the steps of an
    epoch: Keras runs whole executions, so the epoch's last one would take batches of the
    next epoch (each epoch's batches, metrics and checkpoints would no longer be its own)."""
    per = cfg.trainer.steps_per_execution
    if steps % per:
        divisors = [str(d) for d in range(1, min(steps, 64) + 1) if steps % d == 0]
        divisors += [str(steps)] if steps > 64 else []  # one execution an epoch
        raise ConfigError(
            f"trainer.steps_per_execution={per} does not divide the {steps} steps of an epoch "
            f"(its last execution would train on the next epoch's batches): use one of "
            f"{', '.join(divisors)}, or set trainer.steps_per_epoch to a multiple of {per}"
        )


def split(data: ImageData, fraction: float) -> Splits:
    train, val = split_validation(data.train_x, data.train_y, fraction)
    return Splits(train, val, (data.test_x, data.test_y))
