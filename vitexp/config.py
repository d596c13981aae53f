"""The config: one dataclass schema per group option, registered with Hydra's ConfigStore,
and `compose`, which builds a job's config the way the `vitexp` command does.

Every YAML file under ``conf/`` names its schema in its defaults list, so a typo, a wrong
type or a value outside an Enum fails when Hydra composes the config. The values live in
the YAML options; a schema holds a default only for a key no option sets. Keys added with
``+key=`` slip past Hydra's struct mode; :func:`vitexp.validate.check_config` catches those.
The schemas of models, datasets, optimizers and schedules live beside their factories
(`vitexp.schema`) and are found there.
"""

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from vitexp.data.schema import DataConfig
from vitexp.models.schema import family_schemas
from vitexp.optim.schema import OptimizerConfig, ScheduleConfig
from vitexp.schema import find_schemas
from vitexp.validate import ConfigError

CONFIG_MODULE = "vitexp.conf"


def _shortcut(key: str, default: Any, *, _root_: Any) -> Any:
    """Resolves ``${shortcut:patch_size,6}``: the top-level shortcut if set, else the default."""
    value = _root_.get(key)
    return default if value is None else value


if not OmegaConf.has_resolver("shortcut"):
    OmegaConf.register_new_resolver("shortcut", _shortcut)
if not OmegaConf.has_resolver("mul"):  # widths that follow another: ${mul:2,${model.projection_dim}}
    OmegaConf.register_new_resolver("mul", lambda a, b: a * b)
if not OmegaConf.has_resolver("pid"):  # run folders: two runs started in the same second differ
    OmegaConf.register_new_resolver("pid", os.getpid, use_cache=True)


# ---------------------------------------------------------------- trainer, tracking
class Precision(StrEnum):
    """Keras' dtype policy; `auto` picks per machine (`vitexp.train.devices.choose_precision`)."""

    float32 = "float32"
    mixed_bfloat16 = "mixed_bfloat16"
    mixed_float16 = "mixed_float16"
    auto = "auto"


class Strategy(StrEnum):
    """The tf.distribute strategy (`vitexp.train.devices.distribution`)."""

    auto = "auto"
    one_device = "one_device"
    mirrored = "mirrored"
    multi_worker = "multi_worker"


class TTA(StrEnum):
    """Test-time augmentation of the test split's scoring (`vitexp.data.pipeline.predict_views`)."""

    none = "none"
    flip = "flip"
    flip_shift = "flip_shift"


class TestCheckpoint(StrEnum):
    best = "best"
    last = "last"


class Monitor(StrEnum):
    val_top1 = "val_top1"
    val_top5 = "val_top5"
    val_loss = "val_loss"


@dataclass
class EarlyStoppingConfig:
    patience: int | None = MISSING
    monitor: Monitor = MISSING
    min_delta: float = MISSING


@dataclass
class TrainerConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    validation_split: float = MISSING
    seed: int = MISSING
    deterministic: bool = False
    label_smoothing: float = 0.0
    precision: Precision = Precision.auto
    jit_compile: str = "auto"
    steps_per_execution: int = 1
    steps_per_epoch: int | None = None
    strategy: Strategy = Strategy.auto
    logical_cpus: int | None = None
    threads: int | None = None
    keep_checkpoints: int = 2
    verbose: int = 1
    test_checkpoint: TestCheckpoint = MISSING
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    profile: bool = MISSING
    profile_steps: list[int] = MISSING
    # a top-1 to reach on the test split, checked after each epoch for time-to-accuracy
    # figures (`make speedrun`); it never steers training
    target_top1: float | None = None
    # test-time augmentation: `flip` scores the test split on the images and their mirrors
    # (logits averaged); `flip_shift` on those and each shifted by one pixel up, down, left
    # and right (10 views, for models trained with random crops); the one-view figure is
    # logged beside it as `*_top1_1view`
    tta: TTA = TTA.none


