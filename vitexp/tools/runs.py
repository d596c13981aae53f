"""A finished (or interrupted) run, back from MLflow: its config, class names and model."""

import atexit
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from vitexp.data import load_data
from vitexp.data.folder import EXTENSIONS, load_image
from vitexp.tracking import Tracker, tag


class RunError(RuntimeError):
    """A run or an input cannot be used; the message is one line naming the problem."""


@dataclass
class LoadedRun:
    run: object
    cfg: DictConfig
    model: object
    checkpoint: Path
    experiment: str

    @property
    def run_id(self) -> str:
        return self.run.id

    class_names: list[str]

    @property
    def image_shape(self) -> list[int]:
        return list(self.cfg.data.image_shape)

    def test_images(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        data = load_data(self.cfg.data)
        return data.test_x[:count], data.test_y[:count]


def load_run(run_id: str, tracking_uri: str | None = None, checkpoint: str | None = None) -> LoadedRun:
    """Fetches a run's resolved config and checkpoint (`best` or `last`; by default the one
    its test metrics were measured on, `trainer.test_checkpoint`) and loads the model.

    The checkpoint comes from the run's artifacts, or, for a run that has not finished,
    from its local checkpoint folder.
    """
    from vitexp.models import load_model  # Keras: after the tool's arguments are checked

    tracker = Tracker(tracking_uri)
    run = tracker.get_run(run_id)
    if run is None:
        raise RunError(f"no run {run_id!r} in {tracker.uri}: check the id (`make ui` lists runs)")
    folder = Path(tempfile.mkdtemp(prefix=f"vitexp-{run_id[:8]}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the download, once the tool is done
    try:
        cfg = OmegaConf.load(tracker.download(run_id, "config/config.yaml", folder))
    except Exception:
        raise RunError(
            f"run {run_id} has no config/config.yaml artifact: it is not a vitexp training run"
        ) from None
    checkpoint = checkpoint or OmegaConf.select(cfg, "trainer.test_checkpoint", default="best")
    path = _checkpoint(tracker, run, checkpoint, folder)
    names = tracker.class_names(run, cfg.data.num_classes)
    return LoadedRun(run, cfg, load_model(str(path)), path, tracker.experiment_of(run), names)


def _checkpoint(tracker, run, name: str, folder: Path) -> Path:
    try:
        return tracker.download(run.id, f"checkpoints/{name}.keras", folder)
    except Exception:
        local = Path(run.tags.get(tag.OUTPUT_DIR, "/nonexistent")) / "checkpoints" / f"{name}.keras"
        if local.is_file():
            return local
    raise RunError(
        f"run {run.id} ({run.status}) has no {name}.keras checkpoint: it ended before its "
        "first epoch, or was run with tracking.log_checkpoints=false and its output folder is gone"
    )


def image_files(paths: list[str]) -> list[str]:
    """The image files `paths` name, a folder standing for its images in file-name order.

    Raises:
        RunError: a path does not exist, a folder holds no images, or a file is of a format
            that training's image-folder loader does not read either.
    """
    formats = ", ".join(sorted(EXTENSIONS))
    files = []
    for path in paths:
        given = Path(path)
        if given.is_dir():
            inside = sorted(str(p) for p in given.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
            if not inside:
                raise RunError(
                    f"{path}: a folder with no images ({formats}) directly in it; name image files"
                )
            files += inside
        elif not given.exists():
            raise RunError(f"{path}: no such file")
        elif given.suffix.lower() not in EXTENSIONS:
            raise RunError(
                f"{path}: {given.suffix or 'a file without an extension'} is not an image format vitexp "
                f"trains on; use {formats}"
            )
        else:
            files.append(path)
    return files


def read_images(paths: list[str], image_shape: list[int]) -> np.ndarray:
    """Reads image files (`image_files`) into uint8 `(N, H, W, C)`, converted and resized as an
    image-folder run's training images were (`vitexp.data.folder.load_image`)."""
    out = []
    for path in image_files(paths):
        try:
            out.append(load_image(path, image_shape))
        except Exception:
            raise RunError(f"{path}: not a readable image (it does not decode); replace it") from None
    return np.stack(out)
