"""The speedrun end to end on real data, shortened: the figures are for `make speedrun`."""

import json
import re
import sys
from pathlib import Path

import pytest
from conftest import run_vitexp, runs_of

from vitexp.data.idx import DEBIAN_DIR

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not Path(DEBIAN_DIR).is_dir(), reason="install dataset-fashion-mnist")
def test_speedrun_times_every_seed_to_the_target(tmp_path, store):
    uri, client = store
    out = run_vitexp(
        [
            "--target",
            "0.4",
            "--seeds",
            "2",
            "--tracking-uri",
            uri,
            "--out",
            str(tmp_path / "sr"),
            "data.train_limit=1500",
            "data.test_limit=500",
            "trainer.epochs=2",
            "trainer.batch_size=64",  # 23 steps an epoch: ~0.65 test top-1 after two
            "depth=1",
            "report.enabled=false",
        ],
        tmp_path,
        module="vitexp.speedrun",
    )
    last = out.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"time_to_target_s=(\S+) accuracy=(\S+) seeds=2", last)
    assert match, last
    for seed in (0, 1):  # where each seed's output goes, and its progress while it trains
        assert (
            f"vitexp.speedrun: seed {seed} ({seed + 1} of 2) training; its log: {tmp_path / 'sr'}"
            in out.stderr
        )
        for epoch in (1, 2):
            assert re.search(
                rf"^vitexp\.speedrun: seed {seed}: epoch {epoch}/2: test top-1 0\.\d{{4}} "
                r"\(target 0\.4(, reached)?\) after \d+ s$",
                out.stderr,
                re.M,
            ), out.stderr
    report = json.loads((tmp_path / "sr" / "speedrun.json").read_text())
    assert report["target_split"] == "test" and report["machine"]["cores"] >= 1
    seeds = report["seeds"]
    assert [s["seed"] for s in seeds] == [0, 1] and all(s["status"] == "FINISHED" for s in seeds)
    for s in seeds:  # both reach 0.4, at an epoch, before their run ended
        assert s["epochs"] == 2 and s["images_per_s"] > 0 and s["test_top1"] >= 0.4
        assert 0 < s["time_to_target_s"] < s["wall_s"] and s["target_epoch"] in (1, 2)
        assert s["tta"] == "flip" and 0 < s["test_top1_1view"] <= 1  # the preset's test-time flips
        assert 0 < s["val_top1"] <= 1 and 0 < s["val_top1_1view"] <= 1  # where the flips are decided
    header, *rows = [line for line in out.stdout.splitlines() if line.split()[:1] in (["seed"], ["0"], ["1"])]
    assert header.split()[8:13] == ["val", "top-1", "1", "view", "test"], header
    for s, row in zip(seeds, rows):  # the table shows each seed's validation figures beside its test
        assert row.split()[5:7] == [f"{s['val_top1']:.4f}", f"{s['val_top1_1view']:.4f}"], row
    assert report["seeds_reached"] == 2
    mean = sum(s["time_to_target_s"] for s in seeds) / 2
    assert float(match.group(1)) == pytest.approx(mean, abs=0.05)
    assert float(match.group(2)) == pytest.approx(sum(s["test_top1"] for s in seeds) / 2, abs=5e-5)
    runs = runs_of(client, "speedrun")
    (parent,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") is None]
    children = [r for r in runs if r is not parent]
    assert {c.data.params["trainer.seed"] for c in children} == {"0", "1"}
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert parent.data.metrics["wall_s_mean"] > 0 and parent.data.params["machine.cpu"]
    assert parent.data.metrics["val_top1_mean"] == pytest.approx(sum(s["val_top1"] for s in seeds) / 2)
    history = client.get_metric_history(children[0].info.run_id, "target_top1")
    assert sorted(m.step for m in history) == [1, 2]  # the test split scored after each epoch
    one_view = client.get_metric_history(children[0].info.run_id, "target_top1_1view")
    assert sorted(m.step for m in one_view) == [1, 2]


@pytest.mark.skipif(not Path(DEBIAN_DIR).is_dir(), reason="install dataset-fashion-mnist")
def test_a_seed_that_misses_the_target_fails_the_command_and_names_its_log(tmp_path, store):
    uri, client = store
    out = run_vitexp(
        ["--target", "0.999", "--seeds", "1", "--tracking-uri", uri, "--out", str(tmp_path / "sr")]
        + [
            "data.train_limit=600",
            "data.test_limit=200",
            "trainer.epochs=1",
            "depth=1",
            "report.enabled=false",
        ],
        tmp_path,
        module="vitexp.speedrun",
        check=False,
    )
    assert out.returncode == 1, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("time_to_target_s=nan ")
    (parent,) = [r for r in runs_of(client, "speedrun") if r.data.tags.get("mlflow.parentRunId") is None]
    assert parent.info.status == "FAILED"
    line = out.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"vitexp\.speedrun: error: 1 of 1 seeds missed the target test top-1 0\.999: seed 0 \(FINISHED, "
        rf"test top-1 0\.\d{{4}}, log {re.escape(str(tmp_path / 'sr' / 'seed_0.log'))}\); "
        rf"the parent run {parent.info.run_id} is FAILED",
        line,
    ), line


def test_a_seeds_log_has_each_line_when_its_progress_shows(tmp_path, monkeypatch):
    """`tail -f speedrun/seed_0.log` follows the seed as it trains, not in 8 KB blocks."""
    from vitexp.tools import speedrun

    log = tmp_path / "seed_0.log"
    seen = []
    monkeypatch.setattr(speedrun, "say", lambda line: seen.append((line, log.read_text())))
    script = (
        "import time\n"
        "print('vitexp: building')\n"
        "print('vitexp: epoch 1/2: test top-1 0.5000 (target 0.9) after 1 s')\n"
        "time.sleep(0.5)\n"
        "print('vitexp: epoch 2/2: test top-1 0.6000 (target 0.9) after 2 s')\n"
    )
    speedrun.relay([sys.executable, "-c", script], {"PYTHONUNBUFFERED": "1"}, log, "seed 0: ")
    assert [line for line, _ in seen] == [
        "seed 0: epoch 1/2: test top-1 0.5000 (target 0.9) after 1 s",
        "seed 0: epoch 2/2: test top-1 0.6000 (target 0.9) after 2 s",
    ]
    first, second = (text for _, text in seen)
    assert first.splitlines() == [
        "vitexp: building",
        "vitexp: epoch 1/2: test top-1 0.5000 (target 0.9) after 1 s",
    ]
    assert second.endswith("after 2 s\n") and log.read_text() == second
