"""The sweep's parent run and its children (vitexp.search.sweep), in-process on a real sqlite store.

Jobs are runs started under the parent the callback hands them through the environment, as
training jobs are; no training.
"""

import json
import os
import re

import pytest
from omegaconf import OmegaConf

from vitexp.search.sweep import MlflowSweepCallback
from vitexp.tracking import FAILED, FINISHED, PARENT_ENV, Tracker


@pytest.fixture
def sweep(shared_store, tmp_path, monkeypatch, request):
    """A sweep's config (its own experiment), its tracker and a client: (config, tracker, client)."""
    monkeypatch.delenv(PARENT_ENV, raising=False)
    uri, client = shared_store
    experiment = re.sub(r"\W+", "-", request.node.name)
    config = OmegaConf.create(
        {
            "tracking": {"uri": uri, "experiment": experiment, "timeout_s": 5},
            "model": {"name": "vit_tiny"},
            "hydra": {"sweep": {"dir": str(tmp_path / "multirun")}, "overrides": {"task": ["depth=1,2"]}},
        }
    )
    return config, Tracker(uri, experiment), client


def job(tracker: Tracker, name: str, status: str, tags=None) -> str:
    """A job of the running sweep, ended with `status`."""
    run_id = tracker.start_run(name, tags or {}, parent_id=os.environ[PARENT_ENV])
    tracker.log_params(run_id, {"depth": name[-1], "num_params": "100"})
    tracker.log_metrics(run_id, {"best_val_top1": 0.5, "test_top1": 0.4, "test_top5": 0.9}, step=1)
    tracker.end_run(run_id, status)
    return run_id


def test_jobs_run_under_one_parent_that_finishes_with_them(sweep, capsys):
    config, tracker, client = sweep
    callback = MlflowSweepCallback()
    callback.on_multirun_start(config)
    parent = callback.parent_id
    kids = {job(tracker, f"job-{d}", FINISHED) for d in (1, 2)}
    callback.on_multirun_end(config)
    assert {r.id for r in tracker.children(parent)} == kids
    run = client.get_run(parent)
    assert run.info.status == FINISHED and run.data.tags["vitexp.sweep"] == "true"
    assert run.data.params["sweep.overrides"] == "depth=1,2"
    assert "comparison/comparison.csv" in {a.path for a in client.list_artifacts(parent, "comparison")}
    err = capsys.readouterr().err
    assert f"vitexp: sweep {parent}: 2 FINISHED" in err
    assert f"(after: mlflow ui --backend-store-uri {tracker.uri})" in err
    assert PARENT_ENV not in os.environ


def test_a_failed_job_fails_the_parent_and_the_sweep(sweep, capsys):
    config, tracker, client = sweep
    callback = MlflowSweepCallback()
    callback.on_multirun_start(config)
    parent = callback.parent_id
    job(tracker, "job-1", FINISHED)
    bad = job(tracker, "job-2", FAILED, {"vitexp.error": "data.path: no such folder\nmore"})
    with pytest.raises(SystemExit) as exit_:
        callback.on_multirun_end(config)
    assert exit_.value.code == 1 and client.get_run(parent).info.status == FAILED
    err = capsys.readouterr().err
    assert "1 of 2 jobs failed" in err and "job-2: data.path: no such folder" in err
    assert client.get_run(bad).info.status == FAILED


def test_a_retried_failure_does_not_fail_the_parent(sweep):
    config, tracker, client = sweep
    callback = MlflowSweepCallback()
    callback.on_multirun_start(config)
    parent = callback.parent_id
    job(tracker, "job-1", FAILED, {"vitexp.retried": "true"})  # a search ran the trial again
    job(tracker, "job-1", FINISHED)
    callback.on_multirun_end(config)
    assert client.get_run(parent).info.status == FINISHED


def test_a_sweep_cut_short_leaves_its_parent_failed(sweep):
    config, tracker, client = sweep
    callback = MlflowSweepCallback()
    callback.on_multirun_start(config)
    parent = callback.parent_id
    job(tracker, "job-1", FINISHED)
    callback.close(interrupted=True)  # what the exit hook does after Ctrl-C
    callback.close(interrupted=True)  # and only once
    assert client.get_run(parent).info.status == FAILED


