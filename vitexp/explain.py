"""What the model attends to: attention rollout and per-head maps, for a run or your images.

    python -m vitexp.explain <run id> [image files ...] [--out DIR] [--tracking-uri URI]

Without image files it explains the first test images of the run's own data. Writes one
PNG per image (rollout over all layers, and each head of the last layer) and prints paths.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vitexp.report import show_image  # noqa: E402
from vitexp.tool_args import ToolParser  # noqa: E402


def attention_rollout(maps: list[np.ndarray], has_cls: bool) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020): how much each patch feeds the output.

    Each layer's head-averaged attention is mixed with the identity (the residual path),
    rows renormalised, and the layers multiplied from the first to the last.

    Args:
        maps: per layer, `(batch, heads, tokens, tokens)` attention weights.
        has_cls: the first token is a [CLS] token; its row is the answer. Otherwise the
            rows of all tokens are averaged (the model pools or flattens every token).

    Returns:
        `(batch, patches)` non-negative weights summing to 1.
    """
    batch, _, tokens, _ = maps[0].shape
    rollout = np.broadcast_to(np.eye(tokens), (batch, tokens, tokens)).copy()
    for layer in maps:
        mixed = 0.5 * layer.mean(axis=1) + 0.5 * np.eye(tokens)
        mixed /= mixed.sum(axis=-1, keepdims=True)
        rollout = mixed @ rollout
    if has_cls:
        weights = rollout[:, 0, 1:]
    else:
        weights = rollout.mean(axis=1)
    return weights / weights.sum(axis=-1, keepdims=True)


def has_attention(model) -> bool:
    from vitexp.models.layers import TransformerBlock

    return any(isinstance(layer, TransformerBlock) for layer in model.layers)


def learned_positions(model) -> np.ndarray | None:
    """The learned position embeddings `(positions, dim)`, or None (sincos, Swin)."""
    try:
        layer = model.get_layer("pos_embedding")
    except ValueError:
        return None
    return np.asarray(layer.embedding) if layer.kind == "learned" else None


def _overlay(ax, image: np.ndarray, weights: np.ndarray, title: str, top: float):
    """The image under its patch weights, the heat map covering exactly the image's pixels."""
    n = int(round(np.sqrt(len(weights))))
    show_image(ax, image)
    height, width = image.shape[:2]
    heat = ax.imshow(
        weights.reshape(n, n),
        cmap="inferno",
        alpha=0.55,
        vmin=0,
        vmax=top,
        extent=(-0.5, width - 0.5, height - 0.5, -0.5),  # imshow's own pixel-centred extent
        interpolation="bilinear",
    )
    ax.set_title(title, fontsize=8)
    return heat


def plot_attention(model, images: np.ndarray, path: Path, titles: list[str] | None = None) -> Path:
    """Per image: the image, its attention rollout, and each last-layer head, in one row."""
    fig = attention_figure(model, images, titles)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def attention_figure(model, images: np.ndarray, titles: list[str] | None = None):
    from vitexp.models.vit import attention_maps

    maps = attention_maps(model, images)
    has_cls = _has_cls(model)
    rollout = attention_rollout(maps, has_cls)
    last = maps[-1][:, :, 0, 1:] if has_cls else maps[-1].mean(axis=2)
    heads = last.shape[1]
    fig, axes = plt.subplots(
        len(images), heads + 2, figsize=(2.2 * (heads + 2), 2.4 * len(images)), squeeze=False
    )
    last = last / last.sum(axis=-1, keepdims=True)
    top = max(rollout.max(), last.max())  # one colour scale for every map
    for i, image in enumerate(images):
        show_image(axes[i, 0], image)
        axes[i, 0].set_title(titles[i] if titles else f"image {i}", fontsize=8)
        heat = _overlay(axes[i, 1], image, rollout[i], "rollout, all layers", top)
        for h in range(heads):
            _overlay(axes[i, 2 + h], image, last[i, h], f"last layer, head {h + 1}", top)
    fig.colorbar(heat, ax=axes, shrink=0.8, label="share of attention")
    fig.suptitle("Attention: what each output draws on")
    return fig


def _has_cls(model) -> bool:
    try:
        model.get_layer("cls_token")
        return True
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> None:
    parser = ToolParser("vitexp.explain", __doc__)
    parser.add_argument("run_id")
    parser.add_argument("images", nargs="*", help="PNG/JPEG files (default: the run's first test images)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNG files")
    args = parser.parse(argv)

    from vitexp.runs import RunError, load_run, read_images

    try:
        run = load_run(args.run_id, args.tracking_uri)
        if not has_attention(run.model):
            raise RunError(f"run {args.run_id} is a {run.model.name} model: attention maps need a ViT")
        if args.images:
            images = read_images(args.images, run.image_shape)
            titles = [Path(p).name for p in args.images]
        else:
            images, labels = run.test_images(4)
            titles = [run.class_names[int(y)] for y in labels]
    except RunError as err:
        parser.fail(str(err))
    out = args.out or Path(f"explain-{args.run_id[:8]}")
    out.mkdir(parents=True, exist_ok=True)
    for i, (image, title) in enumerate(zip(images, titles)):
        path = plot_attention(run.model, image[None], out / f"attention_{i:02d}.png", [title])
        print(path)


if __name__ == "__main__":
    main()
