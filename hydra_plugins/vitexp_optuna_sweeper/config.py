"""The sweeper's config schema, `hydra/sweeper=vitexp_optuna` (found by Hydra's plugin scan)."""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class VitexpOptunaSweeperConf:
    """A search; every key is documented in conf/hparams_search/vit_optuna.yaml."""

    _target_: str = "hydra_plugins.vitexp_optuna_sweeper.sweeper.VitexpOptunaSweeper"
    direction: Any = "maximize"
    objectives: list[str] = field(default_factory=lambda: ["best_val_top1"])
    study_name: str | None = None
    storage: str | None = None
    n_trials: int = 20
    n_jobs: int = 1
    max_failure_rate: float = 0.0
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    params: dict[str, str] | None = None
    enqueue: list[dict[str, Any]] = field(default_factory=list)


ConfigStore.instance().store(
    group="hydra/sweeper", name="vitexp_optuna", node=VitexpOptunaSweeperConf, provider="vitexp"
)
