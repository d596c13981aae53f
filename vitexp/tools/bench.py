"""Training speed, side by side, in one command: the textbook's way against vitexp's.

    python -m vitexp.bench [--steps 60] [--model vit] [--out bench] [--tracking-uri URI]

Each configuration trains the same model in its own process (so peak memory is its own):

- `textbook`: numpy arrays into `fit`, `validation_split=0.2`, sparse labels and metrics,
  default compile: how the chapter trains. For its ViT, float arrays (`x / 255.`) at batch
  64 (with the input normalisation adapted, so that both train the same model and their
  losses compare); for its Swin, the uint8 arrays at batch 128 (`--batch 128`).
- `vitexp`, `vitexp_bf16`: `python -m vitexp`'s own path at the same batch, in float32 and
  in mixed_bfloat16, the two precisions `trainer.precision=auto` chooses between on a CPU:
  uint8 tf.data, MLflow tracking, atomic checkpoints and validation every epoch.
- the best: the row `trainer.precision=auto` picks for this model on this machine (marked
  `*`, with auto's reason). `--best-batch-factor k` adds `vitexp_best`, auto at k times the
  batch and learning rate (the linear rule): k=2 ran ~5% faster an epoch on an AVX-512
  BF16 CPU but, in a short fixed budget, half the updates cost accuracy, so it is not the
  default.

`--override experiment=vit_fashion_mnist_speedrun --batch 256` measures the speedrun's
model (and its XLA) the same way, on synthetic images of its data's shape.

Each holds the same `--images` training images (CIFAR-sized by default, the last 20% held
out for validation) and trains two epochs of `--steps` steps, validating on all held-out
images after each: the first pays for the graph trace, the second is timed. Reported: the
training steps' images/s, the epoch's time outside its steps (validation, and vitexp's
checkpoint and tracking), and from both the images/s of a whole epoch over the held
images, which the speedups compare. Also measured in the same run: a dense matmul peak
(float32 and bfloat16) and the model's training FLOPs per image, so the achieved FLOP/s of
the training steps reads as a fraction of what the machine can do. Results: a table on
stdout, `bench/bench.json`, an MLflow run; the last line is
`speedup_same_batch=<x> speedup_best=<y> bf16_over_fp32=<z>` (whole-epoch rates: vitexp
float32 and the best against the textbook, vitexp bfloat16 against float32). The machine
(CPU model, cores, the ISA flags that decide bfloat16 speed, GPUs) is printed with the
figures and kept in the report.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from vitexp.cli import explain_compose_error
from vitexp.config import compose
from vitexp.errors import fail
from vitexp.machine import describe, one_line
from vitexp.tools.args import ToolParser
from vitexp.tracking import Tracker, flatten, tag

PROG = "vitexp.bench"
VALIDATION_SPLIT = 0.2  # the textbook's, and vitexp's default
# vitexp at the textbook's batch, in each precision `trainer.precision=auto` chooses between on a CPU
CONFIGS = {
    "vitexp": ["trainer.precision=float32"],
    "vitexp_bf16": ["trainer.precision=mixed_bfloat16"],
}


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


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: use a whole number of at least 1")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ToolParser(PROG, __doc__)
    parser.add_argument("--steps", type=positive, default=60, help="timed training steps at --batch")
    parser.add_argument(
        "--batch", type=positive, default=64, help="batch size (the textbook's: 64 for its ViT, 128 for Swin)"
    )
    parser.add_argument("--model", default="vit")
    parser.add_argument(
        "--best-batch-factor",
        type=positive,
        default=1,
        help="vitexp_best's batch and learning rate, times --batch and the config's rate",
    )
    parser.add_argument(
        "--images", type=positive, default=50000, help="training images held in memory (CIFAR: 50000)"
    )
    parser.add_argument(
        "--override",
        dest="overrides",
        action="append",
        default=[],
        help="a config override for every configuration (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:  # TensorFlow is imported by the workers only: the command starts at once
        from vitexp.tools.bench_worker import worker

        return worker(args)
    check_overrides(args)
    machine = {"machine": describe(), **spawn("machine", args)}
    results = {name: spawn(name, args) for name in ("textbook", *CONFIGS)}
    best = best_row(results, machine["auto"], args)
    if best == "vitexp_best":
        results[best] = spawn(best, args)
    report = {
        "model": args.model,
        "overrides": args.overrides,
        "steps": args.steps,
        "batch": args.batch,
        "best": best,
        "best_overrides": best_overrides(args),
        **machine,
        "results": results,
        **summarise(results, best, machine, args.images),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=1))
    print_report(report)
    log_to_mlflow(report, args)
    print(
        f"speedup_same_batch={report['speedup_same_batch']:.2f} speedup_best={report['speedup_best']:.2f} "
        f"bf16_over_fp32={report['bf16_over_fp32']:.2f}"
    )


def best_overrides(args) -> list[str]:
    """`trainer.precision=auto`, with the batch and learning rate scaled by `--best-batch-factor`."""
    if args.best_batch_factor == 1:
        return ["trainer.precision=auto"]
    lr = compose([f"model={args.model}", *args.overrides]).optimizer.learning_rate
    return [
        "trainer.precision=auto",
        f"trainer.batch_size={args.best_batch_factor * args.batch}",
        f"optimizer.learning_rate={args.best_batch_factor * lr:g}",
    ]


def check_overrides(args) -> None:
    """`--model` and every `--override` compose, or the command ends in one line before any
    worker starts."""
    try:
        compose([f"model={args.model}", *args.overrides])
    except (HydraException, OmegaConfBaseException) as err:
        fail(explain_compose_error(err), prog=PROG)


def best_row(results: dict, auto: dict, args) -> str:
    """The configuration `trainer.precision=auto` trains: the row in its precision at the same
    batch, or `vitexp_best` (run only then) at `--best-batch-factor` times the batch."""
    same = [name for name in CONFIGS if results[name]["precision"] == auto["precision"]]
    return same[0] if same and args.best_batch_factor == 1 else "vitexp_best"


def summarise(results: dict, best: str, machine: dict, images: int) -> dict:
    """Adds each configuration's whole-epoch rate and FLOP/s to `results`; returns the speedups."""
    flops = machine["train_flops_per_image"]
    train_images = int(images * (1 - VALIDATION_SPLIT))
    for r in results.values():
        peak = machine["peak_gflops"]["bfloat16" if "bfloat16" in r["precision"] else "float32"]
        # a whole epoch over the held images: the timed steps' rate, plus what the timed
        # epoch spent outside its steps (validation on all held-out images, checkpoint, tracking)
        r["full_epoch_s"] = train_images / r["train_images_per_s"] + r["epoch_overhead_s"]
        r["images_per_s"] = train_images / r["full_epoch_s"]
        r["achieved_gflops"] = r["train_images_per_s"] * flops / 1e9
        r["fraction_of_matmul_peak"] = r["achieved_gflops"] / peak
    ref, fp32, bf16 = results["textbook"], results["vitexp"], results["vitexp_bf16"]
    return {
        "speedup_same_batch": fp32["images_per_s"] / ref["images_per_s"],
        "speedup_best": results[best]["images_per_s"] / ref["images_per_s"],
        "train_speedup_same_batch": fp32["train_images_per_s"] / ref["train_images_per_s"],
        # bfloat16 against float32, vitexp's path at the same batch: what `auto` decides on
        "bf16_over_fp32": bf16["images_per_s"] / fp32["images_per_s"],
        "train_bf16_over_fp32": bf16["train_images_per_s"] / fp32["train_images_per_s"],
    }


