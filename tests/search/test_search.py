"""Optuna searches with vitexp's sweeper: bad input, resuming after a kill, pruning, sharing."""

import re
import signal
import socket
import subprocess

import numpy as np
import pytest
from conftest import TINY, compose, run_vitexp, runs_of, start_vitexp, wait_for
from omegaconf import OmegaConf

# the searched keys are given per test; TINY's depth is a search key in some of them
BASE = ["hparams_search=vit_optuna", *[a for a in TINY if not a.startswith(("depth=", "trainer.epochs"))]]


def search_args(tmp_path, *extra, store="mlflow.db"):
    """A search over the keys given in `extra` only (not the preset's), into stores in tmp_path."""
    return [
        *BASE,
        f"tracking.uri=sqlite:///{tmp_path / store}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *([] if any(e.startswith("+hydra.sweeper.params") for e in extra) else ["hydra.sweeper.params=null"]),
        *extra,
    ]


def load_study(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def search_runs(client):
    runs = runs_of(client)
    parents = [r for r in runs if r.data.tags.get("vitexp.sweep") == "true"]
    children = [r for r in runs if r not in parents]
    return parents, children


def test_search_space_syntax_of_the_optuna_sweeper():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from vitexp.search.study import grid_space, parse_space

    space, fixed = parse_space(
        [
            "a=choice(4,6,8)",
            "b=range(2,9,2)",
            "c=interval(0.1,1.0)",
            "d=tag(log,interval(1e-4,1e-2))",
            "e=interval(1,5)",
            "model=vit_tiny",
        ]
    )
    assert fixed == ["model=vit_tiny"]
    assert space["a"] == CategoricalDistribution([4, 6, 8])
    assert space["b"] == IntDistribution(2, 8, step=2)  # range's stop is excluded, as in Hydra's grid
    assert space["c"] == FloatDistribution(0.1, 1.0)
    assert space["d"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert space["e"] == FloatDistribution(1, 5)  # Hydra's interval is real-valued: integers take range()
    assert grid_space({k: space[k] for k in "ab"}) == {"a": [4, 6, 8], "b": [2, 4, 6, 8]}


# ---- bad input: one line before the first trial --------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["depth=choice(1,2)", "hydra.sweeper.sampler.name=annealing"],
            "hydra.sweeper.sampler.name=annealing: use one of tpe",
        ),
        (
            ["depth=choice(1,2)", "hydra.sweeper.pruner.name=patience"],
            "hydra.sweeper.pruner.name=patience: use one of none, median",
        ),
        (["+hydra.sweeper.params.no_such_key='choice(1,2)'"], "search space key 'no_such_key' is not in"),
        (["optimizer.learning_rate=interval(0.1,0.01)"], "interval(0.1, 0.01) is empty"),
        (
            ["depth=choice(1,2)", "hydra.sweeper.storage='sqlite:////no/such/folder/optuna.db'"],
            "cannot be opened",
        ),
        (
            [
                "depth=choice(1,2)",
                "hydra.sweeper.sampler.name=grid",
                "optimizer.learning_rate=interval(1e-4,1e-3)",
            ],
            "a grid needs choice() or range()",
        ),
    ],
    ids=["sampler", "pruner", "key", "empty-interval", "storage", "grid-interval"],
)
def test_bad_search_fails_in_one_line(tmp_path, capsys, extra, message):
    from vitexp.cli import preflight

    with pytest.raises(SystemExit) as exit_:
        preflight(search_args(tmp_path, *extra))
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and err.startswith("vitexp: error: ") and message in err, err


def test_two_searches_cannot_share_a_study_name(tmp_path, capsys):
    from vitexp.cli import preflight
    from vitexp.config import hydra_app
    from vitexp.search.study import open_study, plan_of

    args = search_args(tmp_path, "hydra.sweeper.study_name=mine")
    with hydra_app() as app:
        open_study(plan_of(app, "config", [*args, "depth=choice(1,2)"]))  # the first search's study
    preflight([*args, "depth=choice(1,2)"])  # the same search again is fine
    for other in (["depth=choice(1,3)"], ["depth=choice(1,2)", "hydra.sweeper.pruner.name=none"]):
        with pytest.raises(SystemExit):  # another space; the same space with another pruner
            preflight([*args, *other])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "study 'mine'" in err and "holds another search" in err, (other, err)


