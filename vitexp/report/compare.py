"""Runs side by side: a table (CSV, Markdown) of their swept params, sizes and scores, and
pictures of the scores against each swept param and of every run's validation curve. What
`vitexp.compare` prints and a sweep's parent run carries."""

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from vitexp.tracking import Tracker, tag  # noqa: E402

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


# columns of scores, shown with 4 decimals; other decimals (seconds, images/s) with 1
SCORES = (*METRICS, "val_top1")


def collect(tracker: Tracker, target: str) -> tuple[list, str | None, str]:
    """The training runs of a sweep (by parent id) or of an experiment (by name), the parent's
    id for a sweep, and what was read, in words."""
    parent, runs = tracker.runs_under(target)
    trained = [r for r in runs if tag.EVALUATES not in r.tags]
    if parent is not None:
        where = f"experiment {tracker.experiment_of(parent)}"
        if not trained and parent.tags.get(tag.SWEEP) != "true":  # one run, by its id
            return [parent], None, f"run {parent.name} ({target}) in {where}"
        return trained, target, f"sweep {parent.name} ({target}) in {where}, {len(trained)} runs"
    parents = {r.parent_id for r in trained}  # sweeps', speedruns' parents
    jobs = [r for r in trained if r.tags.get(tag.SWEEP) != "true" and r.id not in parents]
    return jobs, None, f"experiment {target}, {len(jobs)} runs"


def gather(tracker: Tracker, targets: list[str]) -> tuple[list, str | None, list[str]]:
    """The runs of every target, each once; the parent's id when the one target is a sweep; what
    was read. No target: every experiment of the store that holds training runs."""
    if targets:
        found = [collect(tracker, target) for target in targets]
    else:
        found = [collect(tracker, name) for name in tracker.experiment_names().values()]
        found = [f for f in found if f[0]]
    runs, seen = [], set()
    for run in (r for f in found for r in f[0]):
        if run.id not in seen:
            seen.add(run.id)
            runs.append(run)
    parent = found[0][1] if len(found) == 1 else None
    read = [f[2] for f in found]
    return runs, parent, read if targets else ["every experiment with training runs: " + "; ".join(read)]


def swept_params(runs) -> list[str]:
    """Parameters whose values differ between the runs (what the comparison is about)."""
    keys = sorted(
        {k for r in runs for k in r.params if not k.startswith(IGNORED_PARAMS) and k not in DERIVED_PARAMS}
    )
    return [k for k in keys if len({r.params.get(k) for r in runs}) > 1]


