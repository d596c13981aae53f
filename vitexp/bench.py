"""Training speed, side by side, in one command: the textbook's way against vitexp's.

    python -m vitexp.bench [--steps 60] [--model vit] [--out bench] [--tracking-uri URI]

Each configuration trains the same model in its own process (so peak memory is its own):

- `textbook`: numpy arrays into `fit`, `validation_split=0.2`, sparse labels and metrics,
  default compile: how the chapter trains. For its ViT, float arrays (`x / 255.`) at batch
  64 (with the input normalisation adapted, so that both train the same model and their
  losses compare); for its Swin, the uint8 arrays at batch 128 (`--batch 128`).
- `vitexp`: `python -m vitexp`'s own path at the same batch and precision (float32): uint8
  tf.data, MLflow tracking, atomic checkpoints and validation every epoch.
- `vitexp_best`: vitexp at the settings fastest on this machine without costing accuracy:
  `trainer.precision=auto` at the same batch, which is mixed_bfloat16 on CPUs that run
  bfloat16 natively (AVX-512 BF16, AMX) and float32 elsewhere. `--best-batch-factor k`
  also scales its batch and learning rate by k (the linear rule): k=2 ran ~5% faster an
  epoch on an AVX-512 BF16 CPU but, in a short fixed budget, half the updates cost
  accuracy, so it is not the default.

Each holds the same `--images` training images (CIFAR-sized by default, the last 20% held
out for validation) and trains two epochs of `--steps` steps, validating on all held-out
images after each: the first pays for the graph trace, the second is timed. Reported: the
training steps' images/s, the epoch's time outside its steps (validation, and vitexp's
checkpoint and tracking), and from both the images/s of a whole epoch over the held
images, which the speedups compare. Also measured in the same run: a dense matmul peak
(float32 and bfloat16) and the model's training FLOPs per image, so the achieved FLOP/s of
the training steps reads as a fraction of what the machine can do. Results: a table on
stdout, `bench/bench.json`, an MLflow run; the last line is
`speedup_same_batch=<x> speedup_best=<y>`. The machine (CPU model, cores, the ISA flags
that decide bfloat16 speed, GPUs) is printed with the figures and kept in the report.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from vitexp.machine import describe, one_line  # noqa: E402

VALIDATION_SPLIT = 0.2  # the textbook's, and vitexp's default


def rss_mb() -> float:
    """Peak resident memory of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
            self.first_step_s = time.perf_counter() - T0
            self.rss_after_first_step_mb = current_rss_mb()

    def on_epoch_end(self, epoch, logs=None):  # runs after validation and vitexp's checkpoint
        self.epoch_s.append(time.perf_counter() - self._start)


def synthetic(count: int, shape, classes: int):
    from vitexp.data.synthetic import load_synthetic

    data = load_synthetic(num_classes=classes, image_shape=shape, num_train=count, num_test=64, seed=0)
    return data.train_x, data.train_y