def test_a_search_with_another_pruner_gets_a_study_of_its_own(tmp_path):
    from vitexp.config import hydra_app
    from vitexp.search.study import plan_of

    args = [*search_args(tmp_path), "depth=choice(1,2)"]
    with hydra_app() as app:
        names = {plan_of(app, "config", [*args, f"hydra.sweeper.pruner.name={p}"]).study_name
                 for p in ("none", "median", "median")}  # fmt: skip
    assert len(names) == 2, names


def test_fashion_mnist_search_preset_plans_a_pruned_search(tmp_path):
    import optuna

    from vitexp.config import hydra_app
    from vitexp.search.study import build_pruner, plan_of

    args = ["experiment=vit_fashion_mnist_search", "hparams_search=vit_fashion_mnist",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]  # fmt: skip
    with hydra_app() as app:
        plan = plan_of(app, "config", args)
    assert set(plan.space) == {"patch_size", "depth", "model.projection_dim",
                               "optimizer.learning_rate", "optimizer.weight_decay"}  # fmt: skip
    assert (plan.n_trials, plan.epochs) == (12, 8)
    assert isinstance(build_pruner(plan.pruner, plan.epochs), optuna.pruners.SuccessiveHalvingPruner)
    assert plan.storage_url == f"sqlite:///{tmp_path}/optuna.db"


@pytest.mark.parametrize(
    "search, epochs, grid",
    [
        ("vit_fashion_mnist_speedrun", 8, None),
        ("vit_fashion_mnist_speedrun_augment", 12, 12),
        ("vit_fashion_mnist_speedrun_length", 12, 8),
    ],
    ids=["training", "augmentation", "length"],
)
def test_the_speedrun_recipe_lies_in_the_space_of_the_searches_that_chose_it(search, epochs, grid, tmp_path):
    """The speedrun preset's training settings, its augmentation and its length and depth are
    points of its searches (conf/hparams_search/), which choose on a validation split, not on
    the test split; the augmentation's and the length's are grids, each point run once."""
    from vitexp.config import hydra_app
    from vitexp.search.study import grid_size, plan_of

    args = ["experiment=vit_fashion_mnist_speedrun", f"hparams_search={search}",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]  # fmt: skip
    with hydra_app() as app:
        plan = plan_of(app, "config", args)
    assert plan.objectives[0] == "best_val_top1" and plan.epochs == epochs
    if grid:
        assert plan.sampler["name"] == "grid" and grid_size(plan.space) == plan.n_trials == grid
    searched = compose(args)
    assert searched.trainer.validation_split == 0.1 and searched.trainer.target_top1 is None
    preset = compose(["experiment=vit_fashion_mnist_speedrun"])
    for key, dist in plan.space.items():
        value = OmegaConf.select(preset, key)
        assert dist._contains(dist.to_internal_repr(value)), (key, value, dist)


def test_a_grid_is_asked_and_told_to_its_last_point(tmp_path):
    """The sweeper asks and tells trials outside `study.optimize`: the grid's last point is
    told like any other (Optuna's grid would stop an `optimize` loop there, and raise)."""
    import optuna

    from vitexp.config import hydra_app
    from vitexp.search.study import build_sampler, plan_of

    args = ["experiment=vit_fashion_mnist_speedrun", "hparams_search=vit_fashion_mnist_speedrun_augment",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]  # fmt: skip
    with hydra_app() as app:
        plan = plan_of(app, "config", args)
    study = optuna.create_study(sampler=build_sampler(plan), direction="maximize")
    for _ in range(plan.n_trials):
        trial = study.ask(plan.space)
        if trial.number % 2:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, 0.9)
    points = {tuple(sorted(t.params.items())) for t in study.trials}
    assert len(points) == len(study.trials) == 12  # every point of the grid, each once