def print_report(report: dict) -> None:
    """The machine, then a speed table and a memory table, one row per configuration."""
    peak, results = report["peak_gflops"], report["results"]
    print(f"machine: {one_line(report['machine'])}")
    print(
        f"model {report['model']}: {report['train_flops_per_image'] / 1e9:.3f} GFLOP per training image; "
        f"matmul peak {peak['float32']:.0f} GFLOP/s float32, {peak['bfloat16']:.0f} bfloat16"
    )
    print(
        f"{'config':<13}{'precision':<16}{'train img/s':>12}{'overhead s':>11}{'epoch img/s':>12}"
        f"{'first step s':>13}{'GFLOP/s':>9}{'of peak':>9}   loss per epoch"
    )
    for name, r in results.items():
        mark = "*" if name == report["best"] else ""
        print(
            f"{name + mark:<13}{r['precision']:<16}{r['train_images_per_s']:>12.1f}"
            f"{r['epoch_overhead_s']:>11.1f}{r['images_per_s']:>12.1f}{r['first_step_s']:>13.1f}"
            f"{r['achieved_gflops']:>9.1f}{r['fraction_of_matmul_peak']:>9.2f}"
            f"   {', '.join(f'{v:.3f}' for v in r['loss_per_epoch'])}"
        )
    auto = report["auto"]
    print(
        f"bfloat16 / float32 (vitexp, batch {report['batch']}): x{report['train_bf16_over_fp32']:.2f} "
        f"training steps, x{report['bf16_over_fp32']:.2f} whole epoch; "
        f"* trainer.precision=auto: {auto['precision']} ({auto['reason']})"
    )
    print(f"{'memory, MB':<13}{'peak RSS':>10}{'above TF':>10}{'before training':>17}{'first step':>12}")
    for name, r in results.items():
        print(
            f"{name:<13}{r['peak_rss_mb']:>10.0f}{r['rss_above_tf_mb']:>10.0f}"
            f"{r['setup_mb']:>17.0f}{r['first_step_mb']:>12.0f}"
        )


def log_to_mlflow(report: dict, args) -> None:
    tracker = Tracker(args.tracking_uri, "bench")
    run_id = tracker.start_run(f"bench-{args.model}", {tag.COMMAND: " ".join(sys.argv)})
    metrics = {
        f"{name}.{k}": v
        for name, r in report["results"].items()
        for k, v in r.items()
        if isinstance(v, int | float)
    }
    summary = ("speedup_same_batch", "speedup_best", "bf16_over_fp32", "train_bf16_over_fp32")
    metrics.update({k: report[k] for k in (*summary, "train_flops_per_image")})
    tracker.log_metrics(run_id, metrics, step=0)
    tracker.log_params(
        run_id,
        flatten(
            {
                "model": args.model,
                "overrides": args.overrides,
                "steps": args.steps,
                "batch": args.batch,
                "best": report["best_overrides"],
                "auto_precision": report["auto"]["precision"],
                "auto_reason": report["auto"]["reason"],
            }
        ),
    )
    tracker.log_artifact(run_id, args.out / "bench.json")
    tracker.flush()
    tracker.end_run(run_id)


if __name__ == "__main__":
    main()
