"""Your own images: a folder of class sub-folders, read with Keras' directory loader."""

import sys
from collections import Counter
from pathlib import Path

import numpy as np

from vitexp.data import DataError, ImageData

SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM")
# What Keras' directory loader reads; `vitexp.predict` and `explain` take the same formats.
EXTENSIONS = {".png", ".jpg", ".jpeg", ".gif", ".bmp"}


def _check_files(folder: Path) -> list[str]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{folder}: no class sub-folders; lay images out as {folder}/<class>/<image>.png")
    skipped = []
    for cls in classes:
        entries = [p for p in (folder / cls).iterdir() if not p.name.startswith(".")]  # .DS_Store
        files = [p for p in entries if p.suffix.lower() in EXTENSIONS]
        skipped += [p for p in entries if p.suffix.lower() not in EXTENSIONS]
        if not files:
            raise DataError(f"{folder / cls}: no images ({', '.join(sorted(EXTENSIONS))})")
        for file in files:
            with open(file, "rb") as f:
                head = f.read(4)
            if not head.startswith(SIGNATURES):
                raise DataError(f"{file}: not a readable image (bad header); remove or replace it")
            if head.startswith(b"\xff\xd8") and not _has_jpeg_end(file):
                raise DataError(f"{file}: not a readable image (truncated JPEG); remove or replace it")
    if skipped:
        _say_skipped(folder, skipped)
    return classes


def _say_skipped(folder: Path, skipped: list[Path]) -> None:
    """One warning line for the files training leaves out: how many of each kind, one named."""
    kinds = Counter(p.suffix.lower() or "no extension" for p in skipped)
    counts = ", ".join(f"{kind}: {n}" for kind, n in sorted(kinds.items()))
    print(
        f"vitexp: warning: {folder}: {len(skipped)} files not trained on, not in a format training "
        f"reads ({counts}; e.g. {skipped[0]}); convert images to "
        f"{'/'.join(sorted(e[1:] for e in EXTENSIONS))} to use them",
        file=sys.stderr,
    )


def _has_jpeg_end(file: Path) -> bool:
    """A whole JPEG ends with its end-of-image marker (some writers pad a few bytes after it)."""
    with open(file, "rb") as f:
        f.seek(max(0, file.stat().st_size - 64))
        return b"\xff\xd9" in f.read()


def _same_classes(root: Path, train: list[str], test: list[str]) -> None:
    if test != train:
        missing, extra = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise DataError(
            f"{root}: test/ class folders differ from train/ (only in train/: {missing}, only in test/: "
            f"{extra}); give both the same class folders"
        )


def _first_unreadable(folder: Path, class_names: list[str], channels: int) -> Path | None:
    import tensorflow as tf

    for cls in class_names:
        for file in sorted((folder / cls).iterdir()):
            if file.suffix.lower() in EXTENSIONS:
                try:
                    tf.io.decode_image(tf.io.read_file(str(file)), channels=channels, expand_animations=False)
                except Exception:
                    return file
    return None


def load_image(path: str | Path, image_shape: list[int]) -> np.ndarray:
    """One image file as `_read` gives it to training: uint8 `image_shape`.

    The same steps as Keras' directory loader: decode to the channel count (grey to RGB,
    RGB to grey, palette expanded, alpha dropped, 16-bit scaled to 8), bilinear resize
    without antialiasing, round to uint8.
    """
    import tensorflow as tf

    image = tf.io.decode_image(tf.io.read_file(str(path)), channels=image_shape[2], expand_animations=False)
    return fit_images(image.numpy()[None], image_shape)[0]


def fit_images(images: np.ndarray, image_shape: list[int]) -> np.ndarray:
    """uint8 `(N, H, W, C)` images converted to `image_shape` as training's loader converts them:
    grey to RGB or RGB to grey, bilinear resize without antialiasing, rounded to uint8."""
    import tensorflow as tf

    height, width, channels = image_shape
    x = tf.convert_to_tensor(images)
    if x.shape[-1] == 1 and channels == 3:
        x = tf.image.grayscale_to_rgb(x)
    elif x.shape[-1] == 3 and channels == 1:
        x = tf.image.rgb_to_grayscale(x)
    if tuple(x.shape[1:3]) == (height, width):
        return x.numpy().astype(np.uint8)
    resized = tf.image.resize(x, (height, width), method="bilinear")
    return np.clip(np.rint(resized.numpy()), 0, 255).astype(np.uint8)


def _read(folder: Path, image_shape: list[int], class_names: list[str]):
    import keras

    height, width, channels = image_shape
    ds = keras.utils.image_dataset_from_directory(
        folder,
        labels="inferred",
        class_names=class_names,
        color_mode="rgb" if channels == 3 else "grayscale",
        image_size=(height, width),
        batch_size=None,
        shuffle=False,
        verbose=False,
    )
    images, labels = [], []
    try:
        for image, label in ds.as_numpy_iterator():
            images.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
            labels.append(label)
    except Exception as err:
        bad = _first_unreadable(folder, class_names, channels)
        if bad is not None:
            raise DataError(
                f"{bad}: not a readable image (it does not decode); remove or replace it"
            ) from None
        raise DataError(
            f"{folder}: the images could not be read ({str(err).splitlines()[0][:120]})"
        ) from None
    return np.stack(images), np.asarray(labels, dtype=np.int32)


def load_image_folder(path: str, image_shape: list[int]) -> ImageData:
    """Loads `path/train/<class>/*` and `path/test/<class>/*`, or splits `path/<class>/*`.

    Without `train/` and `test/` sub-folders, every fifth image of each class (in file-name
    order) is held out as the test split. The training images come in a fixed shuffled
    order, so the trainer's validation split (its last images) holds every class.

    Args:
        path: the folder.
        image_shape: `[height, width, channels]` to resize to (channels 1 or 3).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path={root} is not a folder of class sub-folders")
    if (root / "train").is_dir():
        names = _check_files(root / "train")
        train = _read(root / "train", image_shape, names)
        if (root / "test").is_dir():
            _same_classes(root, names, _check_files(root / "test"))
            test = _read(root / "test", image_shape, names)
        else:
            raise DataError(f"{root}: has train/ but no test/ sub-folder; add one")
    else:
        names = _check_files(root)
        x, y = _read(root, image_shape, names)
        held_out = np.arange(len(x)) % 5 == 4
        train, test = (x[~held_out], y[~held_out]), (x[held_out], y[held_out])
    # the loader reads class by class; the trainer holds out the last images for validation,
    # so mix the classes (always the same way) or validation would hold the last class only
    order = np.random.default_rng(0).permutation(len(train[0]))
    train = (train[0][order], train[1][order])
    return ImageData(*train, *test, class_names=names, source=str(root))