def test_a_search_over_the_epochs_counts_each_trials_own_epochs_and_names_its_pareto_front(tmp_path):
    """The speedrun's length search (epochs x depth, accuracy against time): the epochs its
    trials would train unpruned, and a full grid's, are each trial's own, not the preset's."""
    import optuna

    from vitexp.config import hydra_app
    from vitexp.search.report import pareto_front, summary
    from vitexp.search.study import build_sampler, plan_of

    args = ["experiment=vit_fashion_mnist_speedrun", "hparams_search=vit_fashion_mnist_speedrun_length",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]  # fmt: skip
    with hydra_app() as app:
        plan = plan_of(app, "config", args)
    assert plan.epochs == 12 and plan.objectives == ["best_val_top1", "train_time_s"]
    study = optuna.create_study(sampler=build_sampler(plan), directions=plan.directions)
    for _ in range(3):
        trial = study.ask(plan.space)
        epochs, depth = trial.params["trainer.epochs"], trial.params["depth"]
        study.tell(trial, [0.9 + epochs / 1000, epochs * depth * 10.0])  # longer: better, slower
    m = summary(study, plan)
    assert m["epochs_unpruned"] == sum(t.params["trainer.epochs"] for t in study.trials)
    assert m["epochs_grid"] == 2 * (8 + 10 + 12 + 14)  # depth 2 and 3 at each length
    # a trial is on the front unless another is at least as good and as fast, and better in one
    values = {t.number: t.values for t in study.trials}
    beaten = {
        n for n, (v, s) in values.items()
        if any(v2 >= v and s2 <= s and (v2, s2) != (v, s) for v2, s2 in values.values())
    }  # fmt: skip
    assert pareto_front(study) == sorted(set(values) - beaten)


def test_bad_search_from_the_command_line(tmp_path):
    args = search_args(tmp_path, "depth=choice(1,2)", "hydra.sweeper.pruner.name=patience")
    out = run_vitexp(args, tmp_path, check=False)
    assert out.returncode == 2
    expected = "hydra.sweeper.pruner.name=patience: use one of none, median, successive_halving, hyperband"
    assert out.stderr.strip().splitlines() == [f"vitexp: error: {expected}"]
    assert not (tmp_path / "mlflow.db").exists()  # nothing recorded


# ---- end to end ----------------------------------------------------------------------


