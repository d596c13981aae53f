"""A finished (or interrupted) run, back from MLflow: its config, class names and model."""

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf


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
        return self.run.info.run_id

    @property
    def class_names(self) -> list[str]:
        names = self.run.data.params.get("class_names", "")
        return names.split(",") if names else [str(i) for i in range(self.cfg.data.num_classes)]

    @property
    def image_shape(self) -> list[int]:
        return list(self.cfg.data.image_shape)

    def test_images(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        from vitexp.data import load_data

        data = load_data(self.cfg.data)
        return data.test_x[:count], data.test_y[:count]


def load_run(run_id: str, tracking_uri: str | None = None, checkpoint: str = "best") -> LoadedRun:
    """Fetches a run's resolved config and checkpoint (`best` or `last`) and loads the model.

    The checkpoint comes from the run's artifacts, or, for a run that has not finished,
    from its local checkpoint folder.
    """
    from mlflow.tracking import MlflowClient

    from vitexp.models import load_model
    from vitexp.tracking import resolve_uri

    uri = resolve_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except Exception:
        raise RunError(f"no run {run_id!r} in {uri}: check the id (`make ui` lists runs)") from None
    folder = Path(tempfile.mkdtemp(prefix=f"vitexp-{run_id[:8]}-"))
    try:
        cfg = OmegaConf.load(client.download_artifacts(run_id, "config/config.yaml", str(folder)))
    except Exception:
        raise RunError(
            f"run {run_id} has no config/config.yaml artifact: it is not a vitexp training run"
        ) from None
    path = _checkpoint(client, run, checkpoint, folder)
    experiment = client.get_experiment(run.info.experiment_id).name
    return LoadedRun(run, cfg, load_model(str(path)), path, experiment)


def _checkpoint(client, run, name: str, folder: Path) -> Path:
    try:
        return Path(client.download_artifacts(run.info.run_id, f"checkpoints/{name}.keras", str(folder)))
    except Exception:
        local = Path(run.data.tags.get("vitexp.output_dir", "/nonexistent")) / "checkpoints" / f"{name}.keras"
        if local.is_file():
            return local
    raise RunError(
        f"run {run.info.run_id} ({run.info.status}) has no {name}.keras checkpoint: it ended before its "
        "first epoch, or was run with tracking.log_checkpoints=false and its output folder is gone"
    )


def read_images(paths: list[str], image_shape: list[int]) -> np.ndarray:
    """Reads PNG/JPEG/GIF/BMP files into uint8 `(N, H, W, C)`, resized as the run was trained."""
    import tensorflow as tf

    height, width, channels = image_shape
    out = []
    for path in paths:
        try:
            raw = tf.io.read_file(str(path))
            image = tf.io.decode_image(raw, expand_animations=False)
        except Exception as err:
            raise RunError(f"{path}: not a readable image ({str(err).splitlines()[0][:80]})") from None
        have = int(image.shape[-1])
        if have == 4 and channels == 3:
            image = image[..., :3]  # drop the alpha channel
        elif have != channels:
            raise RunError(
                f"{path}: has {have} channel(s) but the model was trained on {channels}: "
                f"convert it to {'RGB' if channels == 3 else 'greyscale'}"
            )
        resized = tf.image.resize(tf.cast(image, tf.float32), (height, width), antialias=True)
        out.append(np.clip(np.rint(resized.numpy()), 0, 255).astype(np.uint8))
    return np.stack(out)
