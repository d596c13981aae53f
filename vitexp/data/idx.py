"""Fashion-MNIST (and any MNIST-style set) from idx files, gzipped or not."""

import gzip
from pathlib import Path

import numpy as np

from vitexp.data import DataError, ImageData, keras_home

FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
FASHION_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
MAGIC = {1: 0x801, 3: 0x803}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Reads an idx file of uint8 values with `ndim` dimensions (1: labels, 3: images)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read ({type(err).__name__}: {err}); replace the file") from None
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
    if magic != MAGIC[ndim]:
        raise DataError(
            f"{path}: wrong idx magic number {magic:#x} (expected {MAGIC[ndim]:#x}): "
            "not an idx file of that kind"
        )
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    header = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: holds {len(raw) - header} bytes of data, the header promises {expected}: "
            "the file is truncated; replace it"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def search_dirs(path: str | None) -> list[Path]:
    if path:
        return [Path(path).expanduser()]
    return [Path(DEBIAN_DIR), keras_home() / "datasets" / "fashion-mnist"]


def load_fashion_mnist(path: str | None = None) -> ImageData:
    """Fashion-MNIST from `path`, else the Debian package's folder, else Keras' cache.

    Args:
        path: a folder with the four idx files (`train-images-idx3-ubyte.gz`, ...).
    """
    for folder in search_dirs(path):
        found = {key: _find(folder, stem) for key, stem in FILES.items()}
        if all(found.values()):
            arrays = {k: read_idx(p, 3 if k.endswith("_x") else 1) for k, p in found.items()}
            return ImageData(
                arrays["train_x"][..., None],
                arrays["train_y"],
                arrays["test_x"][..., None],
                arrays["test_y"],
                class_names=FASHION_NAMES,
                source=str(folder),
            )
        if path:
            missing = next(FILES[k] for k, v in found.items() if v is None)
            raise DataError(
                f"data.path={folder} has no {missing}(.gz): give the folder with the four idx files"
            )
    raise DataError(
        "Fashion-MNIST not found: install it (apt-get install dataset-fashion-mnist) or set "
        "data.path to a folder with the four idx .gz files"
    )
