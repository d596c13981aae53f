"""Checks a composed config before any data is loaded, model built or run recorded.

Pure Python on the OmegaConf tree (no TensorFlow), so the command line can run it in a
second for every job of a sweep. Each problem is one line that says what to change.
"""

import dataclasses
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vitexp.schema import check_group
from vitexp.tracking.uri import URI_ENV, env_uri, tracking_uri_problem


class ConfigError(ValueError):
    """A config value the user must change; the message is one line naming the fix."""


# `trainer.jit_compile: true` (a YAML bool) is welcome, so this one is not an Enum
JIT_CHOICES = ("auto", "true", "false")


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


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_range(name: str, value: float, low: float, high: float) -> None:
    require(low <= value < high, f"{name}={value} is out of range: use a value in [{low}, {high})")


def check_trainer(t: Any) -> None:
    require(t.epochs >= 1, f"trainer.epochs={t.epochs}: train at least 1 epoch")
    require(t.batch_size >= 1, f"trainer.batch_size={t.batch_size}: use a positive batch size")
    require(
        0.0 < t.validation_split < 1.0,
        f"trainer.validation_split={t.validation_split}: use a fraction in (0, 1), e.g. 0.2",
    )
    require(
        str(t.jit_compile).lower() in JIT_CHOICES,
        f"trainer.jit_compile={t.jit_compile!r}: use one of {JIT_CHOICES}",
    )
    require(t.steps_per_execution >= 1, "trainer.steps_per_execution must be at least 1")
    if t.logical_cpus is not None:
        require(t.logical_cpus >= 1, "trainer.logical_cpus must be at least 1 or null")
    if t.steps_per_epoch is not None:
        require(t.steps_per_epoch >= 1, "trainer.steps_per_epoch must be positive or null")
    require(t.keep_checkpoints >= 1, "trainer.keep_checkpoints must be at least 1")
    check_range("trainer.label_smoothing", t.label_smoothing, 0.0, 1.0)
    stop = t.early_stopping
    if stop.patience is not None:
        require(stop.patience >= 1, "trainer.early_stopping.patience must be at least 1 or null (off)")
    require(stop.min_delta >= 0, "trainer.early_stopping.min_delta must be 0 or more")
    steps = list(t.profile_steps)
    require(
        len(steps) == 2 and 1 <= steps[0] <= steps[1],
        f"trainer.profile_steps={steps}: give [first, last] steps, 1 <= first <= last, e.g. [2, 4]",
    )


def check_optimisation(opt: Any, sched: Any) -> None:
    """What the optimizer and the schedule must agree on (each checks its own keys)."""
    if sched.final_lr is not None:
        require(
            0 <= sched.final_lr <= opt.learning_rate,
            f"schedule.final_lr={sched.final_lr} must lie in [0, optimizer.learning_rate]",
        )


def check_tracking(tr: Any) -> None:
    if tr.uri is not None:
        problem = tracking_uri_problem(str(tr.uri))
        source = f" (from {URI_ENV})" if env_uri() == tr.uri else ""
        require(problem is None, f"tracking.uri={tr.uri}{source}: {problem}")
    require(bool(tr.experiment), "tracking.experiment must be a non-empty name")


def doubts(cfg: DictConfig) -> list[str]:
    """Settings that run but most likely cost the run what the user wants: one line each,
    naming what to change. A run goes ahead with them (a search may try them on purpose)."""
    found = []
    tta = str(OmegaConf.select(cfg, "trainer.tta", default="none"))
    flips = OmegaConf.select(cfg, "data.augment.horizontal_flip", default=False)
    if tta != "none" and not flips:
        found.append(
            f"trainer.tta={tta} scores every test image with its mirror, but "
            "data.augment.horizontal_flip=false: the model never trained on mirrors, and their "
            "votes cost top-1 (1-5 points on Fashion-MNIST); "
            "set data.augment.horizontal_flip=true or trainer.tta=none"
        )
    return found


def check_config(cfg: DictConfig) -> None:
    """Raises ConfigError with a one-line message for the first problem found."""
    extra = sorted(k for k in unknown_keys(cfg) if not k.startswith("hydra"))
    require(
        not extra,
        f"unknown config key {extra[0] if extra else ''}: check the spelling "
        "(`vitexp --cfg job` lists every key)",
    )
    missing = list(missing_keys(cfg))
    require(
        not missing, f"{missing[0] if missing else ''} is required: set {missing[0] if missing else ''}=..."
    )
    try:
        OmegaConf.resolve(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    except Exception as err:  # an interpolation that points nowhere
        raise ConfigError(f"config does not resolve: {err}".splitlines()[0]) from None
    for group in ("data", "model", "optimizer", "schedule"):
        check_group(cfg[group])
    check_trainer(cfg.trainer)
    check_optimisation(cfg.optimizer, cfg.schedule)
    check_tracking(cfg.tracking)
    resume = cfg.resume
    require(
        isinstance(resume, (bool, str)),
        f"resume={resume!r}: use resume=true or resume=<mlflow run id>",
    )
