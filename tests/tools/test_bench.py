"""The benchmark runs end to end (its figures are for `make bench`, never asserted here)."""

import json
import re

import pytest
from conftest import run_vitexp

from vitexp.machine import ISA_FLAGS, cpu_info
from vitexp.train.devices import choose_precision

pytestmark = pytest.mark.slow


def test_bench_runs_and_reports(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = run_vitexp(
        [
            "--model",
            "vit_tiny",
            "--steps",
            "4",
            "--images",
            "1000",
            "--best-batch-factor",
            "2",
            "--out",
            str(tmp_path / "bench"),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        tmp_path,
        module="vitexp.bench",
        env={"TMPDIR": str(scratch)},
    )
    # each worker's run folder (checkpoints of every epoch) and store went with the worker
    assert not list(scratch.iterdir())
    last = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"speedup_same_batch=\d+\.\d\d speedup_best=\d+\.\d\d bf16_over_fp32=\d+\.\d\d", last)
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert set(report["results"]) == {"textbook", "vitexp", "vitexp_bf16", "vitexp_best"}
    # the best settings: auto's precision at twice the batch, the learning rate scaled alike
    assert {"trainer.batch_size=128", "trainer.precision=auto"} <= set(report["best_overrides"])
    assert "optimizer.learning_rate=0.002" in report["best_overrides"]
    # both precisions side by side; the best row trains in what auto chooses for this model here
    results = report["results"]
    assert (results["vitexp"]["precision"], results["vitexp_bf16"]["precision"]) == (
        "float32",
        "mixed_bfloat16",
    )
    gflop = report["train_flops_per_image"] / 1e9
    auto = choose_precision("auto", model_gflop=lambda: gflop)
    assert [report["auto"]["precision"], report["auto"]["reason"]] == list(auto)
    assert results["vitexp_best"]["precision"] == auto[0] and report["best"] == "vitexp_best"
    assert f"* trainer.precision=auto: {auto[0]} ({auto[1]})" in out.stdout
    machine = report["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and f"{machine['cores']} cores" in out.stdout
    assert set(machine["isa"]) <= set(ISA_FLAGS)
    assert ("avx2" in machine["isa"]) == ("avx2" in cpu_info()["flags"])
    for result in report["results"].values():
        assert result["images_per_s"] > 0 and result["peak_rss_mb"] > 0 and len(result["loss_per_epoch"]) == 2
        assert result["train_images_per_s"] > result["images_per_s"]  # validation costs time
        assert 1 < result["first_step_s"] < 600  # from the worker process's start: imports included
        # every configuration validates on the same held-out 20% of the same 1,000 images
        assert result["val_images"] == 200
        assert result["first_step_mb"] > 0  # the first step allocates its activations
    assert report["train_flops_per_image"] > 1e6 and report["peak_gflops"]["float32"] > 0


@pytest.mark.parametrize(
    "args, line",
    [
        (["--steps", "0"], "vitexp.bench: error: argument --steps: '0': use a whole number of at least 1"),
        (
            ["--override", "trainer.precision=autoo"],
            "vitexp.bench: error: trainer.precision=autoo: use one of float32, mixed_bfloat16, mixed_float16",
        ),
        (["--model", "vitt"], "vitexp.bench: error: model=vitt: no such option in group model; use one of: "),
    ],
    ids=["steps", "override", "model"],
)
def test_a_mistake_ends_in_one_line_before_any_worker(args, line, tmp_path, capsys):
    from vitexp.tools.bench import main

    with pytest.raises(SystemExit) as stop:
        main([*args, "--out", str(tmp_path / "bench")])
    assert stop.value.code == 2
    (said,) = capsys.readouterr().err.strip().splitlines()
    assert said.startswith(line)
    assert not (tmp_path / "bench").exists()  # no worker started, nothing written
