"""Pictures of a run: curves, samples, patches, position embeddings, confusions, errors, attention.

Every picture vitexp draws of a model lives here. Each `plot_*` function draws one PNG and
returns its path (a `*_figure` function returns the figure); `write_report` picks what
applies to the model (attention pictures need a ViT, position similarity a learned one).
"""

import functools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from vitexp.metrics import confused_pairs, confusion_counts  # noqa: E402
from vitexp.models.vit import attention_maps, has_attention, has_cls_token, learned_positions

PANELS = (("loss", "Loss", False), ("top1", "Top-1 accuracy", True), ("top5", "Top-5 accuracy", True))
# Fonts with the scripts matplotlib's own DejaVu Sans lacks (CJK above all): where one is
# installed, matplotlib falls back to it for those characters (every `Noto Sans*` counts too).
FALLBACK_FONTS = (
    "Noto Sans CJK JP",
    "Noto Sans CJK SC",
    "Noto Sans CJK TC",
    "Noto Sans CJK KR",
    "Source Han Sans",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Droid Sans Fallback",
    "Arial Unicode MS",
)


def use_fallback_fonts() -> None:
    """Makes matplotlib fall back to the installed FALLBACK_FONTS for what its own font lacks."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    noto = sorted(n for n in installed if n.startswith("Noto Sans") and n not in FALLBACK_FONTS)
    extra = [n for n in FALLBACK_FONTS if n in installed] + noto
    plt.rcParams["font.family"] = ["sans-serif", *extra]


@functools.cache
def _drawable_characters(families: tuple[str, ...]) -> frozenset[int]:
    """The characters the fonts of `families` have glyphs for."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    chars: set[int] = set()
    for family in families:
        path = font_manager.findfont(font_manager.FontProperties(family=[family]), fallback_to_default=False)
        chars.update(FT2Font(path).get_charmap())
    return frozenset(chars)


def drawable(text: str) -> str:
    """`text` as the pictures can draw it: a character no installed font has (a class name
    in Katakana without a CJK font, say) is written as its escape, `\\u30cd`, not as an
    empty box."""
    chars = _drawable_characters(tuple(plt.rcParams["font.family"]))
    return "".join(c if ord(c) in chars or not c.isprintable() else f"\\u{ord(c):04x}" for c in text)


use_fallback_fonts()


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def show_image(ax, image: np.ndarray) -> None:
    """A uint8 image on one fixed 0-255 scale, so a crop keeps the grey values of the whole."""
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image)
    ax.axis("off")


def plot_curves(history: dict[str, list[float]], path: Path, title: str = "") -> Path:
    """The three-panel curves figure of the textbook: loss, top-1, top-5, train vs validation."""
    return _save(curves_figure(history, title), path)


