"""Classify your images with a trained run: top-k class names and probabilities.

python -m vitexp.predict <run id> <image files or folders ...> [--top 5] [--json] [--tracking-uri URI]

A folder stands for the image files directly in it, in file-name order. A run scored with
test-time views (`trainer.tta=flip` or `flip_shift`) answers as it was scored: from the mean
of the logits of each image's views (its mirror; and with `flip_shift` both moved by one
pixel up, down, left and right).
"""

import json
from pathlib import Path

from vitexp.metrics import top_k
from vitexp.tools.args import ToolParser
from vitexp.tools.runs import RunError, image_files, load_run, read_images


def main(argv: list[str] | None = None) -> None:
    parser = ToolParser("vitexp.predict", __doc__)
    parser.add_argument("run_id")
    parser.add_argument("images", nargs="+", help="image files, or folders of them")
    parser.add_argument("--top", type=int, default=5, help="how many classes to show per image")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--checkpoint", choices=("best", "last"), default=None, help="default: the run's test checkpoint"
    )
    args = parser.parse(argv)
    if args.top < 1:
        parser.fail(f"argument --top: {args.top}: show at least 1 class per image, e.g. --top 5")
    parser.require_store(args.tracking_uri)

    from omegaconf import OmegaConf

    from vitexp.data.pipeline import predict_probs  # TensorFlow: after the arguments are checked

    with parser.failing_on(RunError):
        run = load_run(args.run_id, args.tracking_uri, args.checkpoint)
        paths = image_files(args.images)
        images = read_images(paths, run.image_shape)
    tta = str(OmegaConf.select(run.cfg, "trainer.tta", default="none"))  # as the run was scored
    probs = predict_probs(run.model, images, tta)
    results = top_k(probs, run.class_names, min(args.top, probs.shape[-1]))
    if args.json:
        print(json.dumps([{"image": p, "top": r} for p, r in zip(paths, results)], indent=1))
        return
    if tta != "none":
        views = "its mirror" if tta == "flip" else "its mirror, both moved one pixel 4 ways"
        print(f"(trainer.tta={tta}: each image and {views} averaged, as the run was scored)")
    for path, ranked in zip(paths, results):
        print(Path(path).name)
        for rank, item in enumerate(ranked, 1):
            print(f"  {rank}. {item['label']:<24} {item['probability']:.4f}")


if __name__ == "__main__":
    main()
