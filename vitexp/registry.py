"""Hand a trained model on: register the best run as an MLflow pyfunc model, ready to serve.

    python -m vitexp.registry [run id | experiment name] [--name MODEL] [--metric test_top1]
        [--tracking-uri URI]

Given an experiment (or a sweep's parent run), the child/run with the highest metric is
registered. The model takes uint8 images `(n, height, width, channels)` of the trained
shape and returns, per image, the class index, its name and its probability. Serve it with
`make serve MODEL=models:/<name>/<version>` (mlflow models serve, local environment).
"""

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from vitexp.tool_args import ToolParser, default_experiment

PACKAGE_DIR = Path(__file__).resolve().parent


class VitexpClassifier(mlflow.pyfunc.PythonModel):
    """A vitexp checkpoint behind MLflow's pyfunc interface."""

    def load_context(self, context):
        names = json.loads(Path(context.artifacts["class_names"]).read_text(encoding="utf-8"))
        self.load(context.artifacts["checkpoint"], names)

    def load(self, checkpoint, class_names: list[str], model=None) -> None:
        """The checkpoint's model (or `model`, already loaded from it) and its class names."""
        from vitexp.models import load_model

        self.model = model if model is not None else load_model(str(checkpoint))
        self.class_names = list(class_names)

    # an array, as the signature says (uint8 images); MLflow validates no data by the hint
    def predict(self, context, model_input: np.ndarray, params=None):
        from vitexp.metrics import softmax

        images = np.asarray(model_input, dtype=np.uint8)
        probs = softmax(self.model.predict(images, verbose=0).astype(np.float64))
        best = probs.argmax(-1)
        return pd.DataFrame(
            {"class": best, "label": [self.class_names[i] for i in best], "probability": probs.max(-1)}
        )


def best_run(tracker, target: str, metric: str):
    """`target` is a run id (a sweep parent picks its best child) or an experiment name."""
    run, runs = tracker.runs_under(target, best_first=metric)
    if run is not None and run.data.tags.get("vitexp.sweep") != "true":
        return run
    finished = [r for r in runs if r.info.status == "FINISHED" and metric in r.data.metrics]
    if not finished:
        raise ValueError(f"no FINISHED run with metric {metric} under {target!r}")
    return finished[0]


def requirements(model) -> list[str]:
    """What the logged model needs to load and run: the versions this process has, tfswin
    only for a Swin model (its stale numpy<2 pin conflicts with numpy 2 in a fresh env)."""
    from importlib.metadata import version

    packages = ["tensorflow", "keras", "numpy", "mlflow", "omegaconf"]
    if any(type(layer).__module__.startswith("tfswin") for layer in model._flatten_layers()):
        packages.append("tfswin")
    return [f"{p}=={version(p)}" for p in packages]


def register(run_id: str, name: str, tracking_uri: str | None = None) -> str:
    """Logs the run's best checkpoint as a pyfunc model and registers it; returns its URI."""
    from vitexp.runs import load_run
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

    from vitexp.runs import RunError
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
