"""Loaders on files in the real formats, written by the tests, and on real Fashion-MNIST."""

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import compose

from vitexp.data import DataError, load_data
from vitexp.data.cifar import read_cifar
from vitexp.data.folder import load_image_folder
from vitexp.data.idx import DEBIAN_DIR, load_fashion_mnist, read_idx
from vitexp.data.synthetic import load_synthetic


def cifar_rows(n, seed):
    images = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return images, images.transpose(0, 3, 1, 2).reshape(n, 3072)


def write_cifar100(folder: Path, n_train=20, n_test=10) -> tuple[Path, np.ndarray, np.ndarray]:
    """A small cifar-100-python.tar.gz laid out exactly as the official one."""
    train, train_rows = cifar_rows(n_train, 0)
    test, test_rows = cifar_rows(n_test, 1)
    members = {
        "train": {
            b"data": train_rows,
            b"fine_labels": list(np.arange(n_train) % 100),
            b"coarse_labels": [0] * n_train,
        },
        "test": {
            b"data": test_rows,
            b"fine_labels": list(np.arange(n_test) % 100),
            b"coarse_labels": [0] * n_test,
        },
        "meta": {
            b"fine_label_names": [f"class{i}".encode() for i in range(100)],
            b"coarse_label_names": [b"c"] * 20,
        },
    }
    path = folder / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            raw = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path, train, test


def test_cifar100_tarball_and_extracted_folder(tmp_path):
    path, train, test = write_cifar100(tmp_path)
    data = read_cifar(path, "cifar100")
    np.testing.assert_array_equal(data.train_x, train)  # channel-major rows -> NHWC
    np.testing.assert_array_equal(data.test_x, test)
    assert data.train_x.dtype == np.uint8 and data.train_y.tolist()[:3] == [0, 1, 2]
    assert data.class_names[:2] == ["class0", "class1"] and len(data.class_names) == 100
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path / "x")
    folder = read_cifar(tmp_path / "x", "cifar100")
    np.testing.assert_array_equal(folder.train_x, train)


def test_cifar10_layout(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
        for i, name in enumerate(names):
            if name == "batches.meta":
                obj = {b"label_names": [f"n{i}".encode() for i in range(10)]}
            else:
                obj = {b"data": cifar_rows(4, i)[1], b"labels": [i % 10] * 4}
            raw = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    data = read_cifar(path, "cifar10")
    assert data.train_x.shape == (20, 32, 32, 3) and data.test_x.shape == (4, 32, 32, 3)
    assert data.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4


def test_cifar_errors_name_the_file(tmp_path):
    path, _, _ = write_cifar100(tmp_path)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataError, match=f"{truncated}: truncated or corrupt archive"):
        read_cifar(truncated, "cifar100")
    with pytest.raises(DataError, match="does not exist"):
        read_cifar(tmp_path / "nope.tar.gz", "cifar100")
    with pytest.raises(DataError, match="has no 'data_batch_1'"):
        read_cifar(path, "cifar10")


def test_cifar100_through_the_data_config(tmp_path):
    path, train, _ = write_cifar100(tmp_path, n_train=30)
    cfg = compose([f"data.path={path}", "data.train_limit=12"]).data
    data = load_data(cfg)
    assert data.train_x.shape == (12, 32, 32, 3) and data.train_y.dtype == np.int32


def write_idx(path: Path, array: np.ndarray, magic: int):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist_folder(folder: Path, n=12, label_max=9):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % (label_max + 1)
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images, 0x803)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x801)
    return images, labels


def test_idx_files(tmp_path):
    images, labels = write_mnist_folder(tmp_path / "fm")
    data = load_fashion_mnist(str(tmp_path / "fm"))
    np.testing.assert_array_equal(data.train_x[..., 0], images)
    assert data.train_x.shape == (12, 28, 28, 1) and data.class_names[0] == "T-shirt/top"
    np.testing.assert_array_equal(data.test_y, labels)


def test_idx_errors(tmp_path):
    write_mnist_folder(tmp_path / "fm")
    bad = tmp_path / "fm" / "train-labels-idx1-ubyte.gz"
    write_idx(bad, np.zeros(12), 0x803)
    with pytest.raises(DataError, match=r"wrong idx magic number 0x803 \(expected 0x801\)"):
        load_fashion_mnist(str(tmp_path / "fm"))
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(
            (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (5, 28, 28)) + b"\0" * 100
        )
    with pytest.raises(DataError, match="truncated"):
        read_idx(short, 3)
    with pytest.raises(DataError, match="has no"):
        load_fashion_mnist(str(tmp_path))


def test_labels_outside_the_class_range(tmp_path):
    write_mnist_folder(tmp_path / "fm", label_max=11)
    cfg = compose(["data=fashion_mnist", f"data.path={tmp_path / 'fm'}"]).data
    with pytest.raises(DataError, match=r"labels span \[0, 11\], outside \[0, 9\]"):
        load_data(cfg)


