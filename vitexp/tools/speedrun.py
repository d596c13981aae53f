"""Time to accuracy: a recipe trained over several seeds, timed to a target test top-1.

    python -m vitexp.speedrun [--experiment vit_fashion_mnist_speedrun] [--target 0.92]
        [--seeds 3] [--tracking-uri URI] [--out speedrun] [OVERRIDE ...]

Each seed is one `python -m vitexp` process, as a user's command is, so each pays its own
start-up. After every epoch the run scores the whole test split (`trainer.target_top1`:
training never sees it and nothing steers on it) and logs the wall time since the command
started; time to target is that time at the first epoch at or above the target. Reported
per seed and as mean / std / min / max: time to target, wall time of the whole run,
epochs, final test top-1 and training images/s, with the machine (CPU model, cores, the
ISA flags that decide bfloat16 speed, GPUs). A table on stdout, `<out>/speedrun.json`, an
MLflow parent run with a child per seed; the last line is
`time_to_target_s=<mean> accuracy=<mean> seeds=<n>` (time nan if a seed missed the target).
While a seed trains, each epoch's test top-1 and the time so far show on stderr, and where
the seed's whole output goes (`<out>/seed_<n>.log`). A seed that misses the target (or
fails) makes the parent run FAILED and the command exit 1, naming the seed and its log.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vitexp.errors import fail
from vitexp.machine import describe, one_line
from vitexp.tools.args import ToolParser
from vitexp.tracking import FAILED, FINISHED, PARENT_ENV, Tracker, flatten, tag
from vitexp.tracking.uri import env_experiment

# a seed's lines that the command relays: each epoch's check against the target, errors
PROGRESS = ("vitexp: epoch ", "vitexp: error")
COLUMNS = (
    "time_to_target_s",
    "wall_s",
    "epochs",
    "val_top1",
    "val_top1_1view",
    "test_top1",
    "test_top1_1view",
    "images_per_s",
)


def run_seed(args, seed: int, tracker: Tracker, parent: str) -> float:
    """Trains one seed in its own process, its output into `<out>/seed_<seed>.log` and its
    progress (each epoch's test top-1, its errors) on stderr; returns its wall time in seconds."""
    args.out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "vitexp",
        f"experiment={args.experiment}",
        f"trainer.seed={seed}",
        f"trainer.target_top1={args.target}",
        f"tracking.uri={tracker.uri}",
        f"tracking.experiment={tracker.experiment}",
        f"hydra.run.dir={args.out.resolve() / f'seed_{seed}'}",
        *args.overrides,
    ]
    started = time.time()
    env = {**os.environ, PARENT_ENV: parent, "VITEXP_T0": repr(started), "PYTHONUNBUFFERED": "1"}
    path = seed_log(args, seed)
    say(f"seed {seed} ({seed + 1} of {args.seeds}) training; its log: {path}")
    relay(command, env, path, f"seed {seed}: ")
    return time.time() - started


def relay(command: list[str], env: dict, path: Path, prefix: str) -> None:
    """Runs `command`, its whole output into `path` line by line (a user who follows the log
    sees each line as it comes) and its progress lines on stderr after `prefix`."""
    with (
        open(path, "w", buffering=1) as log,
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc,
    ):
        for line in proc.stdout:
            log.write(line)
            if line.startswith(PROGRESS):
                say(prefix + line.removeprefix("vitexp: ").rstrip())


def seed_log(args, seed: int) -> Path:
    return args.out / f"seed_{seed}.log"


def say(line: str) -> None:
    print(f"vitexp.speedrun: {line}", file=sys.stderr, flush=True)


def seed_row(tracker: Tracker, run, wall: float) -> dict:
    """One seed's figures, read back from its MLflow run."""
    metrics = run.metrics
    speeds = list(tracker.metric_history(run.id, "images_per_s").values())
    epochs = tracker.metric_history(run.id, "target_top1")
    return {
        "seed": int(run.params["trainer.seed"]),
        "run_id": run.id,
        "status": run.status,
        "time_to_target_s": metrics.get("time_to_target_s"),
        "target_epoch": metrics.get("target_epoch"),
        "wall_s": wall,
        "epochs": len(epochs),
        # the tested checkpoint on the held-out validation images, where choices are made
        "val_top1": metrics.get("tested_val_top1"),
        "val_top1_1view": metrics.get("tested_val_top1_1view"),
        "test_top1": metrics.get("test_top1"),
        # with test-time augmentation (trainer.tta), top-1 on the images as they are
        "test_top1_1view": metrics.get("test_top1_1view"),
        "tta": run.params.get("trainer.tta", "none"),
        # the first epoch pays for the graph trace: the rate of the others, where there are
        "images_per_s": statistics.fmean(speeds[1:] or speeds) if speeds else None,
    }


def missing_row(args, seed: int, wall: float) -> dict:
    """A seed whose process ended before it created its run: its log says why."""
    log = seed_log(args, seed)
    lines = log.read_text().strip().splitlines() if log.is_file() else []
    print(
        f"vitexp.speedrun: seed {seed} recorded no run: {lines[-1] if lines else '?'} ({log})",
        file=sys.stderr,
    )
    return {
        **dict.fromkeys(("run_id", "target_epoch", *COLUMNS)),
        "seed": seed,
        "status": "NO RUN",
        "wall_s": wall,
        "epochs": 0,
    }


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    summary = {}
    for column in COLUMNS:
        values = [r[column] for r in rows if r[column] is not None]
        if not values:
            continue
        summary[column] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
        }
    return summary


