"""Use a trained run: evaluate, predict, register, load through pyfunc, serve over HTTP."""

import functools
import json
import os
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from conftest import TINY, answers, compose, free_port, run_vitexp, runs_of, wait_for

from vitexp.metrics import softmax

# one worker runs the module: the run it uses is trained once, not once a worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("trained_run")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run on synthetic data, trained in mixed_bfloat16 as `auto` does on CPUs with
    AVX-512 BF16 or AMX and on recent GPUs, then used from new processes with Keras' default
    policy: (folder, store uri, client, run)."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("trained")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    # scored with test-time flips, as the speedrun preset is: evaluate must score it the same way
    args = [*TINY, "trainer.precision=mixed_bfloat16", "trainer.tta=flip", "tracking.log_model=true"]
    proc = run_vitexp([*args, f"tracking.uri={uri}", f"hydra.run.dir={folder / 'run'}"], folder)
    (folder / "stderr.txt").write_text(proc.stderr)
    client = MlflowClient(uri)
    (run,) = runs_of(client)
    return folder, uri, client, run


def synthetic_test_images():
    """The trained run's own data."""
    from vitexp.data import load_data

    return load_data(compose(TINY).data)


@functools.cache
def best_model(folder):
    """The run's best checkpoint (its test checkpoint), loaded once in this process."""
    from vitexp.models import load_model

    return load_model(str(folder / "run" / "checkpoints" / "best.keras"))


def served_probs(folder, images):
    """What the run reported its test scores from (it used `trainer.tta=flip`): the softmax of
    the mean of the logits of the images and their horizontal mirrors, from its checkpoint."""
    model = best_model(folder)
    views = [model.predict(v, verbose=0).astype(np.float64) for v in (images, images[:, :, ::-1])]
    return softmax((views[0] + views[1]) / 2)


def write_images(folder, images):
    import keras

    paths = []
    for i, image in enumerate(images):
        path = folder / f"image_{i}.png"
        keras.utils.save_img(path, image, scale=False)
        paths.append(str(path))
    return paths