@pytest.mark.skipif(not Path(DEBIAN_DIR).is_dir(), reason="install dataset-fashion-mnist")
def test_real_fashion_mnist_from_the_debian_package():
    data = load_fashion_mnist()
    assert data.train_x.shape == (60000, 28, 28, 1) and data.test_x.shape == (10000, 28, 28, 1)
    assert np.bincount(data.train_y).tolist() == [6000] * 10
    assert 60 < data.train_x.mean() < 90  # real clothing images, mostly dark background


def write_png_folder(root: Path, classes=("cat", "dog", "owl"), per_class=5):
    import keras

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = np.full((20, 24, 3), 40 * c + i, dtype=np.uint8)
            keras.utils.save_img(root / name / f"{i}.png", image, scale=False)


def test_image_folder(tmp_path):
    write_png_folder(tmp_path / "imgs" / "train")
    write_png_folder(tmp_path / "imgs" / "test", per_class=2)
    data = load_image_folder(str(tmp_path / "imgs"), [16, 16, 3])
    assert data.class_names == ["cat", "dog", "owl"]
    assert data.train_x.shape == (15, 16, 16, 3) and data.test_x.shape == (6, 16, 16, 3)
    assert (data.train_x[:, 0, 0, 0] // 40 == data.train_y).all()  # each image keeps its label
    assert len(set(data.train_y[-3:])) > 1  # shuffled: the last images are not all one class
    flat = load_image_folder(str(tmp_path / "imgs" / "train"), [8, 8, 1])
    assert flat.train_x.shape == (12, 8, 8, 1) and flat.test_x.shape == (3, 8, 8, 1)


def test_image_folder_says_which_files_it_leaves_out(tmp_path, capsys):
    write_png_folder(tmp_path / "imgs", per_class=5)
    for name in ("cat/a.webp", "cat/b.webp", "dog/c.tiff", "owl/.DS_Store"):
        (tmp_path / "imgs" / name).write_bytes(b"RIFF....WEBP")
    data = load_image_folder(str(tmp_path / "imgs"), [16, 16, 3])
    assert len(data.train_x) + len(data.test_x) == 15  # the PNGs, nothing else
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "warning" in line and "3 files not trained on" in line, line
    assert ".tiff: 1" in line and ".webp: 2" in line and "DS_Store" not in line, line


def test_image_folder_unreadable_file(tmp_path):
    write_png_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "dog" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"broken.png: not a readable image"):
        load_image_folder(str(tmp_path / "imgs"), [16, 16, 3])


def test_synthetic_is_deterministic_and_class_dependent():
    shape = dict(num_classes=3, image_shape=(10, 12, 3), num_train=300, num_test=128, noise=0.25, seed=5)
    a, b = load_synthetic(**shape), load_synthetic(**shape)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    assert a.train_x.shape == (300, 10, 12, 3) and a.train_x.dtype == np.uint8
    means = [a.train_x[a.train_y == c].mean(axis=0) for c in range(3)]
    assert np.abs(means[0] - means[1]).mean() > 20  # classes differ far beyond the noise


def test_image_folder_test_classes_differ_from_train(tmp_path):
    write_png_folder(tmp_path / "imgs" / "train")
    write_png_folder(tmp_path / "imgs" / "test", classes=("cat", "dog", "emu"), per_class=2)
    with pytest.raises(DataError, match=r"only in train/: \['owl'\], only in test/: \['emu'\]"):
        load_image_folder(str(tmp_path / "imgs"), [16, 16, 3])


def write_jpeg(path: Path, value: int = 90) -> bytes:
    import keras

    image = np.random.default_rng(value).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    keras.utils.save_img(path, image, scale=False)
    return path.read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "scrambled"])
def test_image_folder_names_the_corrupt_jpeg(damage, tmp_path):
    write_png_folder(tmp_path / "imgs")
    good = write_jpeg(tmp_path / "imgs" / "dog" / "fine.jpg")
    whole = write_jpeg(tmp_path / "imgs" / "owl" / "photo.jpg")
    if damage == "truncated":
        broken = whole[: len(whole) // 2]
    else:  # a JPEG's first and last bytes around bytes that are no JPEG at all
        broken = whole[:4] + b"\x00" * (len(whole) - 6) + whole[-2:]
    (tmp_path / "imgs" / "owl" / "photo.jpg").write_bytes(broken)
    with pytest.raises(DataError, match=r"owl/photo.jpg: not a readable image"):
        load_image_folder(str(tmp_path / "imgs"), [16, 16, 3])
    (tmp_path / "imgs" / "owl" / "photo.jpg").write_bytes(good)  # a whole JPEG still loads
    assert load_image_folder(str(tmp_path / "imgs"), [16, 16, 3]).train_x.shape[1:] == (16, 16, 3)