def run_textbook(args) -> dict:
    from vitexp.config import compose
    from vitexp.optim import WarmupCosine

    cfg = compose([f"model={args.model}", *args.overrides])
    baseline = rss_mb()
    x, y = synthetic(args.images, tuple(cfg.data.image_shape), cfg.data.num_classes)
    from hydra.utils import instantiate

    from vitexp.data.pipeline import split_validation
    from vitexp.models import adapt_input_norm

    model = instantiate(cfg.model, _convert_="all")
    # the same model as vitexp trains (its normalisation adapted, not the textbook's identity),
    # fed the textbook's way: for the ViT a float64 copy of the whole set, sliced batch by
    # batch by Keras; Swin (no `input_norm`: tfswin normalises 0-255 pixels) gets the uint8 set
    if any(layer.name == "input_norm" for layer in model.layers):
        x = x / 255.0
        adapt_input_norm(model, x[: int(len(x) * 0.8)])
    schedule = WarmupCosine(1e-3, args.steps * 2, 0.1)
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
    import tempfile

    from vitexp.config import compose
    from vitexp.train import train

    folder = Path(tempfile.mkdtemp(prefix="vitexp-bench-"))
    batch = next((int(o.split("=")[1]) for o in overrides if o.startswith("trainer.batch_size=")), args.batch)
    steps = args.steps * args.batch // batch
    cfg = compose(
        [
            f"model={args.model}",
            f"trainer.batch_size={args.batch}",
            *args.overrides,
            "data=synthetic",
            f"data.num_train={args.images}",
            f"trainer.steps_per_epoch={steps}",
            "data.num_test=64",
            "data.num_classes=100",
            "data.image_shape=[32,32,3]",
            "trainer.epochs=2",
            "trainer.verbose=0",
            "report.enabled=false",
            "tracking.log_checkpoints=false",
            "tracking.experiment=bench-runs",
            f"tracking.uri=sqlite:///{folder / 'mlflow.db'}",
            *overrides,
        ]
    )
    baseline = rss_mb()
    timer = EpochTimer()
    train(cfg, callbacks=(timer,))
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("bench-runs").experiment_id])[0]
    losses = [
        m.value
        for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)
    ]
    return result(
        timer,
        steps * batch,
        baseline,
        losses,
        int(run.data.params["num_params"]),
        int(run.data.params["val_images"]),
        precision=run.data.params["precision"],
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


def matmul_peak() -> dict:
    """Dense matmul throughput at 2048x2048 in float32 and bfloat16, GFLOP/s."""
    import tensorflow as tf

    peaks = {}
    for dtype in (tf.float32, tf.bfloat16):
        a = tf.random.normal((2048, 2048), dtype=tf.float32)
        a = tf.cast(a, dtype)
        step = tf.function(lambda m: tf.linalg.matmul(m, m))
        step(a).numpy()
        start, reps = time.perf_counter(), 20
        for _ in range(reps):
            out = step(a)
        out.numpy()
        peaks[dtype.name] = 2 * 2048**3 * reps / (time.perf_counter() - start) / 1e9
    return peaks


def training_flops(model_name: str, overrides: list[str]) -> float:
    """Forward FLOPs of one image (TensorFlow's graph profiler), times 3 for training."""
    import tensorflow as tf
    from hydra.utils import instantiate
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from vitexp.config import compose

    cfg = compose([f"model={model_name}", *overrides])
    model = instantiate(cfg.model, _convert_="all")
    spec = tf.TensorSpec([1, *cfg.data.image_shape], tf.float32)
    frozen = convert_variables_to_constants_v2(tf.function(lambda x: model(x)).get_concrete_function(spec))
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    profile = tf.compat.v1.profiler.profile(graph=frozen.graph, options=opts)
    return 3.0 * profile.total_float_ops


def best_overrides(args) -> list[str]:
    """`trainer.precision=auto`, with the batch and learning rate scaled by `--best-batch-factor`."""
    from vitexp.config import compose

    if args.best_batch_factor == 1:
        return ["trainer.precision=auto"]
    lr = compose([f"model={args.model}", *args.overrides]).optimizer.learning_rate
    return [
        "trainer.precision=auto",
        f"trainer.batch_size={args.best_batch_factor * args.batch}",
        f"optimizer.learning_rate={args.best_batch_factor * lr:g}",
    ]


def worker(args) -> None:
    if args.worker == "textbook":
        out = run_textbook(args)
    elif args.worker == "machine":
        out = {
            "peak_gflops": matmul_peak(),
            "train_flops_per_image": training_flops(args.model, args.overrides),
        }
    else:
        same = ["trainer.precision=float32"]
        out = run_vitexp(args, best_overrides(args) if args.worker == "vitexp_best" else same)
    print("BENCH " + json.dumps(out))


def spawn(name: str, args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "vitexp.bench",
        "--worker",
        name,
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--model",
        args.model,
        "--images",
        str(args.images),
        "--best-batch-factor",
        str(args.best_batch_factor),
        *[f"--override={o}" for o in args.overrides],
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"bench worker {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][6:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vitexp.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed training steps at --batch")
    parser.add_argument(
        "--batch", type=int, default=64, help="batch size (the textbook's: 64 for its ViT, 128 for its Swin)"
    )
    parser.add_argument("--model", default="vit")
    parser.add_argument(
        "--best-batch-factor",
        type=int,
        default=1,
        help="vitexp_best's batch and learning rate, times --batch and the config's rate",
    )
    parser.add_argument(
        "--images", type=int, default=50000, help="training images held in memory (CIFAR: 50000)"
    )
    parser.add_argument(
        "--override",
        dest="overrides",
        action="append",
        default=[],
        help="a config override for every configuration (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    machine = {"machine": describe(), **spawn("machine", args)}
    results = {name: spawn(name, args) for name in ("textbook", "vitexp", "vitexp_best")}
    flops = machine["train_flops_per_image"]
    train_images = int(args.images * (1 - VALIDATION_SPLIT))
    for r in results.values():
        peak = machine["peak_gflops"]["bfloat16" if "bfloat16" in r["precision"] else "float32"]
        # a whole epoch over the held images: the timed steps' rate, plus what the timed
        # epoch spent outside its steps (validation on all held-out images, checkpoint, tracking)
        r["full_epoch_s"] = train_images / r["train_images_per_s"] + r["epoch_overhead_s"]
        r["images_per_s"] = train_images / r["full_epoch_s"]
        r["achieved_gflops"] = r["train_images_per_s"] * flops / 1e9
        r["fraction_of_matmul_peak"] = r["achieved_gflops"] / peak
    ref = results["textbook"]["images_per_s"]
    summary = {
        "speedup_same_batch": results["vitexp"]["images_per_s"] / ref,
        "speedup_best": results["vitexp_best"]["images_per_s"] / ref,
        "train_speedup_same_batch": results["vitexp"]["train_images_per_s"]
        / results["textbook"]["train_images_per_s"],
    }
    report = {
        "model": args.model,
        "steps": args.steps,
        "batch": args.batch,
        "best_overrides": best_overrides(args),
        **machine,
        "results": results,
        **summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=1))
    peak = machine["peak_gflops"]
    print(f"machine: {one_line(machine['machine'])}")
    print(
        f"model {args.model}: {flops / 1e9:.3f} GFLOP per training image; matmul peak "
        f"{peak['float32']:.0f} GFLOP/s float32, {peak['bfloat16']:.0f} bfloat16"
    )
    print(
        f"{'config':<13}{'precision':<16}{'train img/s':>12}{'overhead s':>11}{'epoch img/s':>12}"
        f"{'first step s':>13}{'GFLOP/s':>9}{'of peak':>9}   loss per epoch"
    )
    for name, r in results.items():
        print(
            f"{name:<13}{r['precision']:<16}{r['train_images_per_s']:>12.1f}{r['epoch_overhead_s']:>11.1f}"
            f"{r['images_per_s']:>12.1f}{r['first_step_s']:>13.1f}"
            f"{r['achieved_gflops']:>9.1f}{r['fraction_of_matmul_peak']:>9.2f}"
            f"   {', '.join(f'{v:.3f}' for v in r['loss_per_epoch'])}"
        )
    print(f"{'memory, MB':<13}{'peak RSS':>10}{'above TF':>10}{'before training':>17}{'first step':>12}")
    for name, r in results.items():
        print(
            f"{name:<13}{r['peak_rss_mb']:>10.0f}{r['rss_above_tf_mb']:>10.0f}"
            f"{r['setup_mb']:>17.0f}{r['first_step_mb']:>12.0f}"
        )
    log_to_mlflow(report, args)
    print(
        f"speedup_same_batch={summary['speedup_same_batch']:.2f} speedup_best={summary['speedup_best']:.2f}"
    )


def log_to_mlflow(report: dict, args) -> None:
    from vitexp.tracking import Tracker, flatten

    tracker = Tracker(args.tracking_uri, "bench")
    run_id = tracker.start_run(f"bench-{args.model}", {"vitexp.command": " ".join(sys.argv)})
    metrics = {
        f"{name}.{k}": v
        for name, r in report["results"].items()
        for k, v in r.items()
        if isinstance(v, int | float)
    }
    metrics.update({k: report[k] for k in ("speedup_same_batch", "speedup_best", "train_flops_per_image")})
    tracker.log_metrics(run_id, metrics, step=0)
    tracker.log_params(
        run_id,
        flatten(
            {"model": args.model, "steps": args.steps, "batch": args.batch, "best": report["best_overrides"]}
        ),
    )
    tracker.log_artifact(run_id, args.out / "bench.json")
    tracker.flush()
    tracker.end_run(run_id)


if __name__ == "__main__":
    main()
