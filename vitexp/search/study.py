"""Optuna searches: the search space, the study every job can reach, and who owns its trials.

`hydra/sweeper=vitexp_optuna` (the `hparams_search=` presets) asks the study for trials and
hands them to any Hydra launcher. The study lives in a shared storage (by default a sqlite
file beside the tracking store), so a killed search continues where it stopped, parallel
and cluster jobs share it, and each trial's job reports its validation metric there every
epoch (vitexp.search.trial) for the pruner. No TensorFlow here: the command line checks a search
with it before anything runs.
"""

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vitexp.tracking import tag
from vitexp.tracking.uri import PROJECT_ROOT, sqlite_path

SWEEPER_TARGET = "hydra_plugins.vitexp_optuna_sweeper.sweeper.VitexpOptunaSweeper"
# How a trial's job finds its trial: set per job through hydra.job.env_set.
STORAGE_ENV = "VITEXP_OPTUNA_STORAGE"
STUDY_ENV = "VITEXP_OPTUNA_STUDY"
TRIAL_ENV = "VITEXP_OPTUNA_TRIAL"


def trial_tags() -> dict[str, str]:
    """A trial's job tags its MLflow run with the study and trial number when it creates it,
    so a search killed before the trial recorded its run id still finds the run."""
    if not os.environ.get(TRIAL_ENV):
        return {}
    return {tag.OPTUNA_TRIAL: os.environ[TRIAL_ENV], tag.OPTUNA_STUDY: os.environ.get(STUDY_ENV, "")}


# Study and trial attributes vitexp keeps in the storage.
FINGERPRINT_ATTR = "vitexp.search"
PARENT_ATTR = "vitexp.mlflow_parent"
PRUNER_ATTR = "vitexp.pruner"
OWNER_ATTR = "vitexp.owner"
RUN_ATTR = "vitexp.mlflow_run_id"
PRUNED_ATTR = tag.PRUNED_EPOCH  # a trial's attributes named as its MLflow run's tags
RETRIED_ATTR = tag.RETRIED
OBJECTIVES = ("best_val_top1", "num_params", "train_time_s")
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler", "cmaes": "CmaEsSampler"}
PRUNERS = {
    "none": "NopPruner",
    "median": "MedianPruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
}
NOT_FINGERPRINTED = ("tracking.", "resume=", "report.")


class SearchError(ValueError):
    """A search the user must change; the message is one line naming the fix."""


@dataclass
class Plan:
    """Everything a search needs, checked: built from the sweeper config and the command line."""

    space: dict[str, Any]  # key -> optuna distribution
    fixed: list[str]  # the command line's other overrides, as given
    directions: list[str]
    objectives: list[str]
    study_name: str
    storage_url: str
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    n_trials: int
    n_jobs: int
    max_failure_rate: float
    epochs: int
    enqueue: list[dict[str, Any]] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        body = {
            "space": {k: repr(v) for k, v in sorted(self.space.items())},
            "fixed": sorted(o for o in self.fixed if not o.lstrip("+~").startswith(NOT_FINGERPRINTED)),
            "directions": self.directions,
            "objectives": self.objectives,
            # which trials a pruner stopped shapes the study: another pruner is another search
            "pruner": self.pruner,
        }
        return json.dumps(body, sort_keys=True)