@dataclass
class TrackingConfig:
    uri: str | None = MISSING
    experiment: str = MISSING
    log_checkpoints: bool = True
    # the test checkpoint as the run's MLflow Model (what evaluate, predict, registry and
    # `make serve` load by run id); false skips it, e.g. for a large sweep's trials
    log_model: bool = True
    timeout_s: float = 10.0
    # how long a run that has trained waits for a tracking server that went away to take its
    # last records; then it says how to record them (resume=true) and ends
    reconnect_s: float = 300.0
    skip_finished: bool = True


@dataclass
class ReportConfig:
    enabled: bool = MISSING
    num_images: int = 6


@dataclass
class Config:
    model: Any = MISSING
    data: Any = MISSING
    optimizer: Any = MISSING
    schedule: Any = MISSING
    trainer: TrainerConfig = MISSING
    tracking: TrackingConfig = MISSING
    report: ReportConfig = field(default_factory=ReportConfig)
    patch_size: int | None = MISSING
    depth: int | None = MISSING
    run_name: str = MISSING
    resume: Any = MISSING


# Stored at the top of the ConfigStore, outside every option group, so they are neither
# listed by `--help` nor selectable (`model=vit_schema`); options extend them with
# `- /vit_schema@_here_` in their defaults list. Model families add their own.
SCHEMAS = {
    "vitexp_schema": Config,
    "data_schema": DataConfig,  # a dataset whose loader takes no keys of its own
    "trainer_schema": TrainerConfig,
    "tracking_schema": TrackingConfig,
    "report_schema": ReportConfig,
}


def option_schemas() -> dict[str, type]:
    """The schemas found beside the factories of models, datasets, optimizers and schedules."""
    return {
        **family_schemas(),
        **find_schemas("vitexp.data", DataConfig),
        **find_schemas("vitexp.optim", OptimizerConfig),
        **find_schemas("vitexp.optim", ScheduleConfig),
    }


def register_schemas() -> None:
    """Puts every schema in Hydra's ConfigStore; conf/ files extend them by name."""
    cs = ConfigStore.instance()
    for name, node in {**SCHEMAS, **option_schemas()}.items():
        cs.store(name=name, node=node)


register_schemas()


# ---------------------------------------------------------------- composing
SOURCE_CONF = Path(__file__).resolve().parent.parent / "conf"  # a checkout's, installed editable or not


def in_checkout() -> bool:
    return (SOURCE_CONF / "config.yaml").is_file()


def config_folder() -> Path:
    """Where vitexp's own options are: a checkout's conf/, else the installed vitexp.conf."""
    return SOURCE_CONF if in_checkout() else Path(importlib.util.find_spec(CONFIG_MODULE).origin).parent


def config_path() -> str:
    """Hydra's name for `config_folder()`."""
    return str(SOURCE_CONF) if in_checkout() else f"pkg://{CONFIG_MODULE}"


CONFIG_PATH = config_path()


@contextlib.contextmanager
def hydra_app(config_dir: str | None = None, path: str | None = None) -> Iterator:
    """A Hydra instance with the command line's search path (what `@hydra.main` builds).

    Args:
        config_dir: a user's config folder, searched before the packaged one (`--config-dir`).
        path: the primary config folder (`--config-path`); the packaged configs by default.
    """
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    search_path = create_automatic_config_search_path(None, None, path or CONFIG_PATH)
    if config_dir is not None:
        folder = Path(config_dir).absolute()
        if not folder.is_dir():
            raise ConfigError(f"--config-dir {config_dir}: no such folder")
        search_path.prepend("command-line", f"file://{folder}", SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()
    try:
        yield Hydra.create_main_hydra2(task_name="vitexp", config_search_path=search_path)
    finally:
        GlobalHydra.instance().clear()


def compose_with(app, config_name: str, overrides: list[str]) -> DictConfig:
    """One job's config from a `hydra_app`, without Hydra's own `hydra` node."""
    from hydra.types import RunMode

    cfg = app.compose_config(config_name, overrides, run_mode=RunMode.RUN, with_log_configuration=False)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def compose(overrides: list[str], config_dir: str | None = None) -> DictConfig:
    """Composes the config the way `vitexp` does (for tools and tests)."""
    with hydra_app(config_dir) as app:
        return compose_with(app, "config", overrides)
