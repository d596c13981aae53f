"""Classify your images with a trained run: top-k class names and probabilities.

python -m vitexp.predict <run id> <image files ...> [--top 5] [--json] [--tracking-uri URI]
"""

import json
from pathlib import Path

import numpy as np

from vitexp.tools.args import ToolParser


def main(argv: list[str] | None = None) -> None:
    parser = ToolParser("vitexp.predict", __doc__)
    parser.add_argument("run_id")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--checkpoint", choices=("best", "last"), default=None, help="default: the run's test checkpoint"
    )
    args = parser.parse(argv)

    from vitexp.metrics import softmax, top_k
    from vitexp.tools.runs import RunError, load_run, read_images

    with parser.failing_on(RunError):
        run = load_run(args.run_id, args.tracking_uri, args.checkpoint)
        images = read_images(args.images, run.image_shape)
    probs = softmax(run.model.predict(images, verbose=0).astype(np.float64))
    results = top_k(probs, run.class_names, min(args.top, probs.shape[-1]))
    if args.json:
        print(json.dumps([{"image": p, "top": r} for p, r in zip(args.images, results)], indent=1))
        return
    for path, ranked in zip(args.images, results):
        print(Path(path).name)
        for rank, item in enumerate(ranked, 1):
            print(f"  {rank}. {item['label']:<24} {item['probability']:.4f}")


if __name__ == "__main__":
    main()
