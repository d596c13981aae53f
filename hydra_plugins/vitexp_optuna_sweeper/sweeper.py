"""Asks a persistent Optuna study for trials and hands them, `n_jobs` at a time, to the launcher.

The search space has the Optuna sweeper's syntax (`choice`, `range`, `interval`,
`tag(log, interval(...))`) in `hydra.sweeper.params` or on the command line. Each trial's
job learns its trial through `hydra.job.env_set` (vitexp.search.study), so the basic, joblib and
submitit launchers all carry it. Re-running the same command continues the study: finished
trials are kept, trials whose sweeper died are marked failed and asked again, and only the
missing ones run.
"""

import logging
from pathlib import Path

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from vitexp.search.study import (
    OWNER_ATTR,
    PARENT_ATTR,
    PRUNED_ATTR,
    RUN_ATTR,
    STORAGE_ENV,
    STUDY_ENV,
    TRIAL_ENV,
    Plan,
    grid_size,
    make_plan,
    open_study,
    owner,
    owner_alive,
)

log = logging.getLogger(__name__)
JOB_FAILED_ATTR = "vitexp.job_failed"


class VitexpOptunaSweeper(Sweeper):
    """Hydra's entry point; the settings are read from `hydra.sweeper` in `setup`."""

    def __init__(self, **settings) -> None:
        self.settings = settings
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        from vitexp.search.report import SearchLog  # matplotlib and MLflow: once the search runs

        plan = make_plan(self.config, arguments)
        study = open_study(plan)
        results = SearchLog(self.config, plan, Path(str(self.config.hydra.sweep.dir)) / "search")
        if results.parent:
            study.set_user_attr(PARENT_ATTR, results.parent)
        job_idx, launched, failures = len(study.trials), 0, 0
        retry_stale(study, results)
        for params in plan.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)
        total = plan.n_trials
        if plan.sampler["name"] == "grid":  # a grid ends when every point has run
            total = min(total, grid_size(plan.space))
        log.info(
            "study %s in %s: %d of %d trials done", plan.study_name, plan.storage_url, counted(study), total
        )
        while (todo := total - counted(study)) > 0:
            trials = [study.ask(plan.space) for _ in range(min(plan.n_jobs, todo))]
            for trial in trials:
                trial.set_user_attr(OWNER_ATTR, owner())
            returns = self.launcher.launch(
                [trial_overrides(plan, t) for t in trials], initial_job_idx=job_idx
            )
            job_idx += len(returns)
            launched += len(trials)
            failures += sum(tell(study, plan, t, r) for t, r in zip(trials, returns))
            results.progress(study)
            if failures > plan.max_failure_rate * launched:
                results.finish(study)
                raise RuntimeError(
                    f"{failures} of {launched} trials failed (hydra.sweeper.max_failure_rate="
                    f"{plan.max_failure_rate}); see the failed jobs' logs in {self.config.hydra.sweep.dir}"
                )
        results.finish(study)


def quote(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def trial_overrides(plan: Plan, trial) -> list[str]:
    """The job's overrides: the fixed ones, the trial's values, and where to report."""
    env = {STORAGE_ENV: plan.storage_url, STUDY_ENV: plan.study_name, TRIAL_ENV: str(trial.number)}
    return [
        *plan.fixed,
        *(f"{key}={value}" for key, value in trial.params.items()),
        *(f"++hydra.job.env_set.{k}={quote(v)}" for k, v in env.items()),
    ]


def counted(study) -> int:
    """Trials that count toward n_trials: finished, pruned, failed in their job, or running
    under a live sweeper (a parallel search on the same study)."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or t.user_attrs.get(JOB_FAILED_ATTR):
            n += 1
        elif t.state == TrialState.RUNNING and owner_alive(t.user_attrs.get(OWNER_ATTR)):
            n += 1
    return n


def retry_stale(study, results) -> None:
    """Trials left RUNNING by a killed sweeper: FAILED (study and MLflow) and asked again."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if owner_alive(t.user_attrs.get(OWNER_ATTR)):
            continue
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params)
        results.retried(t.number, t.user_attrs.get(RUN_ATTR), study.study_name)
        log.warning("trial %d was left running by a killed search: failed, and run again", t.number)


def tell(study, plan: Plan, trial, ret: JobReturn) -> bool:
    """Tells the study how the trial's job ended; True if it failed."""
    from optuna.trial import TrialState

    attrs = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number).user_attrs
    if ret.status != JobStatus.COMPLETED:
        trial.set_user_attr(JOB_FAILED_ATTR, f"{type(ret._return_value).__name__}: {ret._return_value}"[:500])
        study.tell(trial, state=TrialState.FAIL)
        log.warning("trial %d failed: %s", trial.number, ret._return_value)
        return True
    if attrs.get(PRUNED_ATTR):
        study.tell(trial, state=TrialState.PRUNED)
        return False
    values = [float(ret.return_value) if o == "best_val_top1" else float(attrs[o]) for o in plan.objectives]
    study.tell(trial, values=values)
    return False
