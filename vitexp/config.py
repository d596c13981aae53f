"""Config schemas: one dataclass per group option, registered with Hydra's ConfigStore.

Every YAML file under ``conf/`` names its schema in its defaults list, so a typo or a
wrong type fails when Hydra composes the config. Keys added with ``+key=`` slip past
Hydra's struct mode; :func:`vitexp.validate.check_config` catches those.
"""

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, OmegaConf


def _shortcut(key: str, default: Any, *, _root_: Any) -> Any:
    """Resolves ``${shortcut:patch_size,6}``: the top-level shortcut if set, else the default."""
    value = _root_.get(key)
    return default if value is None else value


if not OmegaConf.has_resolver("shortcut"):
    OmegaConf.register_new_resolver("shortcut", _shortcut)


# ---------------------------------------------------------------- model
@dataclass
class ModelConfig:
    _target_: str = MISSING
    name: str = MISSING
    num_classes: int = II("data.num_classes")
    input_shape: list[int] = II("data.image_shape")


@dataclass
class ViTConfig(ModelConfig):
    _target_: str = "vitexp.models.vit.build_vit"
    name: str = "vit"
    image_size: int = 72
    patch_size: int = II("shortcut:patch_size,6")
    depth: int = II("shortcut:depth,4")
    projection_dim: int = 64
    num_heads: int = 4
    head_dim: int | None = None
    transformer_units: list[int] = field(default_factory=lambda: [128, 64])
    head_units: list[int] = field(default_factory=lambda: [2048, 1024])
    dropout: float = 0.1
    attention_dropout: float = 0.1
    head_dropout: float = 0.5
    drop_path: float = 0.0
    pooling: str = "flatten"
    pos_embedding: str = "learned"
    shifted_patches: bool = False
    locality_attention: bool = False
    tokenizer: str = "patch"
    stem_channels: list[int] = field(default_factory=list)


@dataclass
class SwinConfig(ModelConfig):
    _target_: str = "vitexp.models.swin.build_swin"
    name: str = "swin"
    variant: str = "swin_tiny_224"
    image_size: int = 32
    patch_size: int = II("shortcut:patch_size,4")
    depth: int = II("shortcut:depth,6")
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    embed_dim: int = 96
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    window_size: int = 7
    pretrain_size: int = 224
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.2
    weights: str | None = None
    head_units: list[int] = field(default_factory=list)
    head_dropout: float = 0.0


# ---------------------------------------------------------------- data
@dataclass
class AugmentConfig:
    random_crop_padding: int = 0
    random_resized_crop: bool = False
    horizontal_flip: bool = False
    rand_augment: bool = False
    rand_augment_magnitude: float = 0.5
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    random_erasing: float = 0.0


@dataclass
class DataConfig:
    _target_: str = MISSING
    name: str = MISSING
    num_classes: int = MISSING
    image_shape: list[int] = MISSING
    path: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class SyntheticDataConfig(DataConfig):
    _target_: str = "vitexp.data.synthetic.load_synthetic"
    name: str = "synthetic"
    num_classes: int = 4
    image_shape: list[int] = field(default_factory=lambda: [16, 16, 3])
    num_train: int = 512
    num_test: int = 128
    noise: float = 0.25
    seed: int = 0


# ---------------------------------------------------------------- optimisation
@dataclass
class AdamWConfig:
    _target_: str = "vitexp.optim.adamw"
    _partial_: bool = True
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    beta_1: float = 0.9
    beta_2: float = 0.999
    clipnorm: float | None = None
    ema_momentum: float | None = None


@dataclass
class SGDConfig:
    _target_: str = "vitexp.optim.sgd"
    _partial_: bool = True
    learning_rate: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = True
    clipnorm: float | None = None
    ema_momentum: float | None = None


@dataclass
class WarmupCosineConfig:
    _target_: str = "vitexp.optim.WarmupCosine"
    _partial_: bool = True
    warmup_fraction: float = 0.1
    warmup_lr: float = 0.0
    final_lr: float = 0.0


@dataclass
class ConstantScheduleConfig:
    _target_: str = "vitexp.optim.WarmupCosine"
    _partial_: bool = True
    warmup_fraction: float = 0.0
    warmup_lr: float = 0.0
    final_lr: float | None = None


# ---------------------------------------------------------------- trainer, tracking
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
    epochs: int = 30
    batch_size: int = 64
    validation_split: float = 0.2
    seed: int = 42
    deterministic: bool = False
    label_smoothing: float = 0.0
    precision: str = "auto"
    jit_compile: str = "auto"
    steps_per_execution: int = 1
    steps_per_epoch: int | None = None
    strategy: str = "auto"
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


@dataclass
class TrackingConfig:
    uri: str | None = None
    experiment: str = "vitexp"
    log_checkpoints: bool = True
    timeout_s: float = 10.0
    skip_finished: bool = True


@dataclass
class ReportConfig:
    enabled: bool = True
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
    patch_size: int | None = None
    depth: int | None = None
    run_name: str = "${model.name}-p${model.patch_size}-d${model.depth}-${data.name}"
    resume: Any = False


# Stored at the top of the ConfigStore, outside every option group, so they are neither
# listed by `--help` nor selectable (`model=vit_schema`); options extend them with
# `- /vit_schema@_here_` in their defaults list.
SCHEMAS = {
    "vitexp_schema": Config,
    "vit_schema": ViTConfig,
    "swin_schema": SwinConfig,
    "data_schema": DataConfig,
    "synthetic_schema": SyntheticDataConfig,
    "adamw_schema": AdamWConfig,
    "sgd_schema": SGDConfig,
    "warmup_cosine_schema": WarmupCosineConfig,
    "constant_schema": ConstantScheduleConfig,
    "trainer_schema": TrainerConfig,
    "tracking_schema": TrackingConfig,
    "report_schema": ReportConfig,
}


def register_schemas() -> None:
    """Puts every schema in Hydra's ConfigStore; conf/ files extend them by name."""
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=name, node=node)


register_schemas()
