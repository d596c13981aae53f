"""Compare runs side by side: a table sorted by a metric, as CSV and Markdown, and plots.

    python -m vitexp.compare [experiment name | run id ...] [--sort best_val_top1]
        [--out DIR] [--tracking-uri URI]

Runs are sorted by best validation top-1 unless `--sort` names another column: a choice
between runs is made on the held-out validation split, and test top-1 is there to report.
A run id gives that run and the runs under it (a sweep's jobs); an experiment name gives its
training runs; several targets are compared in one table. With none: the experiment
$MLFLOW_EXPERIMENT_NAME names, else every experiment of the store. It says what it read.

Columns: the swept parameters (those that differ between the runs), parameter count,
best validation top-1, test top-1/top-5, epochs, training time and images/s (and, for a
search that pruned trials, the epoch each pruned trial stopped at; for runs of several
experiments, the experiment). Pictures: `comparison.png`, validation and test top-1 against
each swept parameter (each point labelled with the other swept values) and against the
parameter count; `val_top1_curves.png`, every run's validation top-1 per epoch, labelled by
its swept values. For a sweep, the table and pictures are also logged to the parent run.
"""

from pathlib import Path

from vitexp.report.compare import cell, compare
from vitexp.tools.args import ToolParser
from vitexp.tracking.uri import env_experiment


def main(argv: list[str] | None = None) -> None:
    parser = ToolParser("vitexp.compare", __doc__)
    parser.add_argument(
        "targets",
        nargs="*",
        help="experiment names and run ids (a sweep's parent: its runs); "
        "default: $MLFLOW_EXPERIMENT_NAME, else every experiment",
    )
    parser.add_argument(
        "--sort",
        default="best_val_top1",
        help="column to sort by, best first (default best_val_top1: choose on validation, "
        "read test to report)",
    )
    parser.add_argument("--out", type=Path, default=Path("comparison"))
    args = parser.parse(argv)
    parser.require_store(args.tracking_uri)
    env = env_experiment()
    targets = args.targets or ([env] if env else [])
    try:
        header, rows, paths = compare(
            targets, args.tracking_uri, args.sort, args.out, say=lambda line: print(f"vitexp.compare: {line}")
        )
    except ValueError as err:
        parser.fail(str(err))
    cells = [[cell(v, c) for v, c in zip(row, header)] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
