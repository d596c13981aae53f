"""What a training job records in MLflow besides its per-epoch metrics: tags, params,
config, model summary, curves, pictures and the closing summary."""

import os
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from vitexp.provenance import command_line, git_commit
from vitexp.report.run import plot_curves, write_report
from vitexp.search.study import owner, trial_tags
from vitexp.tracking import Tracker, flatten, source_tags, tag
from vitexp.train.callbacks import CheckpointDir
from vitexp.train.jobs import Job, Splits
from vitexp.train.resume import config_hash


def run_tags(cfg: DictConfig, out_dir: Path) -> dict[str, str]:
    job = HydraConfig.get().job.name if HydraConfig.initialized() else "vitexp"
    commit = git_commit()
    return {
        tag.COMMAND: command_line(),
        tag.GIT_COMMIT: commit,
        tag.HYDRA_JOB: job,
        tag.OUTPUT_DIR: str(out_dir),
        tag.PROCESS: owner(),
        tag.CONFIG_HASH: config_hash(cfg),
        tag.MODEL: cfg.model.name,
        tag.DATA: cfg.data.name,
        **source_tags(commit),
        "version.tensorflow": tf.__version__,
        "version.keras": keras.__version__,
        "version.python": sys.version.split()[0],
        **trial_tags(),
    }


# Top-level shortcuts that every model reads into `model.patch_size` and `model.depth`
SHORTCUTS = ("patch_size", "depth")


def config_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as flat params, each value once: a shortcut (`patch_size=4`) is
    recorded only as the model key it sets (`model.patch_size`)."""
    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    return {k: v for k, v in params.items() if k not in SHORTCUTS}


def log_setup(tracker: Tracker, run_id: str, cfg: DictConfig, model, splits: Splits, out_dir: Path):
    params = config_params(cfg)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    params.update(
        {
            "num_params": str(model.count_params()),
            "trainable_params": str(trainable),
            "train_images": str(len(splits.train[0])),
            "val_images": str(len(splits.val[0])),
            "test_images": str(len(splits.test[0])),
            "precision": keras.mixed_precision.global_policy().name,
            # what trainer.jit_compile=auto became: Keras turns XLA on with a GPU, off on the CPU
            "xla": str(bool(model.jit_compile)),
        }
    )
    tracker.log_params(run_id, params)
    source = str(cfg.data.get("path") or cfg.data._target_)
    inputs = {"training": splits.train, "validation": splits.val, "test": splits.test}
    tracker.log_datasets(run_id, cfg.data.name, source, inputs)
    config_dir = out_dir / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, config_dir / "config.yaml", resolve=True)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    OmegaConf.save(OmegaConf.create(overrides), config_dir / "overrides.yaml")
    tracker.log_artifact(run_id, config_dir / "config.yaml", "config")
    tracker.log_artifact(run_id, config_dir / "overrides.yaml", "config")
    (out_dir / "model_summary.txt").write_text(summary_text(model))
    tracker.log_artifact(run_id, out_dir / "model_summary.txt")


def summary_text(model, width: int = 120) -> str:
    """`model.summary()` with every column whole: Keras prints through rich, which crops the
    table to the terminal's width (80 columns when there is none), cutting off `Param #`."""
    lines: list[str] = []
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        model.summary(print_fn=lambda text, **_: lines.append(text), line_length=width)
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    return "\n".join(lines).rstrip("\n") + "\n"


def record_training(job: Job, checkpoints: CheckpointDir) -> None:
    """Where training ended: the early stop's epoch, and the profiler trace."""
    t = job.cfg.trainer
    if t.early_stopping.patience is not None and checkpoints.latest_epoch() < t.epochs:
        stopped = checkpoints.latest_epoch()
        job.tracker.log_metrics(job.run_id, {"stopped_epoch": stopped}, step=stopped)
        job.tracker.set_tags(job.run_id, {tag.STOPPED_EARLY: "true"})
    if t.profile and (job.out_dir / "profile").is_dir():
        job.tracker.log_artifacts(job.run_id, job.out_dir / "profile", "profile")


def log_pictures(job: Job, probs: np.ndarray) -> None:
    """The training curves, from the metrics every epoch committed beside its checkpoint
    (those of a resumed run's earlier processes too), and the report's pictures."""
    keys = [f"{s}_{m}" for s in ("train", "val") for m in ("loss", "top1", "top5")]
    history = CheckpointDir(job.out_dir / "checkpoints").history(keys)
    curves = plot_curves(history, job.out_dir / "curves.png", job.cfg.run_name)
    job.tracker.log_artifact(job.run_id, curves)
    if job.cfg.report.enabled:
        pictures = write_report(
            job.model,
            job.cfg,
            *job.splits.train,
            *job.splits.test,
            probs,
            job.class_names,
            job.out_dir / "report",
        )
        for path in pictures:
            job.tracker.log_artifact(job.run_id, path, "report")


def print_summary(cfg, tracker: Tracker, run_id: str, result: dict) -> None:
    test, val = result["test"], result["tested_val"]
    ui = tracker.ui_command() or f"open {tracker.uri}"

    def views(scores: dict) -> str:
        if "top1_1view" not in scores:
            return ""
        return f" ({cfg.trainer.tta} test-time views; one view {scores['top1_1view']:.4f})"

    tested = (  # unless it is the best epoch's figure again
        f"; the tested checkpoint's {val['top1']:.4f}{views(val)}"
        if cfg.trainer.test_checkpoint != "best" or "top1_1view" in val
        else ""
    )
    print(
        f"\nvitexp: run {cfg.run_name} ({run_id}) finished\n"
        f"  test top-1 {test['top1']:.4f}  top-5 {test['top5']:.4f}  loss {test['loss']:.4f}{views(test)}\n"
        f"  best val top-1 {result['best_val_top1']:.4f} at epoch {result['best_epoch']}{tested}\n"
        f"  checkpoint {result['checkpoint']}\n"
        f"  tracking {tracker.uri} (experiment {tracker.experiment}); open the UI with: {ui}\n"
        f"  then {tracker.ui_link(run_id)}"
    )
