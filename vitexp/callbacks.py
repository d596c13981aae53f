"""Keras callbacks: MLflow metrics per epoch, atomic checkpoints, and a divergence guard."""

import math
import os
import shutil
import time
from pathlib import Path

import keras
import numpy as np

from vitexp.tracking import Tracker

METRIC_NAMES = {"loss": "loss", "top1": "top1", "top5": "top5"}


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite; the message says where and what to change."""


def learning_rate_at(schedule, step: int) -> float:
    value = schedule(step) if callable(schedule) else schedule
    return float(keras.ops.convert_to_numpy(value))


class MlflowLogger(keras.callbacks.Callback):
    """Logs train/val loss, top-1, top-5, learning rate and speed at `step=epoch` (1-based).

    Args:
        tracker: where to log.
        run_id: the MLflow run.
        schedule: the learning-rate schedule (or a float), to log the rate of the last step.
        images_per_epoch: training images seen per epoch, for images/s.
    """

    def __init__(self, tracker: Tracker, run_id: str, schedule, images_per_epoch: int):
        super().__init__()
        self.tracker = tracker
        self.run_id = run_id
        self.schedule = schedule
        self.images_per_epoch = images_per_epoch
        self.history: dict[str, list[float]] = {}
        self._started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._started
        metrics = {}
        for key, value in (logs or {}).items():
            split = "val" if key.startswith("val_") else "train"
            metrics[f"{split}_{key.removeprefix('val_')}"] = float(value)
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        metrics["lr"] = learning_rate_at(self.schedule, max(step - 1, 0))
        metrics["epoch_time_s"] = seconds
        metrics["images_per_s"] = self.images_per_epoch / seconds
        for key, value in metrics.items():
            self.history.setdefault(key, []).append(value)
        self.tracker.log_metrics(self.run_id, metrics, step=epoch + 1)


def atomic_save(model: keras.Model, path: Path) -> None:
    """Writes the checkpoint to a temporary name, then renames: a kill never leaves half a file."""
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)


class Checkpointer(keras.callbacks.Callback):
    """Keeps `last.keras`, the last `keep` epoch checkpoints, and `best.keras` by a metric.

    Args:
        folder: where the checkpoints go.
        monitor: the metric that picks the best epoch (higher is better).
        keep: how many epoch checkpoints to keep.
    """

    def __init__(self, folder: Path, monitor: str = "val_top1", keep: int = 2):
        super().__init__()
        self.folder = Path(folder)
        self.monitor = monitor
        self.keep = keep
        self.best = -math.inf
        self.best_epoch = 0

    @property
    def last(self) -> Path:
        return self.folder / "last.keras"

    @property
    def best_path(self) -> Path:
        return self.folder / "best.keras"

    def on_epoch_end(self, epoch, logs=None):
        self.folder.mkdir(parents=True, exist_ok=True)
        epoch_file = self.folder / f"epoch_{epoch + 1:04d}.keras"
        atomic_save(self.model, epoch_file)
        self._replace_with(epoch_file, self.last)
        value = (logs or {}).get(self.monitor)
        if value is not None and value > self.best:
            self.best, self.best_epoch = float(value), epoch + 1
            self._replace_with(epoch_file, self.best_path)
        for old in sorted(self.folder.glob("epoch_*.keras"))[: -self.keep]:
            old.unlink()

    @staticmethod
    def _replace_with(source: Path, target: Path) -> None:
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training at the first NaN or infinite loss, naming epoch, step and learning rate."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            lr = learning_rate_at(self.schedule, max(step - 1, 0))
            raise DivergenceError(
                f"training diverged: loss is {float(loss)} at epoch {self.epoch + 1}, step "
                f"{batch + 1} (learning rate {lr:.3g}); lower optimizer.learning_rate or set "
                "optimizer.clipnorm=1.0"
            )
