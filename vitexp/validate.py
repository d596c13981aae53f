"""Checks a composed config before any data is loaded, model built or run recorded.

Pure Python on the OmegaConf tree (no TensorFlow), so the command line can run it in a
second for every job of a sweep. Each problem is one line that says what to change.
"""

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value the user must change; the message is one line naming the fix."""


PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16", "auto")
JIT_CHOICES = ("auto", "true", "false")
POOLINGS = ("flatten", "cls", "gap")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
POS_EMBEDDINGS = ("learned", "sincos")


def unknown_keys(node: DictConfig, path: str = "") -> Iterator[str]:
    """Yields the dotted keys that are not fields of their node's dataclass schema."""
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        allowed = {f.name for f in dataclasses.fields(schema)}
        for key in node.keys():
            if key not in allowed:
                yield f"{path}{key}"
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            yield from unknown_keys(child, f"{path}{key}.")


def missing_keys(node: DictConfig, path: str = "") -> Iterator[str]:
    """Yields the dotted keys whose value is ??? (mandatory and not given), unresolved."""
    for key in node.keys():
        child = node._get_node(key)
        if child._is_missing():
            yield f"{path}{key}"
        elif isinstance(child, DictConfig) and not child._is_none():
            yield from missing_keys(child, f"{path}{key}.")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_range(name: str, value: float, low: float, high: float) -> None:
    _require(low <= value < high, f"{name}={value} is out of range: use a value in [{low}, {high})")


def check_model(m: Any, image_shape: list) -> None:
    _require(m.depth >= 1, f"model.depth={m.depth}: use at least 1 transformer layer (depth=...)")
    _require(m.patch_size >= 1, f"model.patch_size={m.patch_size}: use a positive patch size")
    for key in ("dropout", "attention_dropout", "head_dropout", "drop_path"):
        if key in m:
            _check_range(f"model.{key}", m[key], 0.0, 1.0)
    _require(
        m.image_size % m.patch_size == 0,
        f"model.image_size={m.image_size} is not divisible by patch_size={m.patch_size}: "
        f"pick a patch size that divides {m.image_size} (e.g. patch_size="
        f"{_nearest_divisor(m.image_size, m.patch_size)}) or change model.image_size",
    )
    if "swin" in m._target_:
        check_swin(m)
    else:
        check_vit(m)


def _nearest_divisor(n: int, near: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - near))


def check_vit(m: Any) -> None:
    if m.head_dim is not None:
        _require(m.head_dim >= 1, f"model.head_dim={m.head_dim}: use a positive width or null")
    _require(
        m.projection_dim % m.num_heads == 0,
        f"model.projection_dim={m.projection_dim} is not divisible by num_heads={m.num_heads}: "
        "change model.num_heads or model.projection_dim",
    )
    _require(
        len(m.transformer_units) >= 1 and m.transformer_units[-1] == m.projection_dim,
        f"model.transformer_units={list(m.transformer_units)} must end with projection_dim="
        f"{m.projection_dim} (the MLP output is added back to the tokens)",
    )
    _require(m.tokenizer in ("patch", "conv"), f"model.tokenizer={m.tokenizer!r}: use 'patch' or 'conv'")
    if m.tokenizer == "conv":
        _require(
            m.patch_size in (2, 4, 8, 16),
            f"model.patch_size={m.patch_size}: the conv tokenizer's stride must be 2, 4, 8 or 16",
        )
        strided = m.patch_size.bit_length() - 1
        _require(
            not m.stem_channels or len(m.stem_channels) >= strided,
            f"model.stem_channels={list(m.stem_channels)}: patch_size={m.patch_size} needs at least "
            f"{strided} stride-2 stages; give {strided} or more entries, or [] for the plain stem",
        )
    _require(
        not m.stem_channels or m.tokenizer == "conv",
        "model.stem_channels is for the conv tokenizer: add model.tokenizer=conv or drop stem_channels",
    )
    _require(m.pooling in POOLINGS, f"model.pooling={m.pooling!r}: use one of {POOLINGS}")
    _require(
        m.pos_embedding in POS_EMBEDDINGS,
        f"model.pos_embedding={m.pos_embedding!r}: use one of {POS_EMBEDDINGS}",
    )
    _require(m.image_size >= m.patch_size, "model.image_size must be at least the patch size")


