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

pytestmark = pytest.mark.slow


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
    run_vitexp([*args, f"tracking.uri={uri}", f"hydra.run.dir={folder / 'run'}"], folder)
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


def test_evaluate_reproduces_the_runs_test_metrics(trained):
    folder, uri, client, run = trained
    out = run_vitexp(
        [run.info.run_id, "--checkpoint", "last", "--tracking-uri", uri], folder, module="vitexp.evaluate"
    )
    assert "per-class accuracy" in out.stdout and "pattern_3" in out.stdout
    children = [r for r in runs_of(client) if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
    assert len(children) == 1
    assert "one view" in out.stdout
    for key in ("test_top1", "test_top5", "test_loss", "test_top1_1view"):
        assert children[0].data.metrics[key] == pytest.approx(run.data.metrics[key], abs=1e-5), key
    assert client.get_run(run.info.run_id).data.metrics == run.data.metrics  # the original is untouched


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
    # the files give what the run's model gives on the same pixels as arrays, best class first
    expected = softmax(best_model(folder).predict(data.test_x[:3], verbose=0).astype(np.float64))
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
    assert "models:/tiny-vit/1" in out.stdout

    import mlflow

    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-vit/1")
    images = synthetic_test_images().test_x[:8]
    predicted = pyfunc.predict(images)
    probs = softmax(best_model(folder).predict(images, verbose=0).astype(np.float64))
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
    finally:
        server.terminate()
        server.wait(timeout=30)