def is_search(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.sweeper._target_", default=None) == SWEEPER_TARGET


def make_plan(config: DictConfig, arguments: list[str]) -> Plan:
    """Parses and checks the search of `config` (with its hydra node) and command line `arguments`."""
    sweeper = config.hydra.sweeper
    params = [f"{k}={v}" for k, v in (sweeper.params or {}).items()]
    space, fixed = parse_space([*params, *arguments])
    if not space:
        raise SearchError("the search space is empty: give hydra.sweeper.params or key=choice(...) overrides")
    for key in space:
        if not key.startswith("+") and OmegaConf.select(config, key, default=KeyError) is KeyError:
            raise SearchError(f"search space key {key!r} is not in the config (`--cfg job` lists every key)")
    directions = _directions(sweeper.direction)
    objectives = list(sweeper.objectives)
    if len(objectives) != len(directions) or not set(objectives) <= set(OBJECTIVES):
        raise SearchError(
            f"hydra.sweeper.objectives={objectives} must name one of {list(OBJECTIVES)} per direction "
            f"({len(directions)} given)"
        )
    sampler = OmegaConf.to_container(sweeper.sampler)
    pruner = OmegaConf.to_container(sweeper.pruner)
    if len(directions) > 1 and pruner["name"] != "none":
        raise SearchError("pruning needs a single objective: set hydra.sweeper.pruner.name=none")
    choice = OmegaConf.select(config, "hydra.runtime.choices.hparams_search", default=None) or "search"
    plan = Plan(
        space=space,
        fixed=fixed,
        directions=directions,
        objectives=objectives,
        study_name="",
        storage_url=sweeper.storage or default_storage(config.tracking.uri),
        sampler=sampler,
        pruner=pruner,
        n_trials=int(sweeper.n_trials),
        n_jobs=max(1, int(sweeper.n_jobs)),
        max_failure_rate=float(sweeper.max_failure_rate),
        epochs=int(config.trainer.epochs),
        enqueue=OmegaConf.to_container(sweeper.enqueue),
    )
    digest = hashlib.sha256(plan.fingerprint.encode()).hexdigest()[:8]
    plan.study_name = sweeper.study_name or f"{choice}-{digest}"
    build_sampler(plan)  # fail now on a bad sampler or pruner, not after the first trial
    build_pruner(plan.pruner, plan.epochs)
    return plan


def _directions(direction: Any) -> list[str]:
    given = [direction] if isinstance(direction, str) else list(direction)
    bad = [d for d in given if d not in ("maximize", "minimize")]
    if bad or not given:
        raise SearchError(f"hydra.sweeper.direction={given}: use maximize or minimize (a list for several)")
    return given


def parse_space(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """`choice`, `range`, `interval` and `tag(log, interval(...))` overrides -> distributions."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:
        raise SearchError(f"cannot parse the search space: {str(err).strip().splitlines()[0]}") from None
    space, fixed = {}, []
    for ov in parsed:
        if ov.is_sweep_override():
            space[ov.get_key_element()] = distribution(ov)
        else:
            fixed.append(ov.input_line)
    return space, fixed


def distribution(ov) -> Any:
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    key = ov.get_key_element()
    if ov.is_choice_sweep() or (ov.is_range_sweep() and ov.value().shuffle):
        choices = list(ov.sweep_iterator(transformer=Transformer.encode))
        if not choices:
            raise SearchError(f"{key}: the choice is empty")
        return CategoricalDistribution(choices)
    value = ov.value()
    if ov.is_range_sweep():
        values = list(ov.sweep_iterator())
        if not values:
            raise SearchError(f"{key}=range({value.start}, {value.stop}, {value.step}) is empty")
        kind = FloatDistribution if any(isinstance(v, float) for v in values) else IntDistribution
        return kind(values[0], values[-1], step=value.step)
    start, end, log = value.start, value.end, "log" in value.tags
    if not start < end:
        raise SearchError(
            f"{key}=interval({start}, {end}) is empty: the first bound must be below the second"
        )
    if log and start <= 0:
        raise SearchError(f"{key}=tag(log, interval({start}, {end})): a log interval must start above 0")
    return FloatDistribution(start, end, log=log)  # Hydra's interval is real-valued; integers take range()


def default_storage(tracking_uri: str | None) -> str:
    """`optuna.db` beside a sqlite tracking store, else in the project.

    Not inside a SQL tracking store's own database: MLflow and Optuna both keep their schema
    version in a table named `alembic_version`. For a cluster give hydra.sweeper.storage
    (another database on that server, or a journal file on a shared disk).
    """
    db = sqlite_path(tracking_uri)
    return f"sqlite:///{(db.parent if db else PROJECT_ROOT) / 'optuna.db'}"


def open_storage(url: str):
    """An Optuna storage: a journal file (`*.log`, `*.journal`, `journal:PATH`) or a SQLAlchemy URL."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # vitexp reports the search itself
    try:
        if url.startswith("journal:") or url.endswith((".log", ".journal")):
            from optuna.storages.journal import JournalFileBackend

            path = url.removeprefix("journal:")
            Path(path).touch()
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SearchError(f"hydra.sweeper.storage={url} cannot be opened: {reason}") from None


def _build(module, names: dict[str, str], spec: dict[str, Any], what: str, **defaults):
    """The named sampler or pruner. Arguments that only another one takes (left by a preset
    when the name is overridden) are dropped; arguments none of them takes fail."""
    import inspect

    name = spec["name"]
    if name not in names:
        raise SearchError(f"hydra.sweeper.{what}.name={name}: use one of {', '.join(names)}")
    known = {p for n in names.values() for p in inspect.signature(getattr(module, n)).parameters}
    unknown = sorted(set(spec) - known - {"name"})
    if unknown:
        raise SearchError(f"hydra.sweeper.{what}.{unknown[0]}: no {what} takes this argument")
    cls = getattr(module, names[name])
    accepted = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in {**defaults, **spec}.items() if k in accepted}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise SearchError(f"hydra.sweeper.{what} ({name}): {err}") from None


def build_sampler(plan: Plan):
    import optuna

    extra = {}
    if plan.sampler["name"] == "grid":
        extra["search_space"] = grid_space(plan.space)
    sampler = _build(optuna.samplers, SAMPLERS, plan.sampler, "sampler", **extra)
    if isinstance(sampler, optuna.samplers.GridSampler):
        # Optuna's grid stops `study.optimize` once its last point is told, and raises where
        # the trials are asked and told outside it, as the sweeper does; the sweeper ends a
        # grid itself (its trials are capped at the grid's size).
        sampler.after_trial = lambda *args: None
    return sampler


def build_pruner(spec: dict[str, Any], epochs: int):
    import optuna

    extra = {"max_resource": epochs} if spec["name"] == "hyperband" else {}
    return _build(optuna.pruners, PRUNERS, spec, "pruner", **extra)


def grid_space(space: dict[str, Any]) -> dict[str, list]:
    """The values of each key a full grid would run; only choice() and range() have one."""
    from optuna.distributions import CategoricalDistribution

    grid = {}
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            grid[key] = list(dist.choices)
        elif getattr(dist, "step", None):
            n = round((dist.high - dist.low) / dist.step) + 1
            grid[key] = [dist.low + i * dist.step for i in range(n)]
        else:
            raise SearchError(f"{key}: a grid needs choice() or range(), not an interval")
    return grid


def grid_size(space: dict[str, Any]) -> int | None:
    try:
        sizes = [len(v) for v in grid_space(space).values()]
    except SearchError:
        return None
    total = 1
    for n in sizes:
        total *= n
    return total


def open_study(plan: Plan, create: bool = True):
    """The plan's study, created on first use; a study of another search under that name fails."""
    import optuna

    storage = open_storage(plan.storage_url)
    exists = plan.study_name in optuna.get_all_study_names(storage)
    if not exists and not create:
        return None
    study = optuna.create_study(
        study_name=plan.study_name,
        storage=storage,
        sampler=build_sampler(plan),
        directions=plan.directions,
        load_if_exists=True,  # exists, or a parallel search created it just now
    )
    if not exists:
        study.set_user_attr(FINGERPRINT_ATTR, plan.fingerprint)
    if study.user_attrs.get(FINGERPRINT_ATTR, plan.fingerprint) != plan.fingerprint:
        raise SearchError(
            f"study {plan.study_name!r} in {plan.storage_url} holds another search: give this one "
            "another hydra.sweeper.study_name (or leave it unset to name it after the search)"
        )
    if create:
        study.set_user_attr(PRUNER_ATTR, plan.pruner)
    return study


def plan_of(app, config_name: str, overrides: list[str]) -> Plan | None:
    """The search a command line asks for (None when it is no search); compose errors propagate.

    Args:
        app: the Hydra instance the command line composes with (vitexp.config.hydra_app).
        config_name: the primary config.
        overrides: the command line's overrides, hydra.* included.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    parser = OverridesParser.create(config_loader=app.config_loader)
    sweeps = {ov.input_line for ov in parser.parse_overrides(overrides) if ov.is_sweep_override()}
    config = app.compose_config(
        config_name,
        [a for a in overrides if a not in sweeps],
        run_mode=RunMode.RUN,
        with_log_configuration=False,
    )
    if not is_search(config):
        return None
    return make_plan(config, [a for a in overrides if not a.lstrip("+~").startswith("hydra.")])


def check(app, config_name: str, overrides: list[str]) -> None:
    """Checks the search of a command line before anything runs; raises SearchError."""
    plan = plan_of(app, config_name, overrides)
    if plan is not None and open_study(plan, create=False) is None:
        open_storage(plan.storage_url)


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(tag: str | None) -> bool:
    """Whether the sweeper process that asked for a trial still runs (unknown hosts: assumed)."""
    host, _, pid = (tag or ":").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return host != socket.gethostname() and bool(host)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resumed_parent(config: DictConfig, tracker) -> str | None:
    """The MLflow parent run of an interrupted search being re-run, reopened; else None."""
    if not is_search(config):
        return None
    try:
        study = open_study(make_plan(config, list(config.hydra.overrides.task)), create=False)
    except SearchError:
        return None  # the sweeper reports it
    parent = study.user_attrs.get(PARENT_ATTR) if study is not None else None
    if parent is None:
        return None
    run = tracker.get_run(parent)
    if run is None or run.experiment_id != tracker.experiment_id or not run.active:
        return None
    tracker.reopen(parent)
    return parent
