"""The sweeper's config schema, `hydra/sweeper=vitexp_optuna` (found by Hydra's plugin scan)."""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class VitexpOptunaSweeperConf:
    """A search's keys; their values and what each means: conf/hydra/sweeper/vitexp_optuna.yaml."""

    _target_: str = "hydra_plugins.vitexp_optuna_sweeper.sweeper.VitexpOptunaSweeper"
    direction: Any = MISSING
    objectives: list[str] = MISSING
    study_name: str | None = MISSING
    storage: str | None = MISSING
    n_trials: int = MISSING
    n_jobs: int = MISSING
    max_failure_rate: float = MISSING
    sampler: dict[str, Any] = MISSING
    pruner: dict[str, Any] = MISSING
    params: dict[str, str] | None = MISSING
    enqueue: list[dict[str, Any]] = MISSING


ConfigStore.instance().store(
    group="hydra/sweeper", name="vitexp_optuna_schema", node=VitexpOptunaSweeperConf, provider="vitexp"
)
