"""Pictures and their maths: attention rollout against values worked by hand, position
similarity, and what the drawn pixels show."""

import numpy as np
import pytest

from vitexp.report.run import attention_rollout, position_similarity


def test_rollout_one_layer_without_cls():
    # one head; mixed = 0.5 A + 0.5 I = [[0.75, 0.25], [0.125, 0.875]]; mean of rows
    a = np.array([[[[0.5, 0.5], [0.25, 0.75]]]])
    np.testing.assert_allclose(attention_rollout([a], has_cls=False), [[0.4375, 0.5625]])


def test_rollout_with_cls_averages_heads():
    # heads average to row 0 = [0.2, 0.3, 0.5]; mixed row 0 = [0.6, 0.15, 0.25] -> [0.375, 0.625]
    heads = np.zeros((1, 2, 3, 3))
    heads[0, 0] = [[0.2, 0.2, 0.6], [0, 1, 0], [0, 0, 1]]
    heads[0, 1] = [[0.2, 0.4, 0.4], [0, 1, 0], [0, 0, 1]]
    np.testing.assert_allclose(attention_rollout([heads], has_cls=True), [[0.375, 0.625]])


def test_rollout_two_layers_multiply_in_order():
    a1 = np.array([[[[1.0, 0.0], [1.0, 0.0]]]])  # mixed: [[1, 0], [0.5, 0.5]]
    a2 = np.array([[[[0.0, 1.0], [0.0, 1.0]]]])  # mixed: [[0.5, 0.5], [0, 1]]
    # rollout = M2 @ M1 = [[0.75, 0.25], [0.5, 0.5]]; row mean = [0.625, 0.375]
    np.testing.assert_allclose(attention_rollout([a1, a2], has_cls=False), [[0.625, 0.375]])


def test_position_similarity():
    emb = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    sims = position_similarity(emb)
    np.testing.assert_allclose(np.diag(sims), 1.0)
    assert sims[0, 1] == pytest.approx(0.0) and sims[0, 2] == pytest.approx(np.sqrt(0.5))


def render(draw, inches: float = 2.0) -> np.ndarray:
    """What `draw(ax)` paints into axes filling a square figure, as RGB pixels."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(inches, inches), dpi=50)
    ax = fig.add_axes((0, 0, 1, 1))
    draw(ax)
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    plt.close(fig)
    return pixels


def test_patches_of_the_same_grey_get_the_same_pixels():
    from vitexp.report.run import show_image

    flat = np.full((4, 4, 1), 100, np.uint8)
    mixed = flat.copy()
    mixed[:, :2] = 50  # this patch's left half is darker; its right half is grey 100 as above
    flat_pixels, mixed_pixels = (
        render(lambda ax: show_image(ax, flat)),
        render(lambda ax: show_image(ax, mixed)),
    )
    np.testing.assert_array_equal(flat_pixels[50, 50], [100, 100, 100])
    np.testing.assert_array_equal(mixed_pixels[50, 80], flat_pixels[50, 80])
    assert mixed_pixels[50, 20, 0] < 100


def test_attention_overlay_covers_the_image_to_its_edges():
    from vitexp.report.run import _overlay

    image = np.full((8, 8, 3), 120, np.uint8)
    weights = np.full(16, 1 / 16)  # a 4x4 patch grid, one colour everywhere
    pixels = render(lambda ax: _overlay(ax, image, weights, "", top=1 / 8))
    centre = pixels[50, 50]
    for edge in (pixels[50, -1], pixels[-1, 50], pixels[50, 0], pixels[0, 50], pixels[-1, -1]):
        np.testing.assert_allclose(edge, centre, atol=2)  # no strip of white or bare image


def test_curves_have_whole_epochs_on_the_x_axis():
    from vitexp.report.run import curves_figure

    history = {f"{s}_{k}": [0.9, 0.5, 0.4] for s in ("train", "val") for k in ("loss", "top1", "top5")}
    fig = curves_figure(history)
    fig.canvas.draw()
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_attention_figure_has_one_colour_scale():
    from conftest import compose
    from hydra.utils import instantiate

    from vitexp.report.run import attention_figure

    model = instantiate(
        compose(["model=vit"]).model,
        _convert_="all",
        num_classes=4,
        input_shape=(16, 16, 3),
        image_size=16,
        patch_size=4,
        depth=1,
        projection_dim=16,
        num_heads=2,
        transformer_units=(16,),
        head_units=(8,),
    )
    images = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    fig = attention_figure(model, images, ["a", "b"])
    *panels, colorbar = fig.axes
    assert len(panels) == 2 * (2 + 2) and colorbar.get_ylabel() == "share of attention"
    heats = [ax.images[1] for ax in panels if len(ax.images) == 2]
    assert len(heats) == 2 * 3 and len({(h.norm.vmin, h.norm.vmax) for h in heats}) == 1


def test_class_names_in_scripts_the_font_lacks_are_drawn_or_escaped(tmp_path):
    """No empty boxes: a Katakana class name is drawn with an installed font that has it (a
    fallback such as Noto Sans CJK), or written as its escape where none has it."""
    import warnings

    from vitexp.report.run import plot_confident_errors, plot_confusion, plot_samples

    names = ["ネコ", "dog"]
    images = np.zeros((2, 8, 8, 3), np.uint8)
    labels = np.array([0, 1])
    probs = np.array([[0.2, 0.8], [0.9, 0.1]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_samples(images, labels, names, tmp_path / "samples.png")
        plot_confusion(labels, probs.argmax(-1), names, tmp_path / "confusion.png")
        plot_confident_errors(images, labels, probs, names, tmp_path / "errors.png")
    missing = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    assert missing == []
    from vitexp.report.run import drawable

    assert drawable("ネコ") in ("ネコ", "\\u30cd\\u30b3")
    assert drawable("dog é") == "dog é"  # what the default font has stays as it is