def check_swin(m: Any) -> None:
    _require(
        m.image_size >= 32,
        f"model.image_size={m.image_size}: Swin needs inputs of at least 32 pixels "
        "(set model.image_size=32 or more; images are resized on the fly)",
    )
    _require(
        len(m.depths) == len(m.num_heads) == 4,
        "model.depths and model.num_heads must each list 4 stages",
    )
    side = m.image_size // m.patch_size
    _require(
        side % 8 == 0,
        f"model.image_size={m.image_size} / patch_size={m.patch_size} gives a {side}x{side} "
        "token map; Swin halves it 3 times, so it must be divisible by 8: use image_size = "
        f"{8 * m.patch_size * max(1, round(side / 8))} or another patch size",
    )
    _require(
        m.embed_dim % m.num_heads[0] == 0,
        f"model.embed_dim={m.embed_dim} is not divisible by num_heads[0]={m.num_heads[0]}",
    )
    if m.weights not in (None, "imagenet"):
        _require(
            Path(m.weights).expanduser().is_file(),
            f"model.weights={m.weights}: no such file; give an .h5 weights file, imagenet or null",
        )
    if m.weights == "imagenet":
        _require(
            m.patch_size == 4 and list(m.depths[:2]) == [2, 2] and m.depth in (6, 18),
            "model.weights=imagenet needs the pretrained layout (patch_size=4, depth=6 for "
            "Swin-T or 18 for Swin-S/B/L): drop the patch_size/depth overrides or use "
            "model.weights=null",
        )


def check_data(d: Any) -> None:
    _require(d.num_classes >= 2, f"data.num_classes={d.num_classes}: need at least 2 classes")
    shape = list(d.image_shape)
    _require(
        len(shape) == 3 and shape[2] in (1, 3) and min(shape) >= 1,
        f"data.image_shape={shape}: use [height, width, channels] with 1 or 3 channels",
    )
    for key in ("train_limit", "test_limit"):
        if d[key] is not None:
            _require(d[key] >= 1, f"data.{key}={d[key]}: use a positive count or null")
    aug = d.augment
    for key in ("mixup_alpha", "cutmix_alpha"):
        _require(aug[key] >= 0, f"data.augment.{key}={aug[key]}: use 0 (off) or a positive alpha")
    _check_range("data.augment.random_erasing", aug.random_erasing, 0.0, 1.0)
    _check_range("data.augment.rand_augment_magnitude", aug.rand_augment_magnitude, 0.0, 1.01)


def check_trainer(t: Any) -> None:
    _require(t.epochs >= 1, f"trainer.epochs={t.epochs}: train at least 1 epoch")
    _require(t.batch_size >= 1, f"trainer.batch_size={t.batch_size}: use a positive batch size")
    _require(
        0.0 < t.validation_split < 1.0,
        f"trainer.validation_split={t.validation_split}: use a fraction in (0, 1), e.g. 0.2",
    )
    _require(t.precision in PRECISIONS, f"trainer.precision={t.precision!r}: use one of {PRECISIONS}")
    _require(
        str(t.jit_compile).lower() in JIT_CHOICES,
        f"trainer.jit_compile={t.jit_compile!r}: use one of {JIT_CHOICES}",
    )
    _require(t.steps_per_execution >= 1, "trainer.steps_per_execution must be at least 1")
    _require(t.strategy in STRATEGIES, f"trainer.strategy={t.strategy!r}: use one of {STRATEGIES}")
    if t.logical_cpus is not None:
        _require(t.logical_cpus >= 1, "trainer.logical_cpus must be at least 1 or null")
    if t.steps_per_epoch is not None:
        _require(t.steps_per_epoch >= 1, "trainer.steps_per_epoch must be positive or null")
    _require(t.keep_checkpoints >= 1, "trainer.keep_checkpoints must be at least 1")
    _check_range("trainer.label_smoothing", t.label_smoothing, 0.0, 1.0)
    stop = t.early_stopping
    if stop.patience is not None:
        _require(stop.patience >= 1, "trainer.early_stopping.patience must be at least 1 or null (off)")
    _require(stop.min_delta >= 0, "trainer.early_stopping.min_delta must be 0 or more")
    steps = list(t.profile_steps)
    _require(
        len(steps) == 2 and 1 <= steps[0] <= steps[1],
        f"trainer.profile_steps={steps}: give [first, last] steps, 1 <= first <= last, e.g. [2, 4]",
    )


