"""Real `python -m vitexp` processes into a temporary sqlite MLflow store, read back."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import TINY, compose, run_vitexp, runs_of

from vitexp.data.idx import DEBIAN_DIR
from vitexp.quiet import has_nvidia_device, noise_pattern

pytestmark = pytest.mark.slow


def metric_steps(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_single_run_records_everything(tmp_path, store, capsys):
    uri, client = store
    proc = run_vitexp(
        [*TINY, "report.enabled=true", f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path
    )
    (run,) = runs_of(client)
    assert run.info.status == "FINISHED" and run.info.run_name == "vit_tiny-p4-d1-synthetic"
    assert run.info.run_id in proc.stdout and "test top-1" in proc.stdout
    # no start-up chatter from TensorFlow's native code or MLflow's new-store notice
    assert not noise_pattern(has_nvidia_device()).search(proc.stderr), proc.stderr[:2000]
    assert "Creating initial MLflow database tables" not in proc.stderr

    params = run.data.params
    assert params["model.depth"] == "1" and params["trainer.epochs"] == "3"
    assert params["model.transformer_units"] == "[64, 32]"
    assert int(params["trainable_params"]) > 1000 and params["trainer.test_checkpoint"] == "best"
    # the CPU default of trainer.jit_compile=auto, and the precision set (auto's choice and
    # its reason for each kind of machine: tests/test_devices.py)
    assert params["trainer.jit_compile"] == "auto" and params["xla"] == "False"
    assert (params["precision"], params["precision_reason"]) == ("float32", "set by trainer.precision")
    for key in ("train_loss", "val_loss", "train_top1", "val_top1", "train_top5", "val_top5", "lr"):
        assert [s for s, _ in metric_steps(client, run.info.run_id, key)] == [1, 2, 3], key
    lrs = [v for _, v in metric_steps(client, run.info.run_id, "lr")]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9) and max(lrs) > 0  # the schedule ends at 0
    for key in ("test_loss", "test_top1", "test_top5", "best_val_top1"):
        assert key in run.data.metrics
    tags = run.data.tags
    assert "vitexp.git_commit" in tags and "depth=1" in tags["vitexp.command"]

    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl")))
    for name in (
        "config/config.yaml",
        "config/overrides.yaml",
        "curves.png",
        "model_summary.txt",
        "checkpoints/best.keras",
        "checkpoints/last.keras",
    ):
        assert (artifacts / name).is_file(), name
    assert (artifacts / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "- depth=1" in (artifacts / "config/overrides.yaml").read_text()

    import keras

    from vitexp.data import load_data
    from vitexp.models import load_model

    model = load_model(str(artifacts / "checkpoints/best.keras"))  # trainer.test_checkpoint
    data = load_data(compose(TINY).data)  # the run's own data
    model.compile(metrics=[keras.metrics.SparseCategoricalAccuracy()], loss="sparse_categorical_crossentropy")
    accuracy = model.evaluate(data.test_x, data.test_y, verbose=0, return_dict=True)[
        "sparse_categorical_accuracy"
    ]
    assert accuracy == pytest.approx(run.data.metrics["test_top1"], abs=1e-6)
    summary = (artifacts / "model_summary.txt").read_text()  # the whole table, not cut at 80 columns
    assert f"Total params: {int(params['num_params']):,}" in summary
    for layer in model.layers:
        assert f"{layer.count_params():,}" in summary, layer.name

    import matplotlib.image

    expected = {"samples", "patches", "confusion", "errors", "position_similarity", "attention"}
    pictures = {p.stem: matplotlib.image.imread(p) for p in (artifacts / "report").glob("*.png")}
    assert set(pictures) == expected
    for name, pixels in pictures.items():
        assert pixels.shape[0] > 150 and pixels.shape[1] > 300, name
        assert pixels[..., :3].var() > 1e-4, f"{name} is blank"

    keras.utils.save_img(tmp_path / "mine.png", data.test_x[0], scale=False)
    from vitexp.tools import explain  # in this process: the model is loaded here already

    capsys.readouterr()
    explain.main(
        [
            "--tracking-uri",
            uri,
            "--out",
            str(tmp_path / "explained"),
            run.info.run_id,
            str(tmp_path / "mine.png"),
        ]
    )
    written = [Path(line) for line in capsys.readouterr().out.split()]
    assert written == [tmp_path / "explained" / "attention_00.png"] and written[0].stat().st_size > 10_000


def test_multirun_is_one_parent_with_a_child_per_job(tmp_path, store):
    """Two jobs side by side (joblib) writing to one sqlite store: no metric is lost."""
    uri, client = store
    run_vitexp(
        [
            "-m",
            "hydra/launcher=parallel",
            *TINY,
            "trainer.epochs=1",
            "depth=1,2",
            f"tracking.uri={uri}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        tmp_path,
    )
    runs = runs_of(client)
    parents = [r for r in runs if r.data.tags.get("vitexp.sweep") == "true"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.params["model.depth"] for r in children) == ["1", "2"]
    assert all(r.info.status == "FINISHED" for r in children) and len(runs) == 3
    for child in children:
        for key in ("train_loss", "val_loss", "val_top1", "lr", "optimizer_step", "images_per_s"):
            assert [s for s, _ in metric_steps(client, child.info.run_id, key)] == [1], key
    # tracking.log_model=false: checkpoints only, no MLflow Model per job
    mlflow.set_tracking_uri(uri)
    experiment_ids = [parents[0].info.experiment_id]
    assert mlflow.search_logged_models(experiment_ids=experiment_ids, output_format="list") == []


def test_a_diverging_job_fails_without_stopping_the_sweep(tmp_path, store):
    uri, client = store
    proc = run_vitexp(
        [
            "-m",
            *TINY,
            "trainer.epochs=2",
            "optimizer.learning_rate=0.001,1e12",
            f"tracking.uri={uri}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    runs = {r.data.params.get("optimizer.learning_rate"): r for r in runs_of(client)}
    parent = runs.pop(None)
    assert parent.info.status == "FAILED"
    assert runs["0.001"].info.status == "FINISHED"
    diverged = runs["1000000000000.0"]
    assert diverged.info.status == "FAILED"
    assert "training diverged: loss is" in diverged.data.tags["vitexp.error"]
    assert "epoch 1, step" in diverged.data.tags["vitexp.error"]


def test_a_job_whose_data_fails_is_recorded_and_the_sweep_goes_on(tmp_path, store):
    from data.test_loaders import write_png_folder

    uri, client = store
    write_png_folder(tmp_path / "good", classes=("cat", "dog", "owl", "emu"))
    write_png_folder(tmp_path / "bad", classes=("cat", "dog", "owl", "emu"))
    (tmp_path / "bad" / "owl" / "x.png").write_bytes(b"garbage")
    proc = run_vitexp(
        [
            "-m",
            *TINY,
            "trainer.epochs=1",
            "trainer.batch_size=8",  # 16 images a folder: 12 to train on
            "data=image_folder",
            "data.num_classes=4",
            "data.image_shape=[16,16,3]",
            f"data.path={tmp_path / 'bad'},{tmp_path / 'good'}",  # the failing job first
            f"tracking.uri={uri}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vitexp: error: 1 of 2 jobs failed") and "x.png: not a readable image" in last
    runs = {r.data.params.get("data.path"): r for r in runs_of(client)}
    parent = runs.pop(None)
    assert parent.info.status == "FAILED"
    assert runs[str(tmp_path / "good")].info.status == "FINISHED"
    bad = runs[str(tmp_path / "bad")]
    assert bad.info.status == "FAILED" and "x.png: not a readable image" in bad.data.tags["vitexp.error"]
    assert bad.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert f"python -m vitexp.compare {parent.info.run_id}" in proc.stderr


@pytest.mark.skipif(not Path(DEBIAN_DIR).is_dir(), reason="install dataset-fashion-mnist")
def test_real_fashion_mnist_recipe_shortened_learns(tmp_path, store):
    """experiment=vit_fashion_mnist on 8,000 real images for 3 epochs (the full recipe, 70
    epochs on 60,000: README): 16 tokens from the padded conv stem, XLA, test-time flips and
    shifts (the MLflow Model is tested where it is used)."""
    uri, client = store
    run_vitexp(
        [
            "experiment=vit_fashion_mnist",
            "data.train_limit=8000",
            "data.test_limit=1000",
            "trainer.epochs=3",
            "report.enabled=false",
            "tracking.log_model=false",
            f"tracking.uri={uri}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    (run,) = runs_of(client, "vit_fashion_mnist")
    # chance is 0.10
    assert run.data.metrics["test_top1"] > 0.55
    names = json.loads(
        Path(client.download_artifacts(run.info.run_id, "class_names.json", str(tmp_path))).read_text()
    )
    assert names[0] == "T-shirt/top" and len(names) == 10
    assert np.isfinite(run.data.metrics["test_loss"])


def test_mirrored_strategy_on_two_logical_cpus(tmp_path, store):
    """Two replicas in mixed_bfloat16, as on a machine with two GPUs: the model saved inside
    the strategy loads outside it, with Keras' default policy, and scores as the run did.
    XLA, which cannot place a replica's variables on logical CPUs, is refused in one line."""
    uri, client = store
    args = [
        *TINY,
        "trainer.epochs=2",
        "trainer.strategy=mirrored",
        "trainer.logical_cpus=2",
        "trainer.precision=mixed_bfloat16",
        f"tracking.uri={uri}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    refused = run_vitexp([*args, "trainer.jit_compile=true"], tmp_path, check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        "vitexp: error: trainer.jit_compile=true with trainer.strategy=mirrored over 2 logical CPUs: "
        "XLA cannot reach a variable on another CPU device; set trainer.jit_compile=auto"
    )
    run_vitexp(args, tmp_path)
    (run,) = runs_of(client)
    assert run.info.status == "FINISHED" and run.data.params["replicas"] == "2"
    assert run.data.params["precision"] == "mixed_bfloat16"
    assert [s for s, _ in metric_steps(client, run.info.run_id, "val_top1")] == [1, 2]
    out = run_vitexp(
        [run.info.run_id, "--tracking-uri", uri, "--in-place"], tmp_path, module="vitexp.evaluate"
    )
    assert "top-1" in out.stdout
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics["eval_top1"] == pytest.approx(metrics["test_top1"], abs=1e-6)


def test_swin_run_is_recorded_like_a_vit_run(tmp_path, store):
    uri, client = store
    run_vitexp(
        [
            "model=swin_micro",
            "data=synthetic",
            "data.image_shape=[32,32,3]",
            "trainer.epochs=2",
            "trainer.batch_size=64",
            f"tracking.uri={uri}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    (run,) = runs_of(client)
    assert run.info.status == "FINISHED" and run.info.run_name == "swin_micro-p4-d2-synthetic"
    assert [s for s, _ in metric_steps(client, run.info.run_id, "val_top1")] == [1, 2]
    names = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert names == {"checkpoints/best.keras", "checkpoints/last.keras"}
    report = {a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "report")}
    assert report == {"samples.png", "patches.png", "confusion.png", "errors.png"}  # no attention for Swin
