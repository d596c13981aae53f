"""Evaluate a trained run again: top-1/top-5, loss and per-class accuracy, logged to MLflow.

    python -m vitexp.evaluate <run id> [data=fashion_mnist] [data.test_limit=1000 ...]
        [--checkpoint best|last] [--in-place] [--tracking-uri URI | tracking.uri=URI]

Overrides change the run's own data config (a group option or dotted keys). Results go to
a new child run of the evaluated run (so the original stays untouched), or with
`--in-place` to the run itself as `eval_*` metrics.
"""

import json
import tempfile
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from vitexp.config import compose
from vitexp.data import DataError, load_data
from vitexp.data.folder import fit_images
from vitexp.data.schema import DataConfig
from vitexp.metrics import per_class_accuracy, score_views
from vitexp.schema import find_schemas
from vitexp.tools.args import ToolParser
from vitexp.tools.runs import RunError, load_run
from vitexp.tracking import Tracker, tag


def data_config(run_cfg, overrides: list[str]):
    """The run's data config with `data=<option>` and `data.key=value` overrides applied,
    typed by its schema, so a misspelt key or a value of the wrong type fails in one line."""
    from hydra.errors import HydraException
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    data = run_cfg.data
    group = [o for o in overrides if o.startswith("data=")]
    dotted = [o.removeprefix("data.") for o in overrides if o.startswith("data.")]
    try:
        if group:
            data = compose(group).data
        elif dotted:
            data = _typed(data)
        return OmegaConf.merge(data, OmegaConf.from_dotlist(dotted)) if dotted else data
    except (ValidationError, ConfigKeyError) as err:
        key = f"data.{err.full_key}"
        given = next((o for o in overrides if o.startswith(f"{key}=")), key)
        if isinstance(err, ConfigKeyError):
            raise DataError(f"{given}: no such key; the data config has {', '.join(data.keys())}") from None
        now = OmegaConf.select(data, str(err.full_key))
        raise DataError(f"{given}: not of the key's type; give a value like the run's {now}") from None
    except (HydraException, OmegaConfBaseException) as err:
        raise DataError(f"{' '.join(overrides)}: {str(err).splitlines()[0]}") from None


def _typed(data):
    """A run's data config under its schema (the keys' types), or as it is when it does not
    fit it (a run recorded by another vitexp version)."""
    from omegaconf.errors import OmegaConfBaseException

    loaders = {s._target_: s for s in find_schemas("vitexp.data", DataConfig).values()}
    schema = loaders.get(data._target_, DataConfig)  # a loader's own schema, else every dataset's
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), data)
    except OmegaConfBaseException:
        return data


def fit_to_model(run, data, name: str, images: np.ndarray) -> np.ndarray:
    """The test images in the shape the run's model takes, converted as `predict` converts
    files; raises DataError when the data (config `name`) has more classes than the model."""
    model_classes = int(run.cfg.data.num_classes)
    if len(data.class_names) > model_classes:
        raise DataError(
            f"data {name} has {len(data.class_names)} classes but run {run.run_id} predicts "
            f"{model_classes} ({_names(run.class_names)}): evaluate it on images of those classes "
            f"(all or some of them); the data's classes: {_names(data.class_names)}"
        )
    if list(images.shape[1:]) != run.image_shape:
        print(f"vitexp: test images {list(images.shape[1:])} converted to the model's {run.image_shape}")
        images = fit_images(images, run.image_shape)
    return images


