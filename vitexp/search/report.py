"""What a search shows on its MLflow parent run: counts, epochs spent, the best trial, pictures.

After every batch of trials the parent gets the counts (complete / pruned / failed), the
epochs spent against those of unpruned trials and of a full grid, and the best value
(tags `best.<param>`; for several objectives the tag `pareto.trials`, the numbers of the
trials on their Pareto front); at the end also, under `search/`, the trials table (CSV and
Markdown) and PNGs: optimisation history, parameter importances, slices, a contour over
patch size x depth (or the first two searched keys) and, for several objectives, the
Pareto front.
"""

import logging
import os
import sys
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from vitexp.search.study import PRUNED_ATTR, Plan, grid_size, grid_space  # noqa: E402
from vitexp.tracking import FAILED, PARENT_ENV, Tracker, tag  # noqa: E402

EPOCHS = "trainer.epochs"  # a searched key that sets how long each trial trains


def summary(study, plan: Plan) -> dict[str, float]:
    """Counts and epochs of the study's trials so far."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    count = {
        s: sum(t.state == s for t in trials)
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    ended = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    out = {
        "trials_complete": count[TrialState.COMPLETE],
        "trials_pruned": count[TrialState.PRUNED],
        "trials_failed": count[TrialState.FAIL],
        "epochs_spent": sum(epochs_of(t) for t in trials),
        "epochs_unpruned": sum(int(t.params.get(EPOCHS, plan.epochs)) for t in ended),
    }
    grid = grid_size(plan.space)
    if grid:  # with the epochs searched, each point trains its own
        lengths = grid_space(plan.space).get(EPOCHS, [plan.epochs])
        out["epochs_grid"] = int(grid // len(lengths) * sum(lengths))
    if len(plan.directions) == 1 and count[TrialState.COMPLETE]:
        out["best_value"] = study.best_value
    return out


def epochs_of(trial) -> int:
    return int(trial.user_attrs.get("epochs", len(trial.intermediate_values)))


def contour_keys(plan: Plan) -> list[str]:
    keys = [k for k in ("patch_size", "depth") if k in plan.space]
    return keys if len(keys) == 2 else list(plan.space)[:2]


class SearchLog:
    """The search's record on the sweep's MLflow parent run (when there is one) and in `out_dir`.

    Args:
        config: the sweep's config (for the tracking store).
        plan: the search.
        out_dir: where the table and pictures are written.
    """

    def __init__(self, config: DictConfig, plan: Plan, out_dir: Path):
        self.plan, self.out_dir = plan, out_dir
        self.parent = os.environ.get(PARENT_ENV)
        self.tracker = Tracker.from_config(config.tracking) if self.parent else None

    def retried(self, number: int, run_id: str | None, study: str) -> None:
        """The MLflow child of a trial a killed search left running: FAILED, tagged as retried.
        Without `run_id` (killed before the trial recorded it), the child is found by the
        trial tags it was created with."""
        if not self.tracker:
            return
        trial = {tag.OPTUNA_STUDY: study, tag.OPTUNA_TRIAL: str(number)}
        children = [] if run_id else self.tracker.children(self.parent)
        found = [r.id for r in children if r.status == "RUNNING" and trial.items() <= r.tags.items()]
        for child in [run_id] if run_id else found:
            self.tracker.set_tags(child, {tag.RETRIED: "true"})
            self.tracker.end_run(child, FAILED)

    def progress(self, study) -> None:
        if not self.tracker:
            return
        counts = summary(study, self.plan)
        self.tracker.log_metrics(self.parent, counts, step=len(study.trials))
        if "best_value" in counts:
            best = study.best_trial
            tags = {f"best.{k}": str(v) for k, v in best.params.items()}
            self.tracker.set_tags(self.parent, {**tags, "best.trial": str(best.number)})
        elif len(self.plan.directions) > 1 and counts["trials_complete"]:
            self.tracker.set_tags(self.parent, {"pareto.trials": ", ".join(map(str, pareto_front(study)))})
        self.tracker.set_tags(
            self.parent,
            {tag.OPTUNA_STUDY: self.plan.study_name, tag.OPTUNA_STORAGE: self.plan.storage_url},
        )
        self.tracker.flush(raise_errors=False)

    def finish(self, study) -> list[Path]:
        self.progress(study)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        paths = [*write_table(study, self.out_dir), *write_pictures(study, self.plan, self.out_dir)]
        if self.tracker:
            for path in paths:
                self.tracker.log_artifact(self.parent, path, "search")
        return paths


def pareto_front(study) -> list[int]:
    """The numbers of the trials no other complete trial beats on every objective."""
    return sorted(t.number for t in study.best_trials)


def write_table(study, out_dir: Path) -> list[Path]:
    frame = study.trials_dataframe(
        attrs=(
            "number",
            "value" if len(study.directions) == 1 else "values",
            "params",
            "state",
            "user_attrs",
            "duration",
        )
    )
    keep = [
        c
        for c in frame.columns
        if not c.startswith("user_attrs_")
        or c.endswith(("_epochs", "_num_params", PRUNED_ATTR, "_vitexp.mlflow_run_id"))
    ]
    frame = frame[keep].rename(columns=lambda c: c.removeprefix("user_attrs_").removeprefix("vitexp."))
    if len(study.directions) > 1:  # which trials the Pareto front picture draws as the front
        front = set(pareto_front(study))
        frame.insert(len(study.directions) + 1, "pareto", [n in front for n in frame["number"]])
    frame.to_csv(out_dir / "trials.csv", index=False)
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += [
        "| " + " | ".join("" if str(v) == "nan" else str(v) for v in row) + " |" for row in frame.values
    ]
    (out_dir / "trials.md").write_text("\n".join(lines) + "\n")
    return [out_dir / "trials.csv", out_dir / "trials.md"]


def write_pictures(study, plan: Plan, out_dir: Path) -> list[Path]:
    """The PNGs Optuna can draw for this study; one that cannot be drawn yet is skipped."""
    from optuna.visualization import matplotlib as ov

    first = None if len(plan.directions) == 1 else (lambda t: t.values[0])
    name = plan.objectives[0]
    drawings = {
        "optimization_history": lambda: ov.plot_optimization_history(study, target=first, target_name=name),
        "param_importances": lambda: ov.plot_param_importances(study, target=first, target_name=name),
        "slice": lambda: ov.plot_slice(study, target=first, target_name=name),
        "contour": lambda: ov.plot_contour(study, params=contour_keys(plan), target=first, target_name=name),
    }
    if len(plan.directions) > 1:
        drawings["pareto_front"] = lambda: ov.plot_pareto_front(study, target_names=plan.objectives)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # not a line per categorical axis
    paths = []
    for stem, draw in drawings.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = draw()
                figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
                figure.set_size_inches(max(6.4, figure.get_figwidth()), max(4.8, figure.get_figheight()))
                figure.tight_layout()
        except Exception as err:  # e.g. importances need two finished trials, a contour two keys
            print(
                f"vitexp: no {stem} picture yet: {str(err).splitlines()[0] if str(err) else err!r}",
                file=sys.stderr,
            )
            continue
        figure.savefig(out_dir / f"{stem}.png", dpi=100)
        plt.close(figure)
        paths.append(out_dir / f"{stem}.png")
    return paths