def short_names(keys: list[str]) -> dict[str, str]:
    """`model.patch_size` -> `patch_size`, where the last part names one key only."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: name if last.count(name) == 1 else k for k, name in zip(keys, last)}


def shown(value) -> str:
    """A logged value as a reader takes it in: a real number to 3 significant digits (a
    search's `0.0049481998917741635` is `0.00495`), whole numbers and text as logged."""
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        return text
    return text if text.lstrip("-").isdigit() else f"{number:.3g}"


def label(run, swept: list[str]) -> str:
    """A run by its swept values (`patch_size=4 lr=0.00495`), else by its name."""
    names = short_names(swept)
    values = [f"{names[k]}={shown(run.params.get(k, ''))}" for k in swept]
    return " ".join(values) or run.name


def table(tracker: Tracker, runs, sort: str) -> tuple[list[str], list[list]]:
    swept = swept_params(runs)
    experiments = tracker.experiment_names()
    several = len({r.experiment_id for r in runs}) > 1
    header = ["run", *(["experiment"] if several else []), "status", *swept, "num_params", *METRICS]
    header += ["epochs", "train_time_s", "images_per_s"]
    pruned = any(tag.PRUNED_EPOCH in r.tags for r in runs)  # trials an Optuna pruner stopped
    header += ["pruned_epoch"] if pruned else []
    rows = []
    for run in runs:
        m = run.metrics
        times = list(tracker.metric_history(run.id, "epoch_time_s").values())
        speeds = list(tracker.metric_history(run.id, "images_per_s").values())
        rows.append(
            [
                run.name,
                *([experiments.get(run.experiment_id, run.experiment_id)] if several else []),
                run.status,
                *[run.params.get(k, "") for k in swept],
                int(run.params.get("num_params", 0)),
                *[m.get(k) for k in METRICS],
                len(times),
                round(sum(times), 1),
                round(sum(speeds) / len(speeds), 1) if speeds else None,
                *([run.tags.get(tag.PRUNED_EPOCH, "")] if pruned else []),
            ]
        )
    if sort not in header:
        raise ValueError(f"--sort {sort}: no such column; use one of: {', '.join(header)}")
    column = header.index(sort)
    rows.sort(
        key=lambda r: (r[column] is None, -(r[column] or 0) if isinstance(r[column], int | float) else 0)
    )
    return header, rows


def cell(value, column: str = "") -> str:
    """A table cell: scores with 4 decimals, other measurements as measured (`13.9`)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if column in SCORES else f"{value:.1f}"
    return str(value)


def write_outputs(header, rows, swept: list[str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "comparison.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v, c) for v, c in zip(row, header)) + " |" for row in rows]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    plot_scores(header, rows, swept, out / "comparison.png")
    return [out / "comparison.csv", out / "comparison.md", out / "comparison.png"]


# more runs than this and a picture names only the best one by its values (the table has all)
NAMED_POINTS = 8
# more distinct numbers than this on a swept param (a search's intervals): a numeric axis
CATEGORIES = 6


def plot_scores(header, rows, swept: list[str], path: Path) -> None:
    """Validation and test top-1 against each swept parameter and the parameter count. With
    a few runs each point says the run's other swept values; with many (a search) the best
    run by validation is starred and its values are in the title."""
    names = short_names(swept)
    axes_keys = [*swept, "num_params"]
    val, test = header.index("best_val_top1"), header.index("test_top1")
    best = best_run(rows, val)
    fig, axes = plt.subplots(
        1, len(axes_keys), figsize=(5 * len(axes_keys), 4.2), squeeze=False, layout="constrained"
    )
    for ax, key in zip(axes[0], axes_keys):
        col = header.index(key)
        place, scale = axis_of(key, [r[col] for r in rows])
        for metric, marker, name in ((val, "o", "best val top-1"), (test, "s", "test top-1")):
            points = [r for r in rows if r[metric] is not None]
            ax.scatter(
                [place(r[col]) for r in points], [r[metric] for r in points], s=45, marker=marker, label=name
            )
        if len(rows) > NAMED_POINTS and best[val] is not None:
            ax.scatter([place(best[col])], [best[val]], s=180, marker="*", color="black", label="best by val")
        for r in rows if len(rows) <= NAMED_POINTS else []:
            others = " ".join(f"{names[k]}={shown(r[header.index(k)])}" for k in swept if k != key)
            if others and r[test] is not None:
                ax.annotate(others, (place(r[col]), r[test]), textcoords="offset points", xytext=(6, -10),
                            fontsize=8).set_in_layout(False)  # fmt: skip
        scale(ax)
        ax.set_xlabel(names.get(key, "parameters"))
        ax.set_ylabel("top-1")
        ax.set_title(f"top-1 by {names.get(key, 'parameter count')}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    title = f"Best validation and test top-1 of {len(rows)} runs"
    if len(rows) > NAMED_POINTS:
        title += "; best by validation: " + " ".join(
            f"{names[k]}={shown(best[header.index(k)])}" for k in swept
        )
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def best_run(rows, col: int):
    return max((r for r in rows if r[col] is not None), key=lambda r: r[col], default=rows[0])


def axis_of(key: str, values: list):
    """How a param's values sit on an x axis: `(place, scale)`, `place(value)` the x of a
    value, `scale(ax)` sets the axis. The parameter count and a search's real-valued params
    (numbers, more than CATEGORIES distinct) on a numeric axis, log where they span a decade
    or more; a grid's few values as categories, every one a tick."""
    distinct = sorted(set(values), key=_order)
    numbers = [float(v) for v in distinct if _order(v)[0] == 0]
    if key == "num_params" or (len(numbers) == len(distinct) > CATEGORIES):
        log = min(numbers) > 0 and max(numbers) >= 10 * min(numbers)

        def numeric(ax):
            if log:  # ticks at 1, 2, 5 of each decade, read as numbers (0.02, not 2x10^-2)
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: shown(v)))
                ax.xaxis.set_minor_formatter(NullFormatter())

        return float, numeric
    where = {v: i for i, v in enumerate(distinct)}

    def categorical(ax):
        ax.set_xticks(range(len(distinct)), [shown(v) for v in distinct])
        ax.set_xlim(-0.5, len(distinct) - 0.5)

    return where.__getitem__, categorical


def plot_curves(tracker: Tracker, runs, swept: list[str], path: Path) -> Path:
    """Every run's validation top-1 per epoch, one line each, labelled by its swept values."""
    many = len(runs) > NAMED_POINTS  # the legend beside the axes, not over the curves
    fig, ax = plt.subplots(figsize=(12 if many else 8, 5), layout="constrained")
    if many:  # 20 colours before one repeats
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    for run in sorted(runs, key=lambda r: [_order(r.params.get(k, "")) for k in swept]):
        history = tracker.metric_history(run.id, "val_top1")
        if history:
            ax.plot(list(history), list(history.values()), marker="o", label=label(run, swept))
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation top-1")
    ax.set_title(f"Validation top-1 per epoch, {len(runs)} runs")
    ax.grid(alpha=0.3)
    if ax.lines:
        where = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if many else {}
        ax.legend(fontsize=8, ncol=1 + len(ax.lines) // 20, **where)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _order(value):
    """Numbers in numeric order before any text, text in text order."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def compare(
    targets: str | list[str], tracking_uri: str | None, sort: str, out: Path, say=None
) -> tuple[list[str], list[list], list[Path]]:
    """Compares the runs of `targets` (run ids, experiment names; none: every experiment).

    Args:
        say: called with a line that says what was read, if given.

    Returns:
        The table's header and rows, and the files written into `out`.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    tracker = Tracker(tracking_uri)
    runs, parent, read = gather(tracker, targets)
    if not runs:
        tracker.require_runs()
        raise ValueError(f"no training runs under {', '.join(map(repr, targets)) or 'any experiment'}")
    if say:
        say("read " + "; ".join(read))
    header, rows = table(tracker, runs, sort)
    swept = swept_params(runs)
    paths = [
        *write_outputs(header, rows, swept, out),
        plot_curves(tracker, runs, swept, out / "val_top1_curves.png"),
    ]
    if parent is not None:
        for path in paths:
            tracker.log_artifact(parent, path, "comparison")
    return header, rows, paths
