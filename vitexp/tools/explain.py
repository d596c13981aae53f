"""What the model attends to: attention rollout and per-head maps, for a run or your images.

    python -m vitexp.explain <run id> [image files ...] [--out DIR] [--tracking-uri URI]

Without image files it explains the first test images of the run's own data. Writes one
PNG per image (rollout over all layers, and each head of the last layer) and prints paths.
"""

from pathlib import Path

from vitexp.tools.args import ToolParser
from vitexp.tools.runs import RunError, image_files, load_run, read_images


def main(argv: list[str] | None = None) -> None:
    parser = ToolParser("vitexp.explain", __doc__)
    parser.add_argument("run_id")
    parser.add_argument(
        "images", nargs="*", help="image files or folders (default: the run's first test images)"
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNG files")
    args = parser.parse(argv)
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        parser.fail(f"--out {args.out}: is a file; name a folder for the PNG files (created if missing)")
    parser.require_store(args.tracking_uri)

    from vitexp.models.vit import has_attention  # Keras: after the arguments are checked
    from vitexp.report.run import plot_attention  # Keras too

    with parser.failing_on(RunError):
        run = load_run(args.run_id, args.tracking_uri)
        if not has_attention(run.model):
            raise RunError(f"run {args.run_id} is a {run.model.name} model: attention maps need a ViT")
        if args.images:
            paths = image_files(args.images)
            images = read_images(paths, run.image_shape)
            titles = [Path(p).name for p in paths]
        else:
            images, labels = run.test_images(4)
            titles = [run.class_names[int(y)] for y in labels]
    out = args.out or Path(f"explain-{args.run_id[:8]}")
    out.mkdir(parents=True, exist_ok=True)
    for i, (image, title) in enumerate(zip(images, titles)):
        path = plot_attention(run.model, image[None], out / f"attention_{i:02d}.png", [title])
        print(path)


if __name__ == "__main__":
    main()
