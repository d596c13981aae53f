"""What one bench worker process measures: a configuration's training, or the machine's peak.

`python -m vitexp.bench` runs each in a process of its own (`--worker NAME`), so that peak
memory is its own, and reads back the one `BENCH {json}` line the worker prints.
"""

import contextlib
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from vitexp.config import compose  # noqa: E402
from vitexp.data.pipeline import split_validation  # noqa: E402
from vitexp.data.synthetic import load_synthetic  # noqa: E402
from vitexp.models import adapt_input_norm  # noqa: E402
from vitexp.optim.warmup_cosine import WarmupCosine  # noqa: E402
from vitexp.tools.bench import CONFIGS, VALIDATION_SPLIT, best_overrides  # noqa: E402
from vitexp.tracking import Tracker, sqlite_store  # noqa: E402
from vitexp.train.devices import choose_precision, training_flops  # noqa: E402
from vitexp.train.run import train  # noqa: E402


def rss_mb() -> float:
    """Peak resident memory of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_age_s() -> float:
    """Seconds since this process started, the interpreter's and the imports' start-up included."""
    with open("/proc/self/stat") as stat:  # field 22, the start in clock ticks after boot
        start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as uptime:
        return float(uptime.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")


def current_rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(ln for ln in status if ln.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


class EpochTimer(keras.callbacks.Callback):
    """Time from process start to the first step; each epoch's training steps and wall time."""

    def __init__(self):
        super().__init__()
        self.first_step_s = None
        self.epoch_s: list[float] = []
        self.train_s: list[float] = []
        self._start = 0.0
        self.rss_at_train_begin_mb = 0.0
        self.rss_after_first_step_mb = 0.0

    def on_train_begin(self, logs=None):  # data, pipeline, model and optimizer are built
        self.rss_at_train_begin_mb = current_rss_mb()

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_test_begin(self, logs=None):  # validation starts: the epoch's training steps are done
        if len(self.train_s) <= len(self.epoch_s):
            self.train_s.append(time.perf_counter() - self._start)

    def on_train_batch_end(self, batch, logs=None):
        if self.first_step_s is None:
            self.first_step_s = process_age_s()
            self.rss_after_first_step_mb = current_rss_mb()

    def on_epoch_end(self, epoch, logs=None):  # runs after validation and vitexp's checkpoint
        self.epoch_s.append(time.perf_counter() - self._start)


def synthetic(count: int, shape, classes: int):
    data = load_synthetic(
        num_classes=classes, image_shape=shape, num_train=count, num_test=64, noise=0.25, seed=0
    )
    return data.train_x, data.train_y


def run_textbook(args) -> dict:
    cfg = compose([f"model={args.model}", *args.overrides])
    baseline = rss_mb()
    x, y = synthetic(args.images, tuple(cfg.data.image_shape), cfg.data.num_classes)
    model = instantiate(cfg.model, _convert_="all")
    # the same model as vitexp trains (its normalisation adapted, not the textbook's identity),
    # fed the textbook's way: for the ViT a float64 copy of the whole set, sliced batch by
    # batch by Keras; Swin (no `input_norm`: tfswin normalises 0-255 pixels) gets the uint8 set
    if any(layer.name == "input_norm" for layer in model.layers):
        x = x / 255.0
        adapt_input_norm(model, x[: int(len(x) * 0.8)])
    schedule = WarmupCosine(1e-3, args.steps * 2, warmup_fraction=0.1, warmup_lr=0.0, final_lr=0.0)
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=schedule, weight_decay=1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(5, name="top-5-accuracy"),
        ],
    )
    timer = EpochTimer()
    history = model.fit(
        x,
        y,
        batch_size=args.batch,
        epochs=2,
        steps_per_epoch=args.steps,
        validation_split=VALIDATION_SPLIT,
        callbacks=[timer],
        verbose=0,
    )
    held_out = len(split_validation(x, y, VALIDATION_SPLIT)[1][0])  # Keras' split: the last 20%
    return result(
        timer, args.steps * args.batch, baseline, history.history["loss"], model.count_params(), held_out
    )


