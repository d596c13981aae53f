"""Hand a trained model on: register the best run as an MLflow pyfunc model, ready to serve.

    python -m vitexp.registry [run id | experiment name] [--name MODEL] [--metric test_top1]
        [--tracking-uri URI]

Given an experiment (or a sweep's parent run), the child/run with the highest metric is
registered. The model takes uint8 images `(n, height, width, channels)` of the trained
shape and returns, per image, the class index, its name and its probability. Serve it with
`make serve MODEL=models:/<name>/<version>` (mlflow models serve, local environment).
"""

from vitexp.tools.args import ToolParser, default_experiment


def best_run(tracker, target: str, metric: str):
    """`target` is a run id (a sweep parent picks its best child) or an experiment name."""
    run, runs = tracker.runs_under(target, best_first=metric)
    if run is not None and run.data.tags.get("vitexp.sweep") != "true":
        return run
    finished = [r for r in runs if r.info.status == "FINISHED" and metric in r.data.metrics]
    if not finished:
        raise ValueError(f"no FINISHED run with metric {metric} under {target!r}")
    return finished[0]


def register(run_id: str, name: str, tracking_uri: str | None = None) -> str:
    """Logs the run's best checkpoint as a pyfunc model and registers it; returns its URI."""
    from vitexp.tools.runs import load_run
    from vitexp.tracking import Tracker

    loaded = load_run(run_id, tracking_uri)
    tracker = Tracker(tracking_uri, loaded.experiment)
    info = tracker.log_model(run_id, loaded.checkpoint, loaded.class_names, loaded.model, name)
    return f"models:/{name}/{info.registered_model_version}"


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
    args = parser.parse(argv)

    from vitexp.tools.runs import RunError
    from vitexp.tracking import Tracker

    with parser.failing_on(RunError, ValueError):
        run = best_run(Tracker(args.tracking_uri), args.target, args.metric)
        uri = register(run.info.run_id, args.name, args.tracking_uri)
    print(
        f"registered run {run.info.run_id} ({run.info.run_name}, {args.metric}="
        f"{run.data.metrics.get(args.metric, float('nan')):.4f}) as {uri}"
    )
    print(f"serve it: make serve MODEL={uri}")


if __name__ == "__main__":
    main()