def check_optimisation(opt: Any, sched: Any) -> None:
    _require(
        opt.learning_rate > 0,
        f"optimizer.learning_rate={opt.learning_rate}: use a positive learning rate",
    )
    _require(opt.weight_decay >= 0, f"optimizer.weight_decay={opt.weight_decay}: use >= 0")
    if opt.clipnorm is not None:
        _require(opt.clipnorm > 0, "optimizer.clipnorm must be positive or null")
    if opt.ema_momentum is not None:
        _check_range("optimizer.ema_momentum", opt.ema_momentum, 0.0, 1.0)
    _require(
        0.0 <= sched.warmup_fraction < 1.0,
        f"schedule.warmup_fraction={sched.warmup_fraction}: warmup must be shorter than "
        "training, use a fraction in [0, 1)",
    )
    _require(sched.warmup_lr >= 0, "schedule.warmup_lr must be >= 0")
    if sched.final_lr is not None:
        _require(
            0 <= sched.final_lr <= opt.learning_rate,
            f"schedule.final_lr={sched.final_lr} must lie in [0, optimizer.learning_rate]",
        )


TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "file", "databricks")
SQLITE_HEADER = b"SQLite format 3\x00"


def tracking_uri_problem(uri: str) -> str | None:
    """What keeps MLflow from using `uri` (checked before anything is written), or None."""
    scheme = uri.split(":", 1)[0]
    if scheme not in TRACKING_SCHEMES:
        return "use sqlite:///ABS/PATH.db or http://host:port"
    if scheme != "sqlite":
        return None
    if not uri.startswith("sqlite:///") or len(uri) == len("sqlite:///"):
        return "use sqlite:///ABS/PATH.db (three slashes, then an absolute path)"
    path = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    if not path.is_absolute():  # relative to which folder? a job may run elsewhere: say it
        return f"the path is relative: use sqlite:///{path.absolute()}"
    if path.is_dir():
        return f"{path} is a folder: name a .db file in it"
    if not path.parent.is_dir():
        return f"folder {path.parent} does not exist: create it or name another file"
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                return f"{path} is not an SQLite database: name a new file or an MLflow .db file"
    return None


def check_tracking(tr: Any) -> None:
    if tr.uri is not None:
        problem = tracking_uri_problem(str(tr.uri))
        source = " (from MLFLOW_TRACKING_URI)" if os.environ.get("MLFLOW_TRACKING_URI") == tr.uri else ""
        _require(problem is None, f"tracking.uri={tr.uri}{source}: {problem}")
    _require(bool(tr.experiment), "tracking.experiment must be a non-empty name")


def check_config(cfg: DictConfig) -> None:
    """Raises ConfigError with a one-line message for the first problem found."""
    extra = sorted(k for k in unknown_keys(cfg) if not k.startswith("hydra"))
    _require(
        not extra,
        f"unknown config key {extra[0] if extra else ''}: check the spelling "
        "(`vitexp --cfg job` lists every key)",
    )
    missing = list(missing_keys(cfg))
    _require(
        not missing, f"{missing[0] if missing else ''} is required: set {missing[0] if missing else ''}=..."
    )
    try:
        OmegaConf.resolve(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    except Exception as err:  # an interpolation that points nowhere
        raise ConfigError(f"config does not resolve: {err}".splitlines()[0]) from None
    check_data(cfg.data)
    check_model(cfg.model, cfg.data.image_shape)
    check_trainer(cfg.trainer)
    check_optimisation(cfg.optimizer, cfg.schedule)
    check_tracking(cfg.tracking)
    resume = cfg.resume
    _require(
        isinstance(resume, (bool, str)),
        f"resume={resume!r}: use resume=true or resume=<mlflow run id>",
    )