def run_vitexp(args, overrides) -> dict:
    folder = Path(tempfile.gettempdir())  # the worker's own scratch folder (`scratch`)
    batch = next((int(o.split("=")[1]) for o in overrides if o.startswith("trainer.batch_size=")), args.batch)
    steps = args.steps * args.batch // batch
    data = compose([f"model={args.model}", *args.overrides]).data  # the images the model is for
    cfg = compose(
        [
            f"model={args.model}",
            f"trainer.batch_size={args.batch}",
            *args.overrides,
            "data=synthetic",
            f"data.num_train={args.images}",
            f"trainer.steps_per_epoch={steps}",
            "data.num_test=64",
            f"data.num_classes={data.num_classes}",
            f"data.image_shape=[{','.join(map(str, data.image_shape))}]",
            f"trainer.validation_split={VALIDATION_SPLIT}",
            "trainer.epochs=2",
            "trainer.verbose=0",
            "report.enabled=false",
            "tracking.log_checkpoints=false",
            "tracking.log_model=false",
            "tracking.experiment=bench-runs",
            f"tracking.uri={sqlite_store(folder)}",
            *overrides,
        ]
    )
    baseline = rss_mb()
    timer = EpochTimer()
    train(cfg, callbacks=(timer,))
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    run = tracker.find_runs()[0]
    losses = list(tracker.metric_history(run.id, "train_loss").values())
    return result(
        timer,
        steps * batch,
        baseline,
        losses,
        int(run.params["num_params"]),
        int(run.params["val_images"]),
        precision=run.params["precision"],
    )


def result(
    timer, images: int, baseline_mb: float, losses, params: int, val_images: int, precision: str = "float32"
) -> dict:
    return {
        "val_images": val_images,
        "train_images_per_s": images / timer.train_s[-1],
        "epoch_overhead_s": timer.epoch_s[-1] - timer.train_s[-1],
        "epoch_s": timer.epoch_s[-1],
        "first_step_s": timer.first_step_s,
        "peak_rss_mb": rss_mb(),
        "rss_above_tf_mb": rss_mb() - baseline_mb,
        # where it goes: what the data and model hold before training, what the first step adds
        "setup_mb": timer.rss_at_train_begin_mb - baseline_mb,
        "first_step_mb": timer.rss_after_first_step_mb - timer.rss_at_train_begin_mb,
        "loss_per_epoch": [float(v) for v in losses],
        "num_params": params,
        "precision": precision,
    }


def matmul_peak(size: int = 1024, budget_s: float = 1.0) -> dict:
    """Dense matmul throughput at `size` x `size` in float32 and bfloat16, GFLOP/s, each timed
    over about `budget_s` (a CPU without native bfloat16 emulates it, many times slower)."""
    import tensorflow as tf

    peaks = {}
    for dtype in (tf.float32, tf.bfloat16):
        a = tf.cast(tf.random.normal((size, size), dtype=tf.float32), dtype)
        step = tf.function(lambda m: tf.linalg.matmul(m, m))
        start = time.perf_counter()
        step(a).numpy()  # traced and run once: how many more fit in the budget
        reps = max(1, min(50, int(budget_s / max(time.perf_counter() - start, 1e-6))))
        start = time.perf_counter()
        for _ in range(reps):
            out = step(a)
        out.numpy()
        peaks[dtype.name] = 2 * size**3 * reps / (time.perf_counter() - start) / 1e9
    return peaks


def model_cost(args) -> dict:
    """The model's training FLOPs per image, and what `trainer.precision=auto` chooses for it
    on this machine, and why."""
    flops = training_flops(compose([f"model={args.model}", *args.overrides]).model)
    precision, reason = choose_precision("auto", model_gflop=lambda: flops / 1e9)
    return {"train_flops_per_image": flops, "auto": {"precision": precision, "reason": reason}}


@contextlib.contextmanager
def scratch():
    """Points every temporary file of the worker at one folder of its own, removed when it
    ends: the run's store and output folder (checkpoints included), TensorFlow's traces."""
    folder = tempfile.mkdtemp(prefix="vitexp-bench-")
    before, tempfile.tempdir = tempfile.tempdir, folder
    try:
        yield
    finally:
        tempfile.tempdir = before
        shutil.rmtree(folder, ignore_errors=True)


def worker(args) -> None:
    with scratch():
        measure(args)


def measure(args) -> None:
    if args.worker == "textbook":
        out = run_textbook(args)
    elif args.worker == "machine":
        out = {"peak_gflops": matmul_peak(), **model_cost(args)}
    else:
        out = run_vitexp(args, CONFIGS[args.worker] if args.worker in CONFIGS else best_overrides(args))
    print("BENCH " + json.dumps(out))