def in_process(tool, argv, capsys):
    """`python -m vitexp.<tool> ARGV` run in this process through its `main`: (exit status,
    stdout, stderr). The tests that run a tool as a real command are the ones without it."""
    try:
        tool.main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_evaluate_reproduces_the_runs_test_metrics(trained, tmp_path):
    folder, uri, client, run = trained
    out = run_vitexp(
        [run.info.run_id, "--checkpoint", "last", "--tracking-uri", uri],
        folder,
        module="vitexp.evaluate",
        env={"TMPDIR": str(tmp_path)},
    )
    assert not list(tmp_path.glob("vitexp-*"))  # the run's config and checkpoint, downloaded, are gone
    assert "per-class accuracy" in out.stdout and "pattern_3" in out.stdout
    children = [r for r in runs_of(client) if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
    assert len(children) == 1
    assert "one view" in out.stdout
    for key in ("test_top1", "test_top5", "test_loss", "test_top1_1view"):
        assert children[0].data.metrics[key] == pytest.approx(run.data.metrics[key], abs=1e-5), key
    assert client.get_run(run.info.run_id).data.metrics == run.data.metrics  # the original is untouched


def test_the_run_scores_its_tested_checkpoint_on_validation_with_the_test_time_views(trained):
    """What decides a test-time choice is on the held-out validation images: the tested (best)
    checkpoint scored there with the run's views, and one view alone, which is what its best
    epoch's validation top-1 was."""
    from vitexp.data.pipeline import predict_views, split_validation

    folder, _, _, run = trained
    metrics = run.data.metrics
    assert metrics["tested_val_top1_1view"] == pytest.approx(metrics["best_val_top1"], abs=1e-6)
    cfg, data = compose(TINY), synthetic_test_images()
    x, y = split_validation(data.train_x, data.train_y, cfg.trainer.validation_split)[1]
    views = predict_views(best_model(folder), x, y, cfg.data.num_classes, 32, "flip")  # image, mirror
    assert metrics["tested_val_top1"] == pytest.approx((views.mean(0).argmax(-1) == y).mean(), abs=1e-6)
    assert metrics["tested_val_top5"] >= metrics["tested_val_top1"] and metrics["tested_val_loss"] > 0


def test_the_run_warned_of_test_time_mirrors_it_never_trained_on(trained):
    """TINY trains without flips, and this run was scored with mirrors: the terminal said so,
    once, before training, and the run went on."""
    folder, _, _, run = trained
    stderr = (folder / "stderr.txt").read_text()
    warned = [line for line in stderr.splitlines() if line.startswith("vitexp: warning: trainer.tta=flip")]
    assert len(warned) == 1 and "data.augment.horizontal_flip=true or trainer.tta=none" in warned[0]
    assert stderr.index(warned[0]) < stderr.index(": loading synthetic, building")
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize(
    "overrides, expect",
    [
        (["data.image_shape=[20,20,1]"], "test images [20, 20, 1] converted to the model's [16, 16, 3]"),
        (["data.num_classes=6"], "vitexp.evaluate: error: data synthetic has 6 classes but run"),
        (["data=no_such_data"], "vitexp.evaluate: error: data=no_such_data: In 'config': Could not find"),
    ],
)
def test_evaluate_adapts_the_data_or_says_what_to_change(overrides, expect, trained, capsys):
    from vitexp.tools import evaluate

    _, uri, _, run = trained
    code, stdout, stderr = in_process(evaluate, [run.info.run_id, *overrides, "--tracking-uri", uri], capsys)
    if "error" in expect:
        assert code == 2 and stderr.strip().splitlines()[-1].startswith(expect), stderr
    else:
        assert code == 0, stderr[-3000:]
        assert expect in stdout and "top-1" in stdout


def test_predict_top5_on_image_files(trained):
    folder, uri, _, run = trained
    data = synthetic_test_images()
    paths = write_images(folder, data.test_x[:3])
    out = run_vitexp(
        [run.info.run_id, *paths, "--json", "--tracking-uri", uri], folder, module="vitexp.predict"
    )
    results = json.loads(out.stdout)
    assert [r["image"] for r in results] == paths
    # the files give what the run's model gives on the same pixels as arrays, best class first,
    # from the image and its mirror, as the run (trainer.tta=flip) scored its test split
    expected = served_probs(folder, data.test_x[:3])
    for r, p in zip(results, expected):
        assert [t["class"] for t in r["top"]] == np.argsort(p)[::-1].tolist()
        assert [t["probability"] for t in r["top"]] == pytest.approx(sorted(p, reverse=True), abs=1e-5)
        assert all(t["label"] == f"pattern_{t['class']}" for t in r["top"])


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_run", "no run 'feedbeef'"),
        ("not_an_image", "not a readable image"),
        ("no_checkpoint", "has no best.keras checkpoint"),
    ],
)
def test_bad_inputs(case, message, trained, capsys):
    from vitexp.tools import predict

    folder, uri, client, run = trained
    run_id = run.info.run_id
    paths = write_images(folder, synthetic_test_images().test_x[:1])
    if case == "unknown_run":
        run_id = "feedbeef"
    elif case == "not_an_image":
        (folder / "notes.png").write_text("hello")
        paths = [str(folder / "notes.png")]
    else:
        empty = client.create_run(run.info.experiment_id)
        client.log_artifact(empty.info.run_id, str(folder / "run" / "config" / "config.yaml"), "config")
        run_id = empty.info.run_id
    code, _, stderr = in_process(predict, [run_id, *paths, "--tracking-uri", uri], capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("vitexp.predict: error:")


def test_register_load_and_serve(trained):
    folder, uri, client, run = trained
    out = run_vitexp(
        [run.info.run_id, "--name", "tiny-vit", "--tracking-uri", uri], folder, module="vitexp.registry"
    )
    assert "models:/tiny-vit/1" in out.stdout and "trainer.tta=flip" in out.stdout
    # the run's own MLflow Model is registered, not a second copy, and the run is left as it was
    after = client.get_run(run.info.run_id)
    (own,) = [o.model_id for o in after.outputs.model_outputs]
    assert own in client.get_model_version("tiny-vit", "1").source
    assert client.get_logged_model(own).tags["vitexp.tta"] == "flip"
    assert after.info.status == "FINISHED" and after.info.end_time == run.info.end_time

    import mlflow

    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-vit/1")
    images = synthetic_test_images().test_x[:8]
    predicted = pyfunc.predict(images)
    probs = served_probs(folder, images)  # as the run was scored: trainer.tta=flip
    assert predicted["class"].tolist() == probs.argmax(-1).tolist()
    assert predicted["label"].tolist() == [f"pattern_{c}" for c in probs.argmax(-1)]
    np.testing.assert_allclose(predicted["probability"], probs.max(-1), atol=1e-6)

    port = free_port()
    # the scoring server is started through the environment's `uvicorn`, as `make serve` does
    path = f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/tiny-vit/1",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: answers(f"http://127.0.0.1:{port}/ping"), server, timeout=180, poll=1, what="the model"
        )
        body = json.dumps({"inputs": images[:1].tolist()}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert answer["predictions"][0]["class"] == predicted["class"][0]
        assert answer["predictions"][0]["probability"] == pytest.approx(probs[0].max(), abs=1e-6)
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("name", ["my model/v1?", "", "a:b"])
def test_registry_refuses_a_name_mlflow_refuses_and_leaves_the_run_alone(name, trained, capsys):
    from vitexp.tools import registry

    _, uri, client, run = trained
    registered = client.search_registered_models()
    code, _, stderr = in_process(registry, [run.info.run_id, "--name", name, "--tracking-uri", uri], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith(f"vitexp.registry: error: --name {name!r}: "), stderr
    assert ("cannot contain '/' or ':'" in stderr) if name else ("needs a name" in stderr)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert client.search_registered_models() == registered


@pytest.fixture
def unfinished(trained):
    """A run that did not finish: a RUNNING copy of the trained run's record (its config and
    checkpoint folder), without an MLflow Model, as an interrupted run leaves it."""
    folder, uri, client, run = trained
    copy = client.create_run(run.info.experiment_id, run_name="interrupted")
    client.log_artifact(copy.info.run_id, str(folder / "run" / "config" / "config.yaml"), "config")
    client.log_param(copy.info.run_id, "trainer.tta", "flip")
    client.set_tag(copy.info.run_id, "vitexp.output_dir", str(folder / "run"))
    return uri, client, copy.info.run_id


@pytest.mark.parametrize("status", ["RUNNING", "KILLED"])
def test_registry_refuses_an_unfinished_run_unless_asked_and_never_changes_its_status(
    status, unfinished, capsys
):
    from vitexp.tools import registry
    from vitexp.tracking.records import RunRecord
    from vitexp.train.resume import _resumable

    uri, client, run_id = unfinished
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    name = f"unfinished-{status.lower()}"
    argv = [run_id, "--name", name, "--tracking-uri", uri]
    code, _, stderr = in_process(registry, argv, capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert f"run {run_id} is {status}: it did not finish" in stderr and "--allow-unfinished" in stderr
    assert client.get_run(run_id).info.status == status
    assert client.search_model_versions(f"name='{name}'") == []

    code, stdout, stderr = in_process(registry, [*argv, "--allow-unfinished"], capsys)
    assert code == 0, stderr[-3000:]
    assert f"{status}: registered unfinished" in stdout and "logged now" in stdout, stdout
    after = client.get_run(run_id)
    assert after.info.status == status and _resumable(RunRecord.of(after)) is not None  # it can still go on
    (version,) = client.search_model_versions(f"name='{name}'")
    assert after.outputs.model_outputs[0].model_id in version.source


@pytest.mark.parametrize("top", ["0", "-3"])
def test_predict_top_must_be_positive(top, trained, capsys):
    from vitexp.tools import predict

    folder, uri, _, run = trained
    paths = write_images(folder, synthetic_test_images().test_x[:1])
    code, stdout, stderr = in_process(
        predict, [run.info.run_id, *paths, "--top", top, "--tracking-uri", uri], capsys
    )
    assert code == 2 and stdout == "", stdout
    assert (
        stderr.strip()
        == f"vitexp.predict: error: argument --top: {top}: show at least 1 class per image, e.g. --top 5"
    )


def test_predict_takes_a_folder_for_its_images_and_names_a_missing_file(trained, tmp_path, capsys):
    from vitexp.tools import predict

    _, uri, _, run = trained
    images = synthetic_test_images().test_x[:3]
    write_images(tmp_path, images)
    (tmp_path / "notes.txt").write_text("not an image")
    code, stdout, stderr = in_process(
        predict, [run.info.run_id, str(tmp_path), "--json", "--tracking-uri", uri], capsys
    )
    assert code == 0, stderr[-3000:]
    results = json.loads(stdout)
    assert [r["image"] for r in results] == [str(tmp_path / f"image_{i}.png") for i in range(3)]
    (tmp_path / "photo.webp").write_bytes(b"RIFF\0\0\0\0WEBPVP8 ")
    for name, message in [
        ("missing.png", "no such file"),
        ("photo.webp", ".webp is not an image format vitexp trains on; use .bmp, .gif, .jpeg, .jpg, .png"),
    ]:
        code, _, stderr = in_process(
            predict, [run.info.run_id, str(tmp_path / name), "--tracking-uri", uri], capsys
        )
        assert code == 2 and stderr.strip() == f"vitexp.predict: error: {tmp_path / name}: {message}", stderr


def class_folder(root, classes):
    """An image folder of the synthetic test images of `classes` (`pattern_<i>`), 5 a class."""
    data = synthetic_test_images()
    for name in classes:
        index = int(name.removeprefix("pattern_")) % 4
        (root / name).mkdir(parents=True)
        write_images(root / name, data.test_x[data.test_y == index][:5])
    return root


def test_evaluate_advice_on_other_classes_works_when_followed(trained, tmp_path, capsys):
    from vitexp.tools import evaluate

    _, uri, _, run = trained
    more = class_folder(tmp_path / "more", [f"pattern_{i}" for i in range(5)])
    argv = [run.info.run_id, "data=image_folder", "data.image_shape=[16,16,3]", "--tracking-uri", uri]
    code, _, stderr = in_process(evaluate, [*argv, f"data.path={more}"], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith(
        f"vitexp.evaluate: error: data image_folder has 5 classes but run {run.info.run_id} predicts 4 "
        "(pattern_0, pattern_1, pattern_2, pattern_3): evaluate it on images of those classes"
    ), stderr
    some = class_folder(tmp_path / "some", ["pattern_1", "pattern_2"])  # the advice, followed
    code, stdout, stderr = in_process(evaluate, [*argv, f"data.path={some}", "--in-place"], capsys)
    assert code == 0, stderr[-3000:]
    assert "on image_folder test, 2 images" in stdout, stdout


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "data.image_shape=abc",
            "data.image_shape=abc: not of the key's type; give a value like the run's [16, 16, 3]",
        ),
        ("data.num_classes=x", "data.num_classes=x: not of the key's type; give a value like the run's 4"),
        ("data.colour=red", "data.colour=red: no such key; the data config has _target_, name, num_classes"),
    ],
)
def test_evaluate_refuses_a_value_of_the_wrong_type_in_one_line(override, message, trained, capsys):
    from vitexp.tools import evaluate

    _, uri, _, run = trained
    code, _, stderr = in_process(evaluate, [run.info.run_id, override, "--tracking-uri", uri], capsys)
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    (line,) = stderr.strip().splitlines()
    assert line.startswith(f"vitexp.evaluate: error: {message}"), line
