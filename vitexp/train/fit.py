"""Training and testing a built run: vitexp's callbacks, `fit` (resumed inside an epoch
too), the test split's scores, and what is recorded once training ends."""

import sys
from pathlib import Path

import numpy as np

from vitexp.data.augment import build_augment
from vitexp.data.pipeline import eval_dataset, predict_views, train_dataset
from vitexp.metrics import score_views
from vitexp.train.callbacks import (
    CheckpointDir,
    DivergenceGuard,
    EarlyStopping,
    EpochRecorder,
    ProfileSteps,
    SwapEMAWeights,
)
from vitexp.train.jobs import Job
from vitexp.train.preempt import STOP, StopAtStepEnd
from vitexp.train.record import log_pictures, record_training
from vitexp.train.resume import EndResumedEpoch


def training_callbacks(job: Job, checkpoints: CheckpointDir, extra=()) -> list:
    """vitexp's callbacks in the order they must run, then `extra`."""
    t = job.cfg.trainer
    recorder = EpochRecorder(
        job.tracker, job.run_id, job.schedule, job.steps * t.batch_size, checkpoints, job.in_epoch
    )
    callbacks = [DivergenceGuard(job.schedule), recorder]
    if job.model.optimizer.use_ema:  # validate and checkpoint the averaged weights
        callbacks.insert(1, SwapEMAWeights(restored=job.first_epoch > 0 and job.in_epoch is None))
    stop = t.early_stopping
    if stop.patience is not None:  # after EpochRecorder: it reads the committed metrics
        callbacks.append(EarlyStopping(checkpoints, stop.patience, str(stop.monitor), stop.min_delta))
    if t.profile:
        callbacks.append(ProfileSteps(job.out_dir / "profile", *t.profile_steps))
    if t.strategy == "multi_worker":  # workers train in lockstep: epoch checkpoints only
        return [*callbacks, *extra, StopAtStepEnd(strategy=job.model.distribute_strategy)]
    return [*callbacks, *extra, StopAtStepEnd(recorder)]


def fit(job: Job, callbacks: list) -> None:
    """Trains epochs `job.first_epoch ..`; a run resumed inside that epoch trains its
    remaining steps first, as a `fit` of their own, on the same batches it would have seen."""
    done = job.in_epoch["step"] if job.in_epoch else 0
    if done:
        fit_epochs(job, [*callbacks, EndResumedEpoch(job.cfg.trainer.epochs)], job.first_epoch, done)
    fit_epochs(job, callbacks, job.first_epoch + bool(done), 0)


def fit_epochs(job: Job, callbacks: list, first_epoch: int, done: int) -> None:
    t = job.cfg.trainer
    num_classes = job.cfg.data.num_classes
    stoppers = [c for c in callbacks if isinstance(c, EarlyStopping)]
    if first_epoch >= t.epochs or any(s.should_stop() for s in stoppers):
        return  # a resumed run that had already finished training (or stopped early)
    job.model.fit(
        train_dataset(
            *job.splits.train,
            num_classes,
            t.batch_size,
            t.seed,
            first_epoch,
            t.epochs,
            steps=job.steps,
            augment=build_augment(job.cfg.data.augment),
            skip=done,
        ),
        epochs=t.epochs,
        initial_epoch=first_epoch,
        steps_per_epoch=job.steps - done,
        validation_data=eval_dataset(*job.splits.val, num_classes, t.batch_size),
        shuffle=False,  # the dataset is already a seeded permutation per epoch
        callbacks=callbacks,
        verbose=t.verbose if t.verbose != 1 or sys.stdout.isatty() else 2,
    )


def test_scores(job: Job, checkpoint: Path) -> tuple[dict, dict, np.ndarray]:
    """Metrics of `checkpoint`'s weights, loaded into the job's model, on the mean of the
    test-time views' logits (`trainer.tta`; `top1_1view` too when there are several): on the
    held-out validation images, where a choice such as the views themselves is made, and on
    the test split, to report; and the test split's probabilities."""
    t = job.cfg.trainer
    job.model.load_weights(checkpoint)
    val, test = (
        score_views(predict_views(job.model, x, y, job.cfg.data.num_classes, t.batch_size, t.tta), y)
        for x, y in (job.splits.val, job.splits.test)
    )
    return val[0], *test


def fit_and_record(job: Job, extra_callbacks=()) -> dict:
    t = job.cfg.trainer
    checkpoints = CheckpointDir(job.out_dir / "checkpoints", keep=t.keep_checkpoints)
    callbacks = training_callbacks(job, checkpoints, extra_callbacks)
    monitor = job.tracker.monitor_system(job.run_id, resume=job.first_epoch > 0 or job.in_epoch is not None)
    try:
        fit(job, callbacks)
        STOP.check()  # an interrupt dropped in the last step's callbacks or after
        record_training(job, checkpoints)
        chosen = checkpoints.best if t.test_checkpoint == "best" else checkpoints.last
        sizes = f"{len(job.splits.test[0])} test and {len(job.splits.val[0])} validation images"
        tell(f"testing the {t.test_checkpoint} checkpoint on {sizes}")
        val, test, probs = test_scores(job, chosen)
    finally:
        monitor.finish()
    best, best_epoch = checkpoints.best_so_far()
    last_epoch = checkpoints.latest_epoch()
    job.tracker.log_metrics(job.run_id, {f"test_{k}": float(v) for k, v in test.items()}, step=last_epoch)
    test_epoch = best_epoch if chosen == checkpoints.best else last_epoch
    tested_val = {f"tested_val_{k}": float(v) for k, v in val.items()}
    job.tracker.log_metrics(job.run_id, tested_val, step=test_epoch)
    job.tracker.log_metrics(
        job.run_id,
        {"best_val_top1": best, "best_epoch": best_epoch, "test_epoch": test_epoch},
        step=last_epoch,
    )
    tell("drawing the curves" + (" and the report's pictures" if job.cfg.report.enabled else ""))
    log_pictures(job, probs)
    if job.cfg.tracking.log_checkpoints:
        tell("logging the checkpoints")
        for path in (checkpoints.best, checkpoints.last):
            job.tracker.log_artifact(job.run_id, path, "checkpoints")
    if job.cfg.tracking.log_model:
        tell("logging the model (MLflow Model with signature and input example)")
        job.tracker.settle()  # the model is logged at once, after every record kept back
        job.tracker.log_model(job.run_id, chosen, job.class_names, job.model, str(t.tta))
    return {
        "test": test,
        "tested_val": val,
        "best_val_top1": best,
        "best_epoch": best_epoch,
        "checkpoint": chosen,
    }


def tell(doing: str) -> None:
    """Says what a stretch of seconds without progress bars is spent on; an interrupt that was
    dropped in the stretch before is raised here."""
    STOP.check()
    print(f"vitexp: {doing}...", file=sys.stderr, flush=True)