def test_the_same_sweep_run_again_fails_the_parent_a_kill_left_running(sweep):
    config, tracker, client = sweep
    killed = MlflowSweepCallback()
    killed.on_multirun_start(config)  # then the process died: no end, no exit hook
    stale = killed.parent_id
    killed.parent_id = None  # its exit hook never runs
    again = MlflowSweepCallback()
    again.on_multirun_start(config)
    parent = again.parent_id
    run = client.get_run(stale)
    assert run.info.status == FAILED and run.data.tags["vitexp.superseded_by"] == parent
    assert client.get_run(parent).info.status == "RUNNING"
    again.close(interrupted=False)
    assert client.get_run(parent).info.status == FINISHED


def scored(tracker: Tracker, depth: int, status: str, val: float, test: float, tags=None) -> str:
    """A job of depth `depth` with its best validation and test top-1."""
    run_id = tracker.start_run(f"d{depth}", tags or {}, parent_id=os.environ[PARENT_ENV])
    tracker.log_params(run_id, {"model.depth": str(depth), "model.dim": "32", "num_params": "100"})
    tracker.log_metrics(run_id, {"best_val_top1": val, "test_top1": test}, step=1)
    tracker.end_run(run_id, status)
    return run_id


def test_the_parent_tells_the_winners_one_view_test_score_beside_its_test_time_views(sweep):
    """A search compares trials on one view, while each trial's test split is scored with its
    test-time views (`trainer.tta`): the parent gives both, so a winner that was scored with
    views it did not train on shows what one view made of it."""
    config, tracker, client = sweep
    callback = MlflowSweepCallback()
    callback.on_multirun_start(config)
    parent = callback.parent_id
    viewed = scored(tracker, 1, FINISHED, 0.92, 0.90)
    tracker.log_metrics(viewed, {"test_top1_1view": 0.921}, step=1)
    scored(tracker, 2, FINISHED, 0.91, 0.915)
    callback.on_multirun_end(config)
    run = client.get_run(parent)
    assert run.data.metrics["best_test_top1"] == 0.90 and run.data.metrics["best_test_top1_1view"] == 0.921
    assert "test top-1 0.9000 (one view 0.9210) (2 finished" in run.data.tags["mlflow.note.content"]


def test_the_parent_answers_the_sweep_and_its_link_opens_the_jobs_table(sweep, capsys):
    config, tracker, client = sweep
    callback = MlflowSweepCallback()
    callback.on_multirun_start(config)
    parent = callback.parent_id
    jobs = [
        scored(tracker, 1, FINISHED, 0.5, 0.45),
        best := scored(tracker, 2, FINISHED, 0.7, 0.65),
        scored(tracker, 3, FINISHED, 0.3, 0.2, {"vitexp.pruned_epoch": "1"}),
        scored(tracker, 4, FAILED, 0.9, 0.9),  # a failed job's scores do not count
    ]
    with pytest.raises(SystemExit):  # one job failed
        callback.on_multirun_end(config)
    run = client.get_run(parent)
    assert run.data.metrics == {
        "best_val_top1": 0.7,
        "best_test_top1": 0.65,
        "trials_finished": 2,
        "trials_failed": 1,
        "trials_pruned": 1,
    }
    assert run.data.tags["best.run_id"] == best and run.data.tags["best.model.depth"] == "2"
    assert "best.model.dim" not in run.data.tags  # the same in every job: not swept
    note = "Best: d2 (model.depth=2): val top-1 0.7000, test top-1 0.6500 (2 finished, 1 failed, 1 pruned)."
    assert run.data.tags["mlflow.note.content"] == note
    err = capsys.readouterr().err
    assert f"  {note}\n" in err
    experiment = tracker.experiment_id
    link = f"http://127.0.0.1:5000/#/experiments/{experiment}/runs?viewStateShareKey=sweep-{parent}&"
    assert f"  UI: {link}workflowType=machine_learning (after: mlflow ui" in err
    # the runs table's state that the link opens, as MLflow's UI reads it
    view = json.loads(client.get_experiment(experiment).tags[f"mlflow.sharedViewState.sweep-{parent}"])
    listed = re.fullmatch(r"attributes\.run_id IN \((.*)\)", view["searchFilter"])[1]
    assert sorted(listed.split(", ")) == sorted(f"'{r}'" for r in [parent, *jobs])
    assert view["orderByKey"] == "metrics.`best_val_top1`" and view["orderByAsc"] is False
    assert view["selectedColumns"] == [
        "params.`model.depth`",
        "metrics.`best_val_top1`",
        "metrics.`test_top1`",
        "metrics.`best_test_top1`",
        "tags.`best.model.depth`",
    ]
