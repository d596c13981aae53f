"""Runs that survive: kill and resume, Ctrl-C, divergence, determinism, bad inputs."""

import contextlib
import os
import signal
import socket
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, compose, run_vitexp, runs_of, signal_at_step, start_vitexp, wait_for
from PIL import Image

from vitexp.tracking import Tracker
from vitexp.train.resume import config_hash, find_resume
from vitexp.train.run import train
from vitexp.validate import ConfigError

pytestmark = pytest.mark.slow

LONG = [*TINY, "data.num_train=3072", "trainer.epochs=5"]  # ~100 steps an epoch


def wait_for_line(proc, text):
    """Reads the run's output until a line holds `text`."""
    for line in proc.stdout:
        if text in line:
            return
    raise AssertionError(
        f"process ended ({proc.wait()}) before printing {text!r}: {proc.stderr.read()[-3000:]}"
    )


def steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def check_complete(client, run_id, epochs=5):
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("val_top1", "train_loss", "lr", "optimizer_step"):
        assert steps(client, run_id, key) == list(range(1, epochs + 1)), key  # each epoch once
    per_epoch = -(-int(3072 * 0.8) // 32)  # training images after the split, batch 32
    optimizer_steps = [
        m.value for m in sorted(client.get_metric_history(run_id, "optimizer_step"), key=lambda m: m.step)
    ]
    assert optimizer_steps == [per_epoch * e for e in range(1, epochs + 1)]  # the step continued
    assert run.data.metrics["lr"] == pytest.approx(0.0, abs=1e-9)  # and so did the schedule


def test_sigkill_in_third_epoch_then_resume(tmp_path, store):
    uri, client = store
    run_dir = tmp_path / "run"
    args = [*LONG, f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"]
    proc = start_vitexp(args, tmp_path)
    wait_for_line(proc, "Epoch 3/5")  # Keras starts the third epoch once the second is recorded
    assert (run_dir / "checkpoints" / "epoch_0002.keras").exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run,) = runs_of(client)
    assert run.info.status == "RUNNING"  # SIGKILL leaves no chance to close it
    result = run_vitexp([*args, "resume=true"], tmp_path)
    assert "resuming run" in result.stderr
    (again,) = runs_of(client)
    assert again.info.run_id == run.info.run_id
    check_complete(client, run.info.run_id)


def test_sigkill_during_a_checkpoint_write_then_resume(tmp_path, store):
    uri, client = store
    run_dir = tmp_path / "run"
    big = [*LONG, "model.head_units=[2048,2048]"]  # a checkpoint large enough to catch mid-write
    args = [*big, f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"]
    proc = start_vitexp(args, tmp_path)
    partial = run_dir / "checkpoints" / ".epoch_0002.keras.tmp.keras"
    wait_for(partial.exists, proc, poll=0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.exists()  # killed while writing epoch 2
    run_vitexp([*args, "resume=true"], tmp_path)
    (run,) = runs_of(client)
    check_complete(client, run.info.run_id)


def test_ctrl_c_ends_killed_with_a_usable_checkpoint(tmp_path, store):
    uri, client = store
    run_dir = tmp_path / "run"
    proc = start_vitexp([*LONG, f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"], tmp_path)
    wait_for(lambda: (run_dir / "checkpoints" / "epoch_0001.keras").exists(), proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-4000:]
    assert "resume=true" in stderr.strip().splitlines()[-1]
    (run,) = runs_of(client)
    assert run.info.status == "KILLED"
    from vitexp.models import load_model

    model = load_model(str(run_dir / "checkpoints" / "last.keras"))
    assert model.predict(np.zeros((1, 16, 16, 3), np.uint8), verbose=0).shape == (1, 4)


def history(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.fixture
def ctrl_c_raises():
    """Python's Ctrl-C, as a terminal gives it: a suite started in the background ignores SIGINT."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c_raises", "scratch_in_tmp_path")
@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_interrupted_run_with_ema_and_stochastic_depth_resumes_identically(
    precision, tmp_path, store, capsys
):
    """In-process, through Python's own Ctrl-C (the command's exit code 130: the tests below),
    in each precision: a float16 run's loss scale goes on as its optimizer moments do."""
    uri, client = store
    cfg = [
        *TINY,
        "data.num_train=320",  # 8 steps an epoch
        "depth=2",
        "model.drop_path=0.3",
        "optimizer.ema_momentum=0.9",
        "trainer.deterministic=true",
        f"trainer.precision={precision}",
        f"tracking.uri={uri}",
    ]
    train(compose(cfg))
    with pytest.raises(KeyboardInterrupt):
        train(compose(cfg), callbacks=(signal_at_step(8 + 3, signal.SIGINT),))  # in epoch 2
    assert "resume=true" in capsys.readouterr().err.strip().splitlines()[-1]
    other = "float32" if precision != "float32" else "mixed_bfloat16"
    with pytest.raises(ConfigError) as wrong:  # its checkpoints hold this precision's state
        train(compose([*cfg, f"trainer.precision={other}", "resume=true"]))
    assert f"trained with trainer.precision={precision}" in str(wrong.value)
    assert f"resume it with trainer.precision={precision}" in str(wrong.value)
    train(compose([*cfg, "resume=true"]))
    assert "resuming run" in capsys.readouterr().err
    whole, cut = sorted(runs_of(client), key=lambda r: r.info.start_time)
    assert cut.info.status == "FINISHED"
    for key in ("train_loss", "val_loss", "val_top1"):
        assert len(history(client, cut.info.run_id, key)) == 3, key  # each epoch once
        assert history(client, cut.info.run_id, key) == history(client, whole.info.run_id, key), key
    assert cut.data.metrics["test_loss"] == whole.data.metrics["test_loss"]
    assert cut.data.params["precision"] == whole.data.params["precision"] == precision


def test_ctrl_c_in_the_first_epoch_says_to_start_again(tmp_path, store):
    uri, client = store
    run_dir = tmp_path / "run"
    proc = start_vitexp([*LONG, f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"], tmp_path)
    wait_for(lambda: (run_dir / "model_summary.txt").exists(), proc)  # set up, not yet one epoch
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-4000:]
    last = stderr.strip().splitlines()[-1]
    assert "no checkpoint" in last and "start it again" in last and "resume=true" not in last, last
    assert not (run_dir / "checkpoints").exists()
    (run,) = runs_of(client)
    assert run.info.status == "KILLED"


@contextlib.contextmanager
def ctrl_c_in_the_store(when: str, statement: str):
    """Sends this process a real SIGINT once, as the store executes (`when`: SQLAlchemy's
    before/after_cursor_execute) the first statement that starts with `statement`; yields
    the rows that statement carried."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    rows = []

    def send(conn, cursor, text, parameters, context, executemany):
        if not rows and text.lstrip().upper().startswith(statement):
            rows.append(len(parameters) if executemany else 1)
            os.kill(os.getpid(), signal.SIGINT)

    event.listen(Engine, when, send)
    try:
        yield rows
    finally:
        event.remove(Engine, when, send)


@pytest.mark.usefixtures("ctrl_c_raises", "scratch_in_tmp_path")
@pytest.mark.parametrize(
    "when, statement",
    [("after_cursor_execute", "INSERT INTO RUNS"), ("before_cursor_execute", "INSERT INTO PARAMS")],
    ids=["creating-the-run", "its-first-params"],
)
def test_ctrl_c_inside_a_store_call_waits_for_it_and_the_run_ends_killed(
    when, statement, tmp_path, store, capsys
):
    """Cut off inside SQLAlchemy, an interrupt could roll back the run being created (a user
    told nothing), or leave a statement open that locked the store against the run's own
    KILLED status (RUNNING after exit 130). A store call is now made whole, then the run stops."""
    uri, client = store
    with ctrl_c_in_the_store(when, statement) as rows, pytest.raises(KeyboardInterrupt) as stop:
        train(compose([*TINY, f"tracking.uri={uri}"]))
    assert rows, f"the run executed no {statement}"
    cut = [
        f.filename for f in traceback.extract_tb(stop.value.__traceback__) if "site-packages" in f.filename
    ]
    assert not cut, f"the interrupt was raised inside the store: {cut[-1]}"
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no checkpoint" in last and "start it again" in last, last
    (run,) = runs_of(client)
    assert run.info.status == "KILLED"
    if "PARAMS" in statement:
        assert len(run.data.params) == rows[0]  # the insert the signal came in, whole, and no more
        assert not run.inputs.dataset_inputs  # the next write was not made


def signal_in_a_destructor(step: int, signum: int):
    """A Keras callback that, once the optimizer has made `step` steps, gets `signum` while
    Python runs a destructor: there Python prints `Exception ignored in ...` and drops what the
    handler raises (a store's ORM cleanup hit it in a run that then trained to its end)."""
    import keras

    class Dropper:
        def __del__(self):
            os.kill(os.getpid(), signum)
            for _ in range(10_000):  # the handler runs between these bytecodes
                pass

    class SignalInDestructor(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) == step:
                Dropper()  # deleted at once

    return SignalInDestructor()


@pytest.mark.usefixtures("ctrl_c_raises", "scratch_in_tmp_path")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_python_drops_in_a_destructor_still_stops_the_run(
    signum, tmp_path, store, capsys, monkeypatch
):
    uri, client = store
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda raised: dropped.append(raised.exc_type))
    cfg = compose(
        [*TINY, "data.num_train=320", "trainer.epochs=3", f"tracking.uri={uri}"]
    )  # 8 steps an epoch
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=(signal_in_a_destructor(8 + 3, signum),))  # in epoch 2
    assert dropped and issubclass(dropped[0], KeyboardInterrupt)  # Python did drop it there
    err = capsys.readouterr().err
    assert "resume=true" in err.strip().splitlines()[-1]
    (run,) = runs_of(client)
    assert run.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")] == [1]
    assert "test_top1" not in run.data.metrics


def test_sigkill_in_the_first_epoch_restarts_in_the_same_run_as_ctrl_c_does(tmp_path, store):
    uri, client = store
    run_dir = tmp_path / "run"
    args = [*TINY, "data.num_train=3072", f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"]
    proc = start_vitexp(args, tmp_path)
    wait_for(lambda: (run_dir / "model_summary.txt").exists(), proc)  # set up, not yet one epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "checkpoints" / "epoch_0001.keras").exists()
    (run,) = runs_of(client)
    assert run.info.status == "RUNNING"  # SIGKILL leaves no chance to close it
    result = run_vitexp([*args, "resume=true"], tmp_path)
    assert f"resuming run {run.info.run_id} after epoch 0" in result.stderr
    (again,) = runs_of(client)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert steps(client, run.info.run_id, "val_top1") == [1, 2, 3]


def test_a_running_run_whose_process_lives_is_not_taken_over(tmp_path, store):
    """resume=<id> of a run still training (this process holds it) is refused in one line."""
    uri, client = store
    cfg = compose([*TINY, f"tracking.uri={uri}"])
    tracker = Tracker(uri, "vitexp")
    run_id = tracker.start_run("live", {"vitexp.output_dir": str(tmp_path / "run")})
    cfg.resume = run_id
    process = f"{socket.gethostname()}:{os.getpid()}"
    tracker.set_tags(run_id, {"vitexp.config_hash": config_hash(cfg), "vitexp.process": process})
    with pytest.raises(
        ConfigError, match=f"resume={run_id}: that run is still training \\(process {process}\\)"
    ):
        find_resume(tracker, cfg)
    assert client.get_run(run_id).info.status == "RUNNING"


def test_cifar_offline_says_what_to_do_and_leaves_no_folder(tmp_path, store):
    uri, client = store
    offline = {
        "KERAS_HOME": str(tmp_path / "keras"),
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
    }
    proc = run_vitexp([f"tracking.uri={uri}"], tmp_path, check=False, env=offline)  # `make train`
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "cifar100 is not available offline" in last and "data.path=" in last, last
    assert "experiment=vit_fashion_mnist" in last
    assert not (tmp_path / "outputs").exists() and runs_of(client) == []


def test_divergence_fails_with_one_line(tmp_path, store):
    uri, client = store
    proc = run_vitexp([*TINY, "optimizer.learning_rate=1e12", f"tracking.uri={uri}"], tmp_path, check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vitexp: error: training diverged: loss is") and "learning rate" in last
    (run,) = runs_of(client)
    assert run.info.status == "FAILED" and "diverged" in run.data.tags["vitexp.error"]


def test_fixed_seed_is_deterministic(tmp_path, store):
    uri, client = store
    run_vitexp(
        [
            "-m",
            *TINY,
            "trainer.deterministic=true",
            "data.augment.random_crop_padding=2",
            "data.augment.mixup_alpha=0.4",
            "trainer.seed=11,11",
            "tracking.skip_finished=false",  # the same config twice, on purpose
            f"tracking.uri={uri}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        tmp_path,
    )
    children = [r for r in runs_of(client) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2
    histories = [
        [m.value for m in sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: m.step)]
        for r in children
        for key in ("train_loss", "val_loss")
    ]
    assert histories[0] == histories[2] and histories[1] == histories[3]
    tags = children[0].data.tags
    assert children[0].data.params["trainer.seed"] == "11" and tags["version.tensorflow"]
    assert tags["vitexp.git_commit"] != ""


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    import gzip

    from data.test_loaders import write_cifar100, write_mnist_folder, write_png_folder

    root = tmp_path_factory.mktemp("bad")
    tarball, _, _ = write_cifar100(root)
    truncated = root / "truncated.tar.gz"
    truncated.write_bytes(tarball.read_bytes()[:2000])
    write_mnist_folder(root / "magic")
    with gzip.open(root / "magic" / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + b"\0" * 64)
    write_mnist_folder(root / "labels", label_max=12)
    write_png_folder(root / "folder")
    (root / "folder" / "owl" / "x.png").write_bytes(b"garbage")
    write_png_folder(root / "split" / "train")
    write_png_folder(root / "split" / "test", classes=("cat", "dog", "emu"), per_class=1)
    write_png_folder(root / "jpeg")
    (root / "jpeg" / "owl" / "y.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 60)  # cut short
    write_png_folder(root / "one", classes=("cat",))
    write_png_folder(root / "webp")
    for png in (root / "webp" / "owl").iterdir():  # a format predict refuses too
        Image.open(png).save(png.with_suffix(".webp"))
        png.unlink()
    return {
        "one": root / "one",
        "webp": root / "webp",
        "split": root / "split",
        "jpeg": root / "jpeg",
        "truncated": truncated,
        "magic": root / "magic",
        "labels": root / "labels",
        "folder": root / "folder",
    }


BAD_DATA = [
    (["data.path={truncated}"], "truncated.tar.gz: truncated or corrupt archive"),
    (["data=fashion_mnist", "data.path={magic}"], "wrong idx magic number"),
    (["data=fashion_mnist", "data.path={labels}"], "labels span [0, 11], outside [0, 9]"),
    (["data=image_folder", "data.path={folder}", "data.num_classes=3"], "x.png: not a readable image"),
    (["data=image_folder", "data.path={jpeg}", "data.num_classes=3"], "y.jpg: not a readable image"),
    (["data=image_folder", "data.path={split}", "data.num_classes=3"], "only in test/: ['emu']"),
    (
        ["data=image_folder", "data.path={one}", "data.num_classes=3"],
        "one class (cat); a classifier needs at least two",
    ),
    (
        ["data=image_folder", "data.path={webp}", "data.num_classes=3"],
        "owl: no images (.bmp, .gif, .jpeg, .jpg, .png)",
    ),
    (
        ["data=synthetic", "data.train_limit=1"],
        "1 training image (data.train_limit=1): a run needs at least 2",
    ),
    (
        ["data=synthetic", "trainer.validation_split=0.999"],
        "trainer.validation_split=0.999 of 512 training images leaves none to train on: use a fraction",
    ),
    (
        # a tiny model: where the batch is not checked, it trains, repeating the images to fill it
        [*(a for a in TINY if not a.startswith("trainer.batch_size")), "trainer.batch_size=4096"],
        "trainer.batch_size=4096 is larger than the training split: 409 of 512 training images after "
        "trainer.validation_split=0.2; set trainer.batch_size=409 or less",
    ),
    (
        # 409 training images in batches of 32: 13 steps an epoch (Keras would train 16)
        [*TINY, "trainer.steps_per_execution=4"],
        "trainer.steps_per_execution=4 does not divide the 13 steps of an epoch (its last execution "
        "would train on the next epoch's batches): use one of 1, 13, or set trainer.steps_per_epoch "
        "to a multiple of 4",
    ),
    (["data.path=/no/such/cifar.tar.gz"], "does not exist"),
    (["tracking.uri=http://127.0.0.1:9"], "is unreachable"),
    (["resume=true"], "no interrupted run of this config"),
    (["resume=0123abcd"], "no such MLflow run"),
    (
        ["model=swin", "model.weights=/no/such.h5", "data=synthetic", "data.image_shape=[32,32,3]"],
        "no such file",
    ),
]


def bad_command(args, files, uri, experiment) -> list[str]:
    """The arguments of a bad case, into `experiment` of the store at `uri` unless it names one."""
    args = [a.format(**files) for a in args]
    if not any(a.startswith("tracking.uri=") for a in args):
        args.append(f"tracking.uri={uri}")
    return [*args, f"tracking.experiment={experiment}"]


@pytest.mark.parametrize("args, message", BAD_DATA)
def test_bad_inputs_fail_in_one_line_without_a_run(
    args, message, bad_files, shared_store, vitexp_in_process, tmp_path
):
    """`vitexp.cli.main` in this process, as the command runs it (the next test checks that the
    real command prints the same line)."""
    uri, client = shared_store
    experiment = f"bad-{tmp_path.name}"
    code, stderr = vitexp_in_process(bad_command(args, bad_files, uri, experiment))
    assert code == 2, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("vitexp: error:") and message in last, last
    assert runs_of(client, experiment) == []  # it failed before a run was created, let alone trained


def test_the_command_fails_with_the_line_main_prints(bad_files, shared_store, vitexp_in_process, tmp_path):
    """A real `python -m vitexp` process ends a bad input with the same one line, no traceback."""
    uri, client = shared_store
    args = bad_command(BAD_DATA[0][0], bad_files, uri, f"bad-{tmp_path.name}")
    proc = run_vitexp(args, tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vitexp: error:") and BAD_DATA[0][1] in last, last
    code, stderr = vitexp_in_process(args)
    assert code == 2 and stderr.strip().splitlines()[-1] == last
    assert runs_of(client, f"bad-{tmp_path.name}") == []


@pytest.mark.parametrize("sweep", [False, True])
def test_a_deleted_experiment_says_how_to_restore_it(sweep, shared_store, vitexp_in_process, tmp_path):
    uri, client = shared_store
    experiment = f"deleted-{tmp_path.name}"
    experiment_id = client.create_experiment(experiment)
    client.delete_experiment(experiment_id)
    args = [
        *TINY,
        f"tracking.uri={uri}",
        f"tracking.experiment={experiment}",
        f"hydra.sweep.dir={tmp_path}/m",
    ]
    code, stderr = vitexp_in_process(["-m", *args, "trainer.seed=1,2"] if sweep else args)
    assert code == 2, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (
        f"vitexp: error: tracking.experiment={experiment}: that experiment is deleted (id {experiment_id}); "
        f"restore it with `MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id "
        f"{experiment_id}`, or pick another name"
    )
    assert client.search_runs([experiment_id]) == []
