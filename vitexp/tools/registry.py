"""Hand a trained model on: register the best run as an MLflow pyfunc model, ready to serve.

    python -m vitexp.registry [run id | experiment name] [--name MODEL] [--metric test_top1]
        [--allow-unfinished] [--tracking-uri URI]

Given an experiment (or a sweep's parent run), the FINISHED child/run with the highest
metric is registered: the MLflow Model the run logged (`tracking.log_model=true`), or, for
a run without one, its test checkpoint logged as one now. The run itself is left as it is
(its status too); a run that did not finish is refused unless `--allow-unfinished`.

The model takes uint8 images `(n, height, width, channels)` of the trained shape and
returns, per image, the class index, its name and its probability, computed as the run
scored its test split (with `trainer.tta=flip`, from the image and its mirror). Serve it
with `make serve MODEL=models:/<name>/<version>` (mlflow models serve, local environment).
"""

from vitexp.tools.args import ToolParser, default_experiment
from vitexp.tools.runs import RunError, load_run
from vitexp.tracking import FINISHED, Tracker, model_name_problem, tag


def best_run(tracker, target: str, metric: str):
    """`target` is a run id (a sweep parent picks its best child) or an experiment name."""
    run, runs = tracker.runs_under(target, best_first=metric)
    if run is not None and run.tags.get(tag.SWEEP) != "true":
        return run
    finished = [r for r in runs if r.status == "FINISHED" and metric in r.metrics]
    if not finished:
        raise ValueError(f"no FINISHED run with metric {metric} under {target!r}")
    return finished[0]


def register(run_id: str, name: str, tracking_uri: str | None = None, allow_unfinished: bool = False):
    """Registers the run's MLflow Model under `name`, logging one first (from the run's test
    checkpoint) where the run has none that answers as the run was scored; the run's status
    is never changed. Returns the model's URI and whether it was logged now.

    Raises:
        RunError: the name is one MLflow refuses, or the run did not finish and
            `allow_unfinished` is False.
    """
    if problem := model_name_problem(name):
        raise RunError(f"--name {name!r}: {problem}")
    tracker = Tracker(tracking_uri)
    run = tracker.get_run(run_id)
    if run is None:
        raise RunError(f"no run {run_id!r} in {tracker.uri}: check the id (`make ui` lists runs)")
    status = run.status
    if status != FINISHED and not allow_unfinished:
        raise RunError(
            f"run {run_id} is {status}: it did not finish, so its model is not the one it would "
            "have trained; continue it (resume=true) or pass --allow-unfinished to register it as it is"
        )
    tta = run.params.get("trainer.tta", "none")
    model = tracker.run_model(run_id)
    logged_now = model is None or model.tags.get(tag.TTA, "none") != tta
    if logged_now:
        loaded = load_run(run_id, tracking_uri)
        model_id = tracker.log_model(run_id, loaded.checkpoint, loaded.class_names, loaded.model, tta)
    else:
        model_id = model.id
    return f"models:/{name}/{tracker.register_model(model_id, name)}", logged_now


def main(argv: list[str] | None = None) -> None:
    parser = ToolParser("vitexp.registry", __doc__)
    parser.add_argument(
        "target",
        nargs="?",
        default=default_experiment(),
        help="a run id, a sweep's parent run id, or an experiment name "
        "(default: $MLFLOW_EXPERIMENT_NAME or vitexp)",
    )
    parser.add_argument("--name", default="vitexp-classifier", help="registered model name")
    parser.add_argument("--metric", default="test_top1", help="what 'best' means (higher is better)")
    parser.add_argument(
        "--allow-unfinished",
        action="store_true",
        help="register a run that did not finish (RUNNING, KILLED, FAILED) as it is",
    )
    args = parser.parse(argv)

    if problem := model_name_problem(args.name):
        parser.fail(f"--name {args.name!r}: {problem}")
    parser.require_store(args.tracking_uri)
    with parser.failing_on(RunError, ValueError):
        run = best_run(Tracker(args.tracking_uri), args.target, args.metric)
        uri, logged_now = register(run.id, args.name, args.tracking_uri, args.allow_unfinished)
    status = run.status
    unfinished = (
        f", {status}: registered unfinished, as --allow-unfinished asks" if status != FINISHED else ""
    )
    print(
        f"registered run {run.id} ({run.name}, {args.metric}="
        f"{run.metrics.get(args.metric, float('nan')):.4f}{unfinished}) as {uri}"
    )
    views = run.params.get("trainer.tta", "none")
    source = (
        "its test checkpoint, logged now as its MLflow Model" if logged_now else "the run's own MLflow Model"
    )
    print(f"  model: {source}; test-time views: trainer.tta={views}, as the run was scored")
    print(f"serve it: make serve MODEL={uri}")


if __name__ == "__main__":
    main()
