"""A training job: where it runs under Hydra (its run folder, whether it is one of a sweep's
jobs, how many jobs share this machine) and what it holds once built."""

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vitexp.tracking import Tracker


def parallel_jobs() -> int:
    """How many jobs a parallel launcher (joblib) runs at once on this machine; 1 otherwise."""
    if not HydraConfig.initialized():
        return 1
    n_jobs = HydraConfig.get().launcher.get("n_jobs") or 1
    return os.cpu_count() if n_jobs < 0 else n_jobs


def job_dir() -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(tempfile.mkdtemp(prefix="vitexp-"))


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@dataclass
class Splits:
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


@dataclass
class Job:
    """What a training job holds once its model is built and its MLflow run exists."""

    cfg: DictConfig
    tracker: Tracker
    run_id: str
    model: keras.Model
    schedule: object
    splits: Splits
    steps: int
    out_dir: Path
    first_epoch: int
    class_names: list[str]
    in_epoch: dict | None = None  # a step checkpoint's state: resumed inside first_epoch
