"""CIFAR-10/100 from the official python tarball (or its extracted folder), read directly."""

import os
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from vitexp.data import DataError, ImageData, keras_home

URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
LAYOUTS = {
    "cifar100": {
        "archive": "cifar-100-python.tar.gz",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "labels": b"fine_labels",
        "names": b"fine_label_names",
    },
    "cifar10": {
        "archive": "cifar-10-python.tar.gz",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "labels": b"labels",
        "names": b"label_names",
    },
}


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        return pickle.loads(raw, encoding="bytes")
    except Exception as err:
        raise DataError(f"{where}: not a CIFAR pickle ({type(err).__name__}); download it again") from None


def _read_members(path: Path, names: list[str]) -> dict[str, bytes]:
    """Reads the named members of the tarball or folder at `path` (any directory depth)."""
    found: dict[str, bytes] = {}
    if path.is_dir():
        for name in names:
            hits = [p for p in (path / name, *path.glob(f"*/{name}")) if p.is_file()]
            if hits:
                found[name] = hits[0].read_bytes()
    else:
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    base = os.path.basename(member.name)
                    if member.isfile() and base in names:
                        found[base] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            raise DataError(
                f"{path}: truncated or corrupt archive ({type(err).__name__}: {err}); "
                f"download it again from {URL}"
            ) from None
    missing = [n for n in names if n not in found]
    if missing:
        raise DataError(f"{path}: has no {missing[0]!r}; expected the official archive from {URL}")
    return found


def _to_images(batch: dict, where: str) -> np.ndarray:
    rows = np.asarray(batch.get(b"data"), dtype=np.uint8)
    if rows.ndim != 2 or rows.shape[1] != 3072:
        raise DataError(f"{where}: 'data' is {rows.shape}, expected N x 3072 uint8 rows")
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def read_cifar(path: str | Path, variant: str) -> ImageData:
    """Reads CIFAR from the official tarball or its extracted folder.

    Args:
        path: `cifar-100-python.tar.gz` / `cifar-10-python.tar.gz`, or the folder it
            extracts to (or a folder holding that folder).
        variant: `cifar100` or `cifar10`.
    """
    layout = LAYOUTS[variant]
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(
            f"data.path={path} does not exist: download {layout['archive']} from {URL} "
            "and give its absolute path"
        )
    members = _read_members(path, layout["train"] + layout["test"] + [layout["meta"]])
    parts = {}
    for split in ("train", "test"):
        batches = [_unpickle(members[n], f"{path}:{n}") for n in layout[split]]
        parts[split] = (
            np.concatenate([_to_images(b, f"{path}:{n}") for b, n in zip(batches, layout[split])]),
            np.concatenate([np.asarray(b[layout["labels"]], dtype=np.int32) for b in batches]),
        )
    meta = _unpickle(members[layout["meta"]], f"{path}:{layout['meta']}")
    names = [n.decode() for n in meta[layout["names"]]]
    return ImageData(*parts["train"], *parts["test"], class_names=names, source=str(path))


def _keras_cache(variant: str) -> Path | None:
    root = keras_home() / "datasets"
    folder = LAYOUTS[variant]["folder"]
    for candidate in sorted(root.glob(f"{folder}*")):
        if candidate.is_dir() and any(candidate.rglob(LAYOUTS[variant]["meta"])):
            return candidate
    return None


def _load(variant: str, path: str | None) -> ImageData:
    if path:
        return read_cifar(path, variant)
    cached = _keras_cache(variant)
    if cached is None:
        import keras

        try:
            getattr(keras.datasets, variant).load_data()
        except Exception:
            archive = LAYOUTS[variant]["archive"]
            raise DataError(
                f"{variant} is not available offline and the download failed: get {archive} "
                f"from {URL} and run with data.path=/absolute/path/to/{archive} (or train offline on "
                "Fashion-MNIST: experiment=vit_fashion_mnist)"
            ) from None
        cached = _keras_cache(variant)
    return read_cifar(cached, variant)


def load_cifar100(path: str | None = None) -> ImageData:
    """CIFAR-100 (fine labels) from `path`, else from Keras' cache or download."""
    return _load("cifar100", path)


def load_cifar10(path: str | None = None) -> ImageData:
    """CIFAR-10 from `path`, else from Keras' cache or download."""
    return _load("cifar10", path)