def _names(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def model_labels(run_classes: list[str], data) -> np.ndarray:
    """The test labels as indices of the model's classes, matched by name (data of a subset of
    the classes, or in another order); raises DataError for classes the model does not know."""
    names = list(data.class_names)
    if names == list(run_classes) or list(run_classes) == [str(i) for i in range(len(run_classes))]:
        return data.test_y  # the same classes, or a run that recorded no names: trust the order
    unknown = [n for n in names if n not in run_classes]
    if unknown:
        raise DataError(
            f"{data.source}: classes {unknown[:5]} are not among the model's {list(run_classes)[:8]}: "
            "evaluate on images of the classes it was trained on"
        )
    return np.array([run_classes.index(n) for n in names], dtype=np.int32)[data.test_y]


def evaluate(run, data_cfg, batch_size: int = 256) -> dict:
    from vitexp.data.pipeline import predict_views  # TensorFlow: after the arguments are checked

    data = load_data(data_cfg, classes_from_data=True)  # matched to the run's classes by name
    images = fit_to_model(run, data, data_cfg.name, data.test_x)
    labels = model_labels(run.class_names, data)
    num_classes = max(int(run.cfg.data.num_classes), len(data.class_names))
    tta = OmegaConf.select(run.cfg, "trainer.tta", default="none")  # as the run scored its test split
    views = predict_views(run.model, images, labels, num_classes, batch_size, tta)
    scores, probs = score_views(views, labels)
    per_class = per_class_accuracy(labels, probs.argmax(-1), probs.shape[-1])
    return {
        "scores": scores,
        "per_class": per_class,
        # the model's classes, as the run recorded them, name its logits
        "class_names": run.class_names if len(run.class_names) == len(per_class) else data.class_names,
        "count": len(labels),
    }


def main(argv: list[str] | None = None) -> None:
    parser = ToolParser("vitexp.evaluate", __doc__)
    parser.add_argument("run_id")
    parser.add_argument("overrides", nargs="*", help="data=<option>, data.key=value or tracking.uri=URI")
    parser.add_argument(
        "--checkpoint", choices=("best", "last"), default=None, help="default: the run's test checkpoint"
    )
    parser.add_argument("--in-place", action="store_true", help="log to the run itself")
    args = parser.parse(argv)
    other = [o for o in args.overrides if not o.startswith(("data=", "data."))]
    if other:
        parser.fail(f"{other[0]}: evaluate takes data=<option>, data.key=value and tracking.uri=URI")
    parser.require_store(args.tracking_uri)

    with parser.failing_on(RunError, DataError):
        run = load_run(args.run_id, args.tracking_uri, args.checkpoint)
        cfg = data_config(run.cfg, args.overrides)
        result = evaluate(run, cfg)
    print_result(f"run {args.run_id} ({run.checkpoint.stem} checkpoint) on {cfg.name} test", result)
    target = log_result(run, result, cfg.name, args)
    print(f"  logged to run {target}")


def print_result(heading: str, result: dict) -> None:
    scores = result["scores"]
    print(f"{heading}, {result['count']} images")
    views = (
        f" (test-time views averaged; one view {scores['top1_1view']:.4f})" if "top1_1view" in scores else ""
    )
    print(f"  top-1 {scores['top1']:.4f}  top-5 {scores['top5']:.4f}  loss {scores['loss']:.4f}{views}")
    print("  per-class accuracy:")
    for name, acc in zip(result["class_names"], result["per_class"]):
        print(f"    {name:<24} {acc:.4f}")


def log_result(run, result: dict, data_name: str, args) -> str:
    """The scores as `test_*` metrics of a new child run (`eval_*` of the run itself with
    `--in-place`) and the per-class table as an artifact; returns the run logged to."""
    tracker = Tracker(args.tracking_uri, run.experiment)
    if args.in_place:
        target, prefix = args.run_id, "eval_"
    else:
        name = f"eval-{run.run.name}"
        target, prefix = tracker.start_run(name, {tag.EVALUATES: args.run_id}, args.run_id), "test_"
        params = {"checkpoint": run.checkpoint.stem, "data": data_name, "overrides": " ".join(args.overrides)}
        tracker.log_params(target, params)
    tracker.log_metrics(target, {f"{prefix}{k}": v for k, v in result["scores"].items()}, step=0)
    named = zip(result["class_names"], result["per_class"])
    table = {n: (None if np.isnan(a) else float(a)) for n, a in named}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "per_class_accuracy.json"
        path.write_text(json.dumps(table, indent=1))
        tracker.log_artifact(target, path, "evaluation")
    tracker.flush()
    if not args.in_place:
        tracker.end_run(target)
    return target


if __name__ == "__main__":
    main()