def curves_figure(history: dict[str, list[float]], title: str = ""):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, label, is_accuracy) in zip(axes, PANELS):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = history.get(f"{split}_{key}", [])
            name = "Training" if split == "train" else "Validation"
            ax.plot(range(1, len(values) + 1), values, style, markersize=3, label=name)
        ax.set_title(f"Training and validation {label.lower()}")
        ax.set_xlabel("Epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        if is_accuracy:
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_samples(images: np.ndarray, labels: np.ndarray, class_names: list[str], path: Path) -> Path:
    """A row of training images titled with their class names."""
    fig, axes = plt.subplots(1, len(images), figsize=(2.2 * len(images), 2.6), squeeze=False)
    for ax, image, label in zip(axes[0], images, labels):
        show_image(ax, image)
        ax.set_title(drawable(class_names[int(label)]), fontsize=9)
    fig.suptitle("Training samples")
    return _save(fig, path)


def plot_patches(image: np.ndarray, image_size: int, patch_size: int, path: Path) -> Path:
    """The image resized as the model sees it, and cut into its patches (with gaps)."""
    import tensorflow as tf

    resized = tf.image.resize(image[None].astype("float32"), (image_size, image_size))[0].numpy()
    resized = np.clip(resized, 0, 255).astype(np.uint8)
    n = image_size // patch_size
    fig = plt.figure(figsize=(9, 4.5))
    ax = fig.add_subplot(1, 2, 1)
    show_image(ax, resized)
    ax.set_title(f"{image_size}x{image_size} input")
    grid = fig.add_gridspec(n, n, left=0.52, right=0.98, wspace=0.08, hspace=0.08)
    for r in range(n):
        for c in range(n):
            sub = fig.add_subplot(grid[r, c])
            show_image(
                sub, resized[r * patch_size : (r + 1) * patch_size, c * patch_size : (c + 1) * patch_size]
            )
    fig.suptitle(f"{n * n} patches of {patch_size}x{patch_size}")
    return _save(fig, path)


def position_similarity(embedding: np.ndarray) -> np.ndarray:
    """Cosine similarity of every position embedding with every other: (N, N)."""
    unit = embedding / np.linalg.norm(embedding, axis=-1, keepdims=True).clip(1e-12)
    return unit @ unit.T


def plot_position_similarity(embedding: np.ndarray, path: Path) -> Path:
    """For each patch position, its similarity map to all positions, tiled on the patch grid."""
    n = int(round(np.sqrt(len(embedding))))
    sims = position_similarity(embedding[-n * n :])  # drop a [CLS] position if there is one
    mosaic = np.full((n * (n + 1), n * (n + 1)), np.nan)
    for i in range(n * n):
        r, c = divmod(i, n)
        mosaic[r * (n + 1) : r * (n + 1) + n, c * (n + 1) : c * (n + 1) + n] = sims[i].reshape(n, n)
    fig, ax = plt.subplots(figsize=(8, 7))
    shown = ax.imshow(mosaic, cmap="viridis", vmin=-1, vmax=1)
    ax.set_title("Position embedding similarity (each tile: one position against all)")
    ax.set_xlabel("Input patch column")
    ax.set_ylabel("Input patch row")
    ax.set_xticks([(n + 1) * c + n / 2 for c in range(n)], range(1, n + 1))
    ax.set_yticks([(n + 1) * r + n / 2 for r in range(n)], range(1, n + 1))
    fig.colorbar(shown, ax=ax, label="cosine similarity")
    return _save(fig, path)


def plot_confusion(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str], path: Path) -> Path:
    """A confusion matrix (up to 20 classes), else the most-confused class pairs."""
    class_names = [drawable(name) for name in class_names]
    k = len(class_names)
    if k <= 20:
        counts = confusion_counts(y_true, y_pred, k)
        fig, ax = plt.subplots(figsize=(1 + 0.6 * k, 1 + 0.6 * k))
        ax.imshow(counts, cmap="Blues")
        for t in range(k):
            for p in range(k):
                ax.text(
                    p,
                    t,
                    counts[t, p],
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if counts[t, p] > counts.max() / 2 else "black",
                )
        ax.set_xticks(range(k), class_names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), class_names, fontsize=8)
        ax.set_xlabel("Predicted")
        ax.set_ylabel("True")
        ax.set_title("Confusion matrix (test)")
        return _save(fig, path)
    pairs = confused_pairs(y_true, y_pred, k)
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(pairs) + 1.5))
    labels = [f"{class_names[t]} -> {class_names[p]}" for t, p, _ in pairs]
    ax.barh(range(len(pairs)), [c for _, _, c in pairs], color="tab:red")
    ax.set_yticks(range(len(pairs)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("Test images")
    ax.set_title(f"Most-confused class pairs (true -> predicted), {k} classes")
    return _save(fig, path)


def plot_confident_errors(images, y_true, probs, class_names, path: Path, count: int = 12) -> Path:
    """The test images the model got wrong with the most confidence."""
    class_names = [drawable(name) for name in class_names]
    y_pred = probs.argmax(-1)
    wrong = np.flatnonzero(y_pred != y_true)
    worst = wrong[np.argsort(probs[wrong, y_pred[wrong]])[::-1][:count]]
    cols = 6
    rows = max(1, -(-len(worst) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, worst):
        show_image(ax, images[i])
        ax.set_title(
            f"pred {class_names[y_pred[i]]} ({probs[i, y_pred[i]]:.2f})\ntrue {class_names[y_true[i]]}",
            fontsize=8,
            color="tab:red",
        )
    fig.suptitle("Most confident mistakes (test)")
    return _save(fig, path)


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
    maps = attention_maps(model, images)
    has_cls = has_cls_token(model)
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
        axes[i, 0].set_title(drawable(titles[i]) if titles else f"image {i}", fontsize=8)
        heat = _overlay(axes[i, 1], image, rollout[i], "rollout, all layers", top)
        for h in range(heads):
            _overlay(axes[i, 2 + h], image, last[i, h], f"last layer, head {h + 1}", top)
    fig.colorbar(heat, ax=axes, shrink=0.8, label="share of attention")
    fig.suptitle("Attention: what each output draws on")
    return fig


def write_report(
    model, cfg, train_x, train_y, test_x, test_y, probs, class_names, folder: Path
) -> list[Path]:
    """Every picture that applies to this model, into `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    n = cfg.report.num_images
    paths = [
        plot_samples(train_x[:n], train_y[:n], class_names, folder / "samples.png"),
        plot_patches(test_x[0], cfg.model.image_size, cfg.model.patch_size, folder / "patches.png"),
        plot_confusion(test_y, probs.argmax(-1), class_names, folder / "confusion.png"),
        plot_confident_errors(test_x, test_y, probs, class_names, folder / "errors.png"),
    ]
    embedding = learned_positions(model)
    if embedding is not None:
        paths.append(plot_position_similarity(embedding, folder / "position_similarity.png"))
    if has_attention(model):
        paths.append(
            plot_attention(
                model, test_x[:4], folder / "attention.png", [class_names[int(y)] for y in test_y[:4]]
            )
        )
    return paths
