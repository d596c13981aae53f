"""Your own images: a folder of class sub-folders, read with Keras' directory loader."""

from pathlib import Path

import numpy as np

from vitexp.data import DataError, ImageData

SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM")
EXTENSIONS = {".png", ".jpg", ".jpeg", ".gif", ".bmp"}


def _check_files(folder: Path) -> list[str]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{folder}: no class sub-folders; lay images out as {folder}/<class>/<image>.png")
    for cls in classes:
        files = [p for p in (folder / cls).iterdir() if p.suffix.lower() in EXTENSIONS]
        if not files:
            raise DataError(f"{folder / cls}: no images (.png, .jpg, .gif, .bmp)")
        for file in files:
            with open(file, "rb") as f:
                head = f.read(4)
            if not head.startswith(SIGNATURES):
                raise DataError(f"{file}: not a readable image (bad header); remove or replace it")
    return classes


def load_image(path: str | Path, image_shape: list[int]) -> np.ndarray:
    """One image file as `_read` gives it to training: uint8 `image_shape`.

    The same steps as Keras' directory loader: decode to the channel count (grey to RGB,
    RGB to grey, palette expanded, alpha dropped, 16-bit scaled to 8), bilinear resize
    without antialiasing, round to uint8.
    """
    import tensorflow as tf

    height, width, channels = image_shape
    image = tf.io.decode_image(tf.io.read_file(str(path)), channels=channels, expand_animations=False)
    resized = tf.image.resize(image, (height, width), method="bilinear")
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
        raise DataError(f"{folder}: an image could not be decoded ({str(err).splitlines()[0]})") from None
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
            _check_files(root / "test")
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
