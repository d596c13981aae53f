"""Keras callbacks: per-epoch checkpoints and MLflow metrics, exactly once; a divergence guard."""

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import keras
import numpy as np

from vitexp.metrics import score_views
from vitexp.tracking import Tracker
from vitexp.train.preempt import STOP


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite; the message says where and what to change."""


def learning_rate_at(schedule, step: int) -> float:
    value = schedule(step) if callable(schedule) else schedule
    return float(keras.ops.convert_to_numpy(value))


def optimizer_step(model: keras.Model) -> int:
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def atomic_write(path: Path, write) -> None:
    """Writes through a temporary name, then renames: a kill never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def link_or_copy(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


class CheckpointDir:
    """A run's checkpoints: `epoch_NNNN.keras` (the last few), their metrics as
    `epoch_NNNN.json` (all), `last.keras` and `best.keras`; after a Slurm pre-emption, one
    step checkpoint inside the epoch after the last (`commit_step`).

    An epoch is committed when its `.keras` file is renamed into place, after its metrics
    file: whatever the moment of a kill, the newest epoch file loads and its metrics exist.
    """

    def __init__(self, folder: Path, keep: int = 2, monitor: str = "val_top1"):
        self.folder = Path(folder)
        self.keep = keep
        self.monitor = monitor

    @property
    def last(self) -> Path:
        return self.folder / "last.keras"

    @property
    def best(self) -> Path:
        return self.folder / "best.keras"

    def model_file(self, epoch: int) -> Path:
        return self.folder / f"epoch_{epoch:04d}.keras"

    def metrics_file(self, epoch: int) -> Path:
        return self.folder / f"epoch_{epoch:04d}.json"

    def latest_epoch(self) -> int:
        """The newest committed epoch (1-based), 0 if none."""
        done = [int(p.stem.split("_")[1]) for p in self.folder.glob("epoch_*.keras")]
        return max((e for e in done if self.metrics_file(e).is_file()), default=0)

    def metrics(self) -> dict[int, dict[str, float]]:
        """Every committed epoch's metrics, by epoch."""
        latest = self.latest_epoch()
        found = {}
        for path in self.folder.glob("epoch_*.json"):
            epoch = int(path.stem.split("_")[1])
            if epoch <= latest:
                found[epoch] = json.loads(path.read_text())
        return found

    def history(self, keys: list[str]) -> dict[str, list[float]]:
        """Each key's value at every committed epoch that has it, in epoch order."""
        epochs = self.metrics()
        return {key: [epochs[e][key] for e in sorted(epochs) if key in epochs[e]] for key in keys}

    def best_so_far(self) -> tuple[float, int]:
        scores = [(m.get(self.monitor, -math.inf), e) for e, m in self.metrics().items()]
        return max(scores, default=(-math.inf, 0))

    def commit(self, model: keras.Model, epoch: int, metrics: dict[str, float]) -> None:
        """Ctrl-C or SIGTERM during a commit is raised once it is whole (`STOP.held`): the
        epoch's file, `last.keras` and `best.keras` always agree."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with STOP.held():
            atomic_write(self.metrics_file(epoch), lambda p: p.write_text(json.dumps(metrics)))
            atomic_write(self.model_file(epoch), model.save)
            link_or_copy(self.model_file(epoch), self.last)
            best, _ = self.best_so_far()
            if metrics.get(self.monitor, -math.inf) >= best:
                link_or_copy(self.model_file(epoch), self.best)
            for old in sorted(self.folder.glob("epoch_*.keras"))[: -self.keep]:
                old.unlink()  # best.keras and last.keras are links of their own
            self._drop_steps()

    def commit_step(self, model: keras.Model, state: dict) -> None:
        """A checkpoint inside an epoch, `step_EEEE_SSSSSS.keras` beside its `.json` state
        (`epoch`, 0-based, and `step`, the steps of it done): the same write-then-rename
        discipline as an epoch, the `.keras` renamed into place last."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"step_{state['epoch']:04d}_{state['step']:06d}"
        atomic_write(self.folder / f"{name}.json", lambda p: p.write_text(json.dumps(state)))
        atomic_write(self.folder / f"{name}.keras", model.save)
        self._drop_steps(keep=name)

    def step_checkpoint(self) -> tuple[Path, dict] | None:
        """The newest checkpoint inside the epoch after the last committed one, with its
        state; None when training stopped at an epoch boundary (or never inside one)."""
        epoch = self.latest_epoch()
        found = []
        for path in self.folder.glob(f"step_{epoch:04d}_*.keras"):
            state = path.with_suffix(".json")
            if state.is_file():
                found.append((int(path.stem.split("_")[2]), path, state))
        if not found:
            return None
        _, path, state = max(found)
        return path, json.loads(state.read_text())

    def _drop_steps(self, keep: str | None = None) -> None:
        for old in sorted(self.folder.glob("step_*.keras")) + sorted(self.folder.glob("step_*.json")):
            if old.stem != keep:
                old.unlink(missing_ok=True)  # the model file first: a lone state file is inert


class EpochRecorder(keras.callbacks.Callback):
    """At each epoch end: gathers the metrics, commits a checkpoint, then logs to MLflow.

    Logs train/val loss, top-1, top-5, the learning rate of the epoch's last step, the
    optimizer step, epoch time and images/s, at `step=epoch` (1-based). Because the
    checkpoint (with these metrics beside it) is committed first, a run killed at any
    moment and resumed logs every epoch exactly once (see `replay_missing`).

    Args:
        tracker: where to log.
        run_id: the MLflow run.
        schedule: the learning-rate schedule (or a float).
        images_per_epoch: training images seen per epoch, for images/s.
        checkpoints: where to commit checkpoints; None to keep none.
        resumed: the state of the step checkpoint (`CheckpointDir.commit_step`) this run
            continues from: its epoch's train metrics and time go on from there.
    """

    def __init__(
        self,
        tracker: Tracker,
        run_id: str,
        schedule,
        images_per_epoch: int,
        checkpoints: CheckpointDir | None,
        resumed: dict | None = None,
    ):
        super().__init__()
        self.tracker = tracker
        self.run_id = run_id
        self.schedule = schedule
        self.images_per_epoch = images_per_epoch
        self.checkpoints = checkpoints
        self.resumed = resumed
        self._started = 0.0
        self._epoch = self._steps_before = self._iterations = 0
        self._carried = None

    def on_epoch_begin(self, epoch, logs=None):
        state, self.resumed = self.resumed, None
        if state is None or state["epoch"] != epoch:
            state = {"step": 0, "seconds": 0.0, "metrics": None}
        self._epoch, self._steps_before, self._carried = epoch, state["step"], state["metrics"]
        self._iterations = optimizer_step(self.model)
        self._started = time.perf_counter() - state["seconds"]

    def on_train_batch_end(self, batch, logs=None):
        # The train metrics are running sums (Keras builds them with the first step): the
        # sums of the steps done before a resume are added once, the epoch's figures whole.
        if self._carried is None:
            return
        for variable, value in zip(self.model.metrics_variables, self._carried, strict=True):
            variable.assign_add(np.asarray(value, dtype=variable.dtype))
        self._carried = None

    def commit_step(self) -> str:
        """Checkpoints the model where it stands inside the epoch (at a step boundary);
        returns where that is, for the user."""
        step = self._steps_before + optimizer_step(self.model) - self._iterations
        state = {
            "epoch": self._epoch,
            "step": step,
            "iterations": optimizer_step(self.model),
            "seconds": time.perf_counter() - self._started,
            "metrics": [keras.ops.convert_to_numpy(v).tolist() for v in self.model.metrics_variables],
        }
        self.checkpoints.commit_step(self.model, state)
        return f"at step {step} of epoch {self._epoch + 1} (checkpointed)"

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._started
        metrics = {}
        # val_top1 first: MLflow's compare page plots the first metric a run logged
        for key, value in sorted((logs or {}).items(), key=lambda item: item[0] != "val_top1"):
            split = "val" if key.startswith("val_") else "train"
            metrics[f"{split}_{key.removeprefix('val_')}"] = float(value)
        step = optimizer_step(self.model)
        metrics["lr"] = learning_rate_at(self.schedule, max(step - 1, 0))
        metrics["optimizer_step"] = float(step)
        metrics["epoch_time_s"] = seconds
        metrics["images_per_s"] = self.images_per_epoch / seconds
        if self.checkpoints is not None:
            self.checkpoints.commit(self.model, epoch + 1, metrics)
        self.tracker.log_metrics(self.run_id, metrics, step=epoch + 1)


def replay_missing(tracker: Tracker, run_id: str, checkpoints: CheckpointDir) -> list[int]:
    """Logs the committed epochs whose metrics never reached MLflow (a kill in between)."""
    logged = tracker.metric_history(run_id, "optimizer_step")
    committed = checkpoints.metrics()
    missing = sorted(e for e in committed if e not in logged)
    for epoch in missing:
        tracker.log_metrics(run_id, committed[epoch], step=epoch)
    return missing


class SwapEMAWeights(keras.callbacks.SwapEMAWeights):
    """Keras' swap of averaged weights into the model for validation and checkpoints.

    Checkpoints are written while the averaged weights are in the model (the raw ones sit
    in the optimizer's average slots), so a model restored from one holds them the other
    way round: with `restored=True` the first epoch swaps them back before it trains.

    Args:
        restored: the model was just loaded from one of this run's checkpoints.
    """

    def __init__(self, restored: bool = False):
        super().__init__(swap_on_epoch=True)
        self._ema_weights_in_model = restored


def command_started() -> float:
    """When the command began (epoch seconds): `VITEXP_T0` if a harness set it, else when
    this process started, from /proc (to a second), else now."""
    if os.environ.get("VITEXP_T0"):
        return float(os.environ["VITEXP_T0"])
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return time.time()


class TargetWatch(keras.callbacks.Callback):
    """Time to accuracy: after each epoch, top-1 on a fixed held-out split and the wall
    time since the command started; the first epoch at or above `target` is logged too.

    The split is the test set: training never sees it and nothing here steers training
    (no early stop, no checkpoint choice), so the figure is what the speed records report.
    Logs `target_top1` and `elapsed_s` per epoch, `time_to_target_s` and `target_epoch` once,
    and says them in a line `vitexp: epoch E/N: test top-1 ...` (the speedrun relays it).

    With test-time augmentation (more than one view) the one-view top-1 is logged too, as
    `target_top1_1view`.

    Args:
        tracker: where to log.
        run_id: the MLflow run.
        predict: the model -> its logits per view of the held-out split, [views, images,
            classes] (`vitexp.data.pipeline.predict_views`); the target is on their mean.
        labels: that split's integer labels.
        target: the top-1 to reach, in [0, 1].
    """

    def __init__(self, tracker: Tracker, run_id: str, predict, labels: np.ndarray, target: float):
        super().__init__()
        self.tracker = tracker
        self.run_id = run_id
        self.predict = predict
        self.labels = np.asarray(labels)
        self.target = target
        self.started = command_started()
        self.reached = False

    def on_epoch_end(self, epoch, logs=None):
        scores, _ = score_views(self.predict(self.model), self.labels)
        top1 = scores["top1"]
        elapsed = time.time() - self.started
        metrics = {"target_top1": top1, "elapsed_s": elapsed}
        if "top1_1view" in scores:
            metrics["target_top1_1view"] = scores["top1_1view"]
        reached = top1 >= self.target and not self.reached
        if reached:
            self.reached = True
            metrics.update(time_to_target_s=elapsed, target_epoch=float(epoch + 1))
        self.tracker.log_metrics(self.run_id, metrics, step=epoch + 1)
        print(
            f"vitexp: epoch {epoch + 1}/{self.params.get('epochs', '?')}: test top-1 {top1:.4f} "
            f"(target {self.target}{', reached' if reached else ''}) after {elapsed:.0f} s",
            file=sys.stderr,
            flush=True,
        )


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
            step = optimizer_step(self.model)
            lr = learning_rate_at(self.schedule, max(step - 1, 0))
            raise DivergenceError(
                f"training diverged: loss is {float(loss)} at epoch {self.epoch + 1}, step "
                f"{batch + 1} (learning rate {lr:.3g}); lower optimizer.learning_rate or set "
                "optimizer.clipnorm=1.0"
            )


def epochs_since_best(history: dict[int, dict[str, float]], monitor: str, min_delta: float) -> int:
    """Epochs since `monitor` last improved by more than `min_delta` (losses fall, accuracies
    rise), counted over every committed epoch, so a resumed run counts as if never stopped."""
    sign = -1.0 if monitor.endswith("loss") else 1.0
    best, best_epoch = -math.inf, 0
    for epoch in sorted(history):
        value = sign * history[epoch].get(monitor, -sign * math.inf)
        if value > best + min_delta:
            best, best_epoch = value, epoch
    return max(history, default=0) - best_epoch


class EarlyStopping(keras.callbacks.Callback):
    """Stops training once `monitor` has not improved for `patience` epochs.

    It reads the committed checkpoints' metrics rather than keeping its own count, so it
    gives the same answer after a resume. Place it after `EpochRecorder`.

    Args:
        checkpoints: the run's checkpoints, whose metrics it reads.
        patience: epochs without improvement before stopping.
        monitor: `val_top1`, `val_top5` or `val_loss`.
        min_delta: the smallest change that counts as an improvement.
    """

    def __init__(self, checkpoints: CheckpointDir, patience: int, monitor: str, min_delta: float = 0.0):
        super().__init__()
        self.checkpoints = checkpoints
        self.patience = patience
        self.monitor = monitor
        self.min_delta = min_delta
        self.stopped_epoch = 0

    def should_stop(self) -> bool:
        history = self.checkpoints.metrics()
        return bool(history) and epochs_since_best(history, self.monitor, self.min_delta) >= self.patience

    def on_epoch_end(self, epoch, logs=None):
        if self.should_stop():
            self.model.stop_training = True
            self.stopped_epoch = epoch + 1


class ProfileSteps(keras.callbacks.Callback):
    """A TensorFlow profiler trace of training steps `first..last` (1-based, counted from
    the start of this `fit`), written under `folder` (TensorBoard's profile plugin reads it).
    """

    def __init__(self, folder: Path, first: int, last: int):
        super().__init__()
        self.folder = Path(folder)
        self.first, self.last = first, last
        self.step = 0
        self.tracing = False

    def on_train_batch_begin(self, batch, logs=None):
        import tensorflow as tf

        self.step += 1
        if self.step == self.first:
            tf.profiler.experimental.start(str(self.folder))
            self.tracing = True

    def on_train_batch_end(self, batch, logs=None):
        if self.step >= self.last:
            self.on_train_end()

    def on_train_end(self, logs=None):
        import tensorflow as tf

        if self.tracing:
            tf.profiler.experimental.stop()
            self.tracing = False
