"""Pictures of a run: the training curves (loss, top-1, top-5; train against validation)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("loss", "Loss", False), ("top1", "Top-1 accuracy", True), ("top5", "Top-5 accuracy", True))


def plot_curves(history: dict[str, list[float]], path: Path, title: str = "") -> Path:
    """Draws the three-panel curves figure (as in the textbook) and saves it as PNG."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, label, is_accuracy) in zip(axes, PANELS):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = history.get(f"{split}_{key}", [])
            epochs = range(1, len(values) + 1)
            ax.plot(
                epochs,
                values,
                style,
                markersize=3,
                label=f"{'Training' if split == 'train' else 'Validation'}",
            )
        ax.set_title(f"Training and validation {label.lower()}")
        ax.set_xlabel("Epoch")
        ax.set_ylabel(label)
        if is_accuracy:
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