def print_table(rows: list[dict], summary: dict, machine: dict, args) -> None:
    print(f"speedrun {args.experiment}: target test top-1 {args.target} on {one_line(machine)}")
    print(
        f"{'seed':>6}{'to target s':>13}{'epoch':>7}{'wall s':>9}{'epochs':>8}{'val top-1':>11}"
        f"{'1 view':>9}{'test top-1':>12}{'1 view':>9}{'img/s':>9}"
    )

    def cell(value, fmt):
        width = int(fmt.split(".")[0])
        return format(value, fmt) if value is not None else "-".rjust(width)

    for r in rows:
        print(
            f"{r['seed']:>6}{cell(r['time_to_target_s'], '13.1f')}{cell(r['target_epoch'], '7.0f')}"
            f"{r['wall_s']:>9.1f}{r['epochs']:>8}{cell(r['val_top1'], '11.4f')}"
            f"{cell(r['val_top1_1view'], '9.4f')}{cell(r['test_top1'], '12.4f')}"
            f"{cell(r['test_top1_1view'], '9.4f')}{cell(r['images_per_s'], '9.1f')}"
        )
    for stat in ("mean", "std", "min", "max"):
        values = {c: summary.get(c, {}).get(stat) for c in COLUMNS}
        print(
            f"{stat:>6}{cell(values['time_to_target_s'], '13.1f')}{'':>7}{cell(values['wall_s'], '9.1f')}"
            f"{cell(values['epochs'], '8.1f')}{cell(values['val_top1'], '11.4f')}"
            f"{cell(values['val_top1_1view'], '9.4f')}{cell(values['test_top1'], '12.4f')}"
            f"{cell(values['test_top1_1view'], '9.4f')}{cell(values['images_per_s'], '9.1f')}"
        )


def record(tracker: Tracker, parent: str, report: dict, path: Path) -> None:
    metrics = {
        f"{column}_{stat}": value
        for column, stats in report["summary"].items()
        for stat, value in stats.items()
    }
    metrics["seeds_reached"] = float(report["seeds_reached"])
    tracker.log_metrics(parent, metrics, step=0)
    tracker.log_artifact(parent, path)
    tracker.flush()
    done = report["seeds_reached"] == len(report["seeds"]) and all(
        r["status"] == FINISHED for r in report["seeds"]
    )
    tracker.end_run(parent, FINISHED if done else FAILED)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = ToolParser("vitexp.speedrun", __doc__)
    parser.add_argument(
        "--experiment", default="vit_fashion_mnist_speedrun", help="the recipe (conf/experiment/)"
    )
    parser.add_argument("--target", type=float, default=0.92, help="test top-1 to reach, in (0, 1]")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1, one process each")
    parser.add_argument(
        "--mlflow-experiment",
        default=env_experiment() or "speedrun",
        help="where the parent and the seeds' runs go (default: $MLFLOW_EXPERIMENT_NAME, else speedrun)",
    )
    parser.add_argument("--out", type=Path, default=Path("speedrun"))
    parser.add_argument("overrides", nargs="*", help="config overrides for every seed (Hydra syntax)")
    args = parser.parse(argv)
    if not 0 < args.target <= 1:
        parser.fail(f"--target {args.target}: give a fraction in (0, 1], e.g. 0.92 for 92%")
    if args.seeds < 1:
        parser.fail(f"--seeds {args.seeds}: give at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    machine = describe()
    tracker = Tracker(args.tracking_uri, args.mlflow_experiment)
    parent = tracker.start_run(f"speedrun-{args.experiment}", {tag.COMMAND: " ".join(sys.argv)})
    settings = {"experiment": args.experiment, "target": args.target, "seeds": args.seeds}
    tracker.log_params(parent, flatten({**settings, "overrides": args.overrides, "machine": machine}))
    walls = {seed: run_seed(args, seed, tracker, parent) for seed in range(args.seeds)}
    runs = {int(r.params.get("trainer.seed", -1)): r for r in tracker.children(parent)}
    rows = [
        seed_row(tracker, runs[s], wall) if s in runs else missing_row(args, s, wall)
        for s, wall in walls.items()
    ]
    summary = summarise(rows)
    reached = sum(r["time_to_target_s"] is not None for r in rows)
    report = {
        **settings,
        "overrides": args.overrides,
        "machine": machine,
        "seeds": rows,
        "summary": summary,
        "seeds_reached": reached,
        "target_split": "test",
    }
    path = args.out / "speedrun.json"
    path.write_text(json.dumps(report, indent=1))
    print_table(rows, summary, machine, args)
    record(tracker, parent, report, path)
    mean_time = summary["time_to_target_s"]["mean"] if reached == len(rows) else float("nan")
    accuracy = summary.get("test_top1", {}).get("mean", float("nan"))
    print(f"time_to_target_s={mean_time:.1f} accuracy={accuracy:.4f} seeds={len(rows)}", flush=True)
    missed = [r for r in rows if r["time_to_target_s"] is None or r["status"] != FINISHED]
    if missed:  # the parent run is FAILED too (`record`)
        fail(missed_message(missed, len(rows), args, parent), "vitexp.speedrun", code=1)


def missed_message(missed: list[dict], seeds: int, args, parent: str) -> str:
    """Which seeds missed the target, how, and where to look."""
    each = [
        f"seed {r['seed']} ({r['status']}, test top-1 {_score(r['test_top1'])}, "
        f"log {seed_log(args, r['seed'])})"
        for r in missed
    ]
    return (
        f"{len(missed)} of {seeds} seeds missed the target test top-1 {args.target}: "
        f"{'; '.join(each)}; the parent run {parent} is FAILED"
    )


def _score(value) -> str:
    return "-" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    main()