@pytest.mark.slow
def test_killed_search_continues_under_the_same_parent(tmp_path, store):
    import optuna

    uri, client = store
    args = search_args(
        tmp_path,
        "trainer.epochs=1",
        "depth=choice(1,2)",
        "patch_size=choice(2,4)",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.pruner.name=none",
    )
    proc = start_vitexp(args, tmp_path)
    complete = (optuna.trial.TrialState.COMPLETE,)
    # the sweep folder appears with the first job, after both stores exist (no race creating them)
    wait_for(
        lambda: (tmp_path / "sweep").exists() and len(load_study(tmp_path).get_trials(states=complete)) >= 2,
        proc,
        timeout=400,
        poll=0.5,
        what="two complete trials",
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (parent,) = search_runs(client)[0]

    out = run_vitexp(args, tmp_path)
    states = [t.state.name for t in load_study(tmp_path).trials]
    assert states.count("COMPLETE") == 3, states
    assert set(states) <= {"COMPLETE", "FAIL"}  # FAIL: a trial the kill cut short, run again
    parents, children = search_runs(client)
    assert [p.info.run_id for p in parents] == [parent.info.run_id]  # one parent, continued
    assert parents[0].info.status == "FINISHED"
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 3  # the two trials finished before the kill were not trained again
    assert all(c.data.tags.get("vitexp.retried") == "true" for c in children if c not in finished)
    done = re.search(r"(\d) of 3 trials done", out.stdout + out.stderr)
    assert done and done.group(1) in "23"  # counted from the study, not trained again
    assert client.get_run(parent.info.run_id).data.metrics["trials_complete"] == 3


@pytest.mark.slow
def test_pruner_stops_a_planted_bad_trial_and_the_parent_shows_it(tmp_path, store):
    uri, client = store
    good, bad = 0.25, 1000.0  # noise drowning the synthetic classes: val top-1 stays at chance
    enqueue = (  # two good trials first, then the bad one
        f"hydra.sweeper.enqueue=[{{patch_size:2,depth:1,data.noise:{good}}},"
        f"{{patch_size:4,depth:2,data.noise:{good}}},{{patch_size:4,depth:1,data.noise:{bad}}}]"
    )
    run_vitexp(
        search_args(
            tmp_path,
            "trainer.epochs=2",
            "depth=choice(1,2)",
            "patch_size=choice(2,4)",
            f"data.noise=choice({good},{bad})",
            "hydra.sweeper.n_trials=3",
            enqueue,
            "hydra.sweeper.pruner.n_startup_trials=2",
            "hydra.sweeper.pruner.n_warmup_steps=0",
        ),
        tmp_path,
    )
    trials = load_study(tmp_path).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert sorted(trials[2].intermediate_values) == [1]  # stopped at the first epoch boundary
    (parent,), children = search_runs(client)
    (pruned,) = [c for c in children if c.data.tags.get("vitexp.pruned") == "true"]
    assert pruned.info.status == "FINISHED" and pruned.data.tags["vitexp.pruned_epoch"] == "1"
    assert pruned.data.params["data.noise"] == str(bad)
    m = parent.data.metrics
    assert (m["trials_complete"], m["trials_pruned"], m["trials_failed"]) == (2, 1, 0)
    assert (m["epochs_spent"], m["epochs_unpruned"], m["epochs_grid"]) == (5, 6, 16)
    assert parent.data.metrics["best_value"] == pytest.approx(
        max(t.value for t in trials if t.value is not None)
    )
    # the pictures and the table, on the parent run
    local = client.download_artifacts(parent.info.run_id, "search", str(tmp_path / "got"))
    for stem in ("optimization_history", "param_importances", "slice", "contour"):
        picture = __import__("matplotlib.image").image.imread(f"{local}/{stem}.png")
        rgb = picture[..., :3]
        assert picture.shape[0] > 300 and np.std(rgb) > 0.05, stem  # not blank
        assert ((rgb.max(-1) - rgb.min(-1)) > 0.25).sum() > 500, stem  # coloured data marks, not bare axes
    table = (tmp_path / "got" / "search" / "trials.csv").read_text()
    assert table.count("PRUNED") == 1 and table.count("COMPLETE") == 2
    compared = run_vitexp(
        [parent.info.run_id, "--out", str(tmp_path / "cmp"), "--tracking-uri", uri],
        tmp_path,
        module="vitexp.compare",
    )
    header, *rows = (tmp_path / "cmp" / "comparison.csv").read_text().strip().splitlines()
    assert header.endswith(",pruned_epoch") and sum(row.endswith(",1") for row in rows) == 1
    assert "pruned_epoch" in compared.stdout


def test_a_trial_killed_before_it_recorded_its_run_is_failed_and_asked_again(tmp_path, store, monkeypatch):
    """A search killed in the seconds between a trial's MLflow run being created and the trial
    recording its run id: the continued search still finds that run (by the trial tags it was
    created with), marks it FAILED and retried, and asks the trial again."""
    import optuna
    from conftest import compose

    from hydra_plugins.vitexp_optuna_sweeper.sweeper import retry_stale
    from vitexp.search.report import SearchLog
    from vitexp.search.study import OWNER_ATTR, STUDY_ENV, TRIAL_ENV
    from vitexp.tracking import PARENT_ENV, Tracker, tag
    from vitexp.train.record import run_tags

    uri, client = store
    cfg = compose([*TINY, f"tracking.uri={uri}"])
    tracker = Tracker.from_config(cfg.tracking)
    parent = tracker.start_run("search", {tag.SWEEP: "true"}, None)
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}")
    trial = study.ask()
    trial.suggest_int("depth", 1, 2)
    gone = subprocess.Popen(["true"])
    gone.wait()
    trial.set_user_attr(OWNER_ATTR, f"{socket.gethostname()}:{gone.pid}")  # the killed sweeper
    # the trial's job created its run as every job does, then the kill came
    monkeypatch.setenv(TRIAL_ENV, str(trial.number))
    monkeypatch.setenv(STUDY_ENV, "s")
    child = tracker.start_run("job", run_tags(cfg, tmp_path), parent)
    other = tracker.start_run("another study's job", {tag.OPTUNA_STUDY: "t", tag.OPTUNA_TRIAL: "0"}, parent)

    monkeypatch.setenv(PARENT_ENV, parent)
    retry_stale(study, SearchLog(cfg, None, tmp_path))
    run = client.get_run(child)
    assert run.info.status == "FAILED" and run.data.tags[tag.RETRIED] == "true"
    assert client.get_run(other).info.status == "RUNNING"  # only the killed trial's own run
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]  # asked again
    assert study.trials[1].system_attrs["fixed_params"] == {"depth": trial.params["depth"]}
