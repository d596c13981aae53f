"""A training job that runs as a trial of an Optuna search reports to the study every epoch.

The sweeper tells the job which trial it is through three environment variables (see
vitexp.search.study); the study's pruner, kept in the study, decides after each epoch whether
the trial is hopeless. A pruned trial stops at that epoch boundary and finishes normally
(evaluated, recorded, FINISHED in MLflow with the tags `vitexp.pruned` and
`vitexp.pruned_epoch`); the sweeper marks it PRUNED in the study.
"""

import os
import sys
import time

import keras

from vitexp.search.study import (
    PRUNED_ATTR,
    PRUNER_ATTR,
    RUN_ATTR,
    STORAGE_ENV,
    STUDY_ENV,
    TRIAL_ENV,
    build_pruner,
    open_storage,
    owner,
)
from vitexp.tracking import tag


def is_trial() -> bool:
    return bool(os.environ.get(TRIAL_ENV))


def trial_callbacks(tracker, run_id: str, monitor: str = "val_top1") -> list[keras.callbacks.Callback]:
    """The reporting callback when this job is a trial of a search; none otherwise."""
    if not is_trial():
        return []
    return [
        TrialReporter(
            os.environ[STORAGE_ENV],
            os.environ[STUDY_ENV],
            int(os.environ[TRIAL_ENV]),
            tracker,
            run_id,
            monitor,
        )
    ]


class TrialReporter(keras.callbacks.Callback):
    """Reports `monitor` to the trial after every epoch and stops training when it is pruned.

    Args:
        storage: the study's storage URL.
        study_name: the study.
        number: the trial's number in the study.
        tracker: the job's vitexp.tracking.Tracker.
        run_id: the job's MLflow run.
        monitor: the Keras log key reported (higher is better or worse as the study says).
    """

    def __init__(self, storage: str, study_name: str, number: int, tracker, run_id: str, monitor: str):
        super().__init__()
        import optuna

        self.storage = open_storage(storage)
        study_id = self.storage.get_study_id_from_name(study_name)
        self.trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, number)
        spec = self.storage.get_study_user_attrs(study_id).get(PRUNER_ATTR, {"name": "none"})
        self.study = optuna.load_study(study_name=study_name, storage=self.storage)
        self.study.pruner = build_pruner(spec, 0)
        self.single = len(self.study.directions) == 1
        self.trial = optuna.trial.Trial(self.study, self.trial_id)
        self.number, self.tracker, self.run_id, self.monitor = number, tracker, run_id, monitor
        self.started = time.monotonic()

    def on_train_begin(self, logs=None):
        self.trial.set_user_attr(RUN_ATTR, self.run_id)
        self.trial.set_user_attr("vitexp.job", owner())
        self.trial.set_user_attr("num_params", int(self.model.count_params()))
        self.tracker.set_tags(
            self.run_id,
            {tag.OPTUNA_TRIAL: str(self.number), tag.OPTUNA_STUDY: self.study.study_name},
        )

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        step = epoch + 1
        self.trial.set_user_attr("epochs", step)
        if not self.single:  # Optuna reports and prunes single-objective studies only
            return
        self.trial.report(float(value), step)
        if step < self.params.get("epochs", step) and self.trial.should_prune():
            self.trial.set_user_attr(PRUNED_ATTR, step)
            self.tracker.set_tags(self.run_id, {tag.PRUNED: "true", tag.PRUNED_EPOCH: str(step)})
            print(
                f"vitexp: trial {self.number} pruned after epoch {step} ({self.monitor} {value:.4f})",
                file=sys.stderr,
            )
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.trial.set_user_attr("train_time_s", round(time.monotonic() - self.started, 2))
