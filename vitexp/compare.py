"""Compare runs side by side: a table sorted by a metric, as CSV and Markdown, and plots.

    python -m vitexp.compare [experiment name | sweep parent run id] [--sort test_top1]
        [--out DIR] [--tracking-uri URI]

Columns: the swept parameters (those that differ between the runs), parameter count,
best validation top-1, test top-1/top-5, epochs, training time and images/s (and, for a
search that pruned trials, the epoch each pruned trial stopped at). The plot
shows test top-1 against each swept parameter and against the parameter count. For a
sweep, the table and plot are also logged to the parent run.
"""

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vitexp.tool_args import ToolParser, default_experiment  # noqa: E402
from vitexp.tracking import Tracker  # noqa: E402

METRICS = ("best_val_top1", "test_top1", "test_top5")
IGNORED_PARAMS = ("tracking.", "hydra", "run_name", "resume", "class_names")
# measured or derived, not chosen: shown in their own columns or through model.*
DERIVED_PARAMS = {
    "patch_size",
    "depth",
    "num_params",
    "trainable_params",
    "train_images",
    "val_images",
    "test_images",
    "replicas",
    "precision",
}


def collect(tracker: Tracker, target: str) -> tuple[list, str | None]:
    """The training runs of a sweep (by parent id) or of an experiment (by name)."""
    parent, runs = tracker.runs_under(target)
    trained = [r for r in runs if "vitexp.evaluates" not in r.data.tags]
    if parent is not None:
        return trained, target
    return [r for r in trained if r.data.tags.get("vitexp.sweep") != "true"], None


def swept_params(runs) -> list[str]:
    """Parameters whose values differ between the runs (what the comparison is about)."""
    keys = sorted(
        {
            k
            for r in runs
            for k in r.data.params
            if not k.startswith(IGNORED_PARAMS) and k not in DERIVED_PARAMS
        }
    )
    return [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]


def table(tracker: Tracker, runs, sort: str) -> tuple[list[str], list[list]]:
    swept = swept_params(runs)
    header = ["run", "status", *swept, "num_params", *METRICS, "epochs", "train_time_s", "images_per_s"]
    pruned = any("vitexp.pruned_epoch" in r.data.tags for r in runs)  # trials an Optuna pruner stopped
    header += ["pruned_epoch"] if pruned else []
    rows = []
    for run in runs:
        m = run.data.metrics
        times = list(tracker.metric_history(run.info.run_id, "epoch_time_s").values())
        speeds = list(tracker.metric_history(run.info.run_id, "images_per_s").values())
        rows.append(
            [
                run.info.run_name,
                run.info.status,
                *[run.data.params.get(k, "") for k in swept],
                int(run.data.params.get("num_params", 0)),
                *[m.get(k) for k in METRICS],
                len(times),
                round(sum(times), 1),
                round(sum(speeds) / len(speeds), 1) if speeds else None,
                *([run.data.tags.get("vitexp.pruned_epoch", "")] if pruned else []),
            ]
        )
    if sort not in header:
        raise ValueError(f"--sort {sort}: no such column; use one of: {', '.join(header)}")
    column = header.index(sort)
    rows.sort(
        key=lambda r: (r[column] is None, -(r[column] or 0) if isinstance(r[column], int | float) else 0)
    )
    return header, rows


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


def write_outputs(header, rows, swept: list[str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "comparison.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    axes_keys = [*swept, "num_params"]
    fig, axes = plt.subplots(1, len(axes_keys), figsize=(4.5 * len(axes_keys), 4), squeeze=False)
    acc = header.index("test_top1")
    for ax, key in zip(axes[0], axes_keys):
        col = header.index(key)
        points = [(r[col], r[acc]) for r in rows if r[acc] is not None]
        xs = [_number(x) for x, _ in points]
        ax.scatter(
            xs if all(isinstance(x, float) for x in xs) else [str(x) for x, _ in points],
            [y for _, y in points],
            s=40,
        )
        if key == "num_params":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("test top-1")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Test top-1 of {len(rows)} runs")
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=100)
    plt.close(fig)
    return [out / "comparison.csv", out / "comparison.md", out / "comparison.png"]


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def compare(
    target: str, tracking_uri: str | None, sort: str, out: Path
) -> tuple[list[str], list[list], list[Path]]:
    tracker = Tracker(tracking_uri)
    runs, parent = collect(tracker, target)
    if not runs:
        raise ValueError(f"no training runs under {target!r}")
    header, rows = table(tracker, runs, sort)
    paths = write_outputs(header, rows, swept_params(runs), out)
    if parent is not None:
        for path in paths:
            tracker.log_artifact(parent, path, "comparison")
    return header, rows, paths


def main(argv: list[str] | None = None) -> None:
    parser = ToolParser("vitexp.compare", __doc__)
    parser.add_argument(
        "target",
        nargs="?",
        default=default_experiment(),
        help="an experiment name or a sweep's parent run id (default: $MLFLOW_EXPERIMENT_NAME or vitexp)",
    )
    parser.add_argument("--sort", default="test_top1", help="column to sort by, best first")
    parser.add_argument("--out", type=Path, default=Path("comparison"))
    args = parser.parse(argv)
    parser.require_store(args.tracking_uri)
    try:
        header, rows, paths = compare(args.target, args.tracking_uri, args.sort, args.out)
    except ValueError as err:
        parser.fail(str(err))
    widths = [max(len(str(h)), *(len(_cell(r[i])) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(_cell(v).ljust(w) for v, w in zip(row, widths)))
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
