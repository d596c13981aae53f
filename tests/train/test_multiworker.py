"""Multi-worker data parallelism for real: `python -m vitexp` workers as processes on 127.0.0.1."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from conftest import TINY, wait_for

EPOCHS = 2
JOB = [*TINY, f"trainer.epochs={EPOCHS}", "data.num_train=256", "data.num_test=64"]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def tf_config(ports: list[int], index: int) -> str:
    workers = [f"127.0.0.1:{p}" for p in ports]
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def start(args, cwd, env, log):
    """`python -m vitexp ARGS` in the background, its stderr into the file `log` (files, not
    pipes: three processes write at once while the test waits on one)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vitexp", *args],
            cwd=cwd,
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    proc.log = log
    return proc


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def weights_line(stderr: str) -> str:
    (line,) = [x for x in stderr.splitlines() if "final weights sha256" in x]
    return line.rsplit(" ", 1)[1]


@pytest.mark.slow
def test_two_workers_train_one_run_as_one_process_would(tmp_path, store):
    """Two workers on 127.0.0.1 and a single process, with the same global batch, side by side."""
    from mlflow.tracking import MlflowClient

    uri, client = store
    scratch = tmp_path / "tmp"  # where the non-chief worker keeps its private files
    scratch.mkdir()
    ports = free_ports(2)
    args = [*JOB, "trainer.strategy=multi_worker", f"tracking.uri={uri}"]
    single_uri = f"sqlite:///{tmp_path / 'single.db'}"
    envs = [{"TF_CONFIG": tf_config(ports, i), "TMPDIR": str(scratch)} for i in (0, 1)]
    procs = [start(args, tmp_path, env, tmp_path / f"w{i}.err") for i, env in enumerate(envs)]
    procs.append(start([*JOB, f"tracking.uri={single_uri}"], tmp_path, {}, tmp_path / "single.err"))
    errors = []
    for proc in procs:
        proc.wait(timeout=600)
        errors.append(proc.log.read_text())
        assert proc.returncode == 0, errors[-1][-5000:]

    (run,) = client.search_runs([client.get_experiment_by_name("vitexp").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["replicas"] == "2"
    val = history(client, run.info.run_id, "val_top1")
    assert [step for step, _ in val] == list(range(1, EPOCHS + 1))  # each epoch once
    # the same weights on both workers, and the chief's checkpoint folder is the run's
    assert weights_line(errors[0]) == weights_line(errors[1])
    assert (tmp_path / run.data.tags["vitexp.output_dir"] / "checkpoints" / "last.keras").is_file()
    assert list(scratch.iterdir()) == []  # the non-chief's private store and checkpoints are gone

    # every global batch is the one the single process trains on: the same curve, within noise
    single = MlflowClient(tracking_uri=single_uri)
    (alone,) = single.search_runs([single.get_experiment_by_name("vitexp").experiment_id])
    for key, tolerance in (("val_top1", 0.02), ("val_loss", 0.01), ("train_loss", 0.01)):
        ours, theirs = history(client, run.info.run_id, key), history(single, alone.info.run_id, key)
        assert [s for s, _ in ours] == [s for s, _ in theirs]
        assert all(abs(a - b) <= tolerance for (_, a), (_, b) in zip(ours, theirs)), (key, ours, theirs)


def two_workers(args, name, tmp_path, scratch):
    """Two workers of one job, their temporary folders in `scratch`; fresh ports each time:
    killed workers' may linger."""
    ports = free_ports(2)
    envs = [{"TF_CONFIG": tf_config(ports, i), "TMPDIR": str(scratch)} for i in (0, 1)]
    return [start(args, tmp_path, env, tmp_path / f"{name}{i}.err") for i, env in enumerate(envs)]


@pytest.mark.slow
def test_workers_killed_after_an_epoch_resume_the_chiefs_run(tmp_path, store):
    """Both workers SIGKILLed once the chief committed epoch 1, then started again with
    `resume=true`: every worker loads the chief's checkpoint and the one run goes on; the
    killed non-chief's temporary folder is removed when its successor starts."""
    uri, client = store
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    epochs = 3
    args = [*JOB, f"trainer.epochs={epochs}", "trainer.strategy=multi_worker", f"tracking.uri={uri}"]
    procs = two_workers(args, "first", tmp_path, scratch)
    try:
        wait_for(
            lambda: list(tmp_path.glob("outputs/*/*/checkpoints/epoch_0001.keras")),
            *procs,
            timeout=600,
            poll=0.05,
        )
        for proc in procs:
            proc.kill()
            proc.wait(timeout=60)
        (run,) = client.search_runs([client.get_experiment_by_name("vitexp").experiment_id])
        assert run.info.status == "RUNNING"  # a hard stop: nobody closed the run
        procs = two_workers([*args, "resume=true"], "again", tmp_path, scratch)
        errors = []
        for proc in procs:
            proc.wait(timeout=600)
            errors.append(proc.log.read_text())
            assert proc.returncode == 0, errors[-1][-5000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)

    (resumed,) = client.search_runs([client.get_experiment_by_name("vitexp").experiment_id])
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    (line,) = [x for x in errors[0].splitlines() if x.startswith("vitexp: resuming run ")]
    done = int(line.removeprefix(f"vitexp: resuming run {run.info.run_id} after epoch "))
    assert 1 <= done < epochs  # it continued after a committed epoch, before the last
    assert [s for s, _ in history(client, run.info.run_id, "val_top1")] == list(range(1, epochs + 1))
    steps = history(client, run.info.run_id, "optimizer_step")  # the step goes on, none twice
    assert steps == [(e, e * steps[0][1]) for e in range(1, epochs + 1)]
    # both workers restored weights and optimizer state from the chief's checkpoint
    assert weights_line(errors[0]) == weights_line(errors[1])
    assert list(scratch.glob("vitexp-worker-*")) == []  # the killed non-chief's folder too


@pytest.mark.slow
def test_sigterm_to_each_worker_stops_all_at_one_step_then_resume(tmp_path, store):
    """SIGTERM to each worker of a job in epoch 2, the non-chief first: they agree on the
    step, all stop there (none is left waiting in a collective), exit 143 with the run
    KILLED, and `resume=true` goes on from the last committed epoch."""
    uri, client = store
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    epochs = 3
    job = [*JOB, "data.num_train=1280", f"trainer.epochs={epochs}"]  # 32 steps an epoch
    args = [*job, "trainer.strategy=multi_worker", f"tracking.uri={uri}"]
    procs = two_workers(args, "first", tmp_path, scratch)
    try:
        wait_for(
            lambda: list(tmp_path.glob("outputs/*/*/checkpoints/epoch_0001.keras")),
            *procs,
            timeout=600,
            poll=0.05,
        )
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=300)  # on its own, a worker that stopped alone leaves the other waiting
            assert proc.returncode == 143, proc.log.read_text()[-5000:]
        logs = [p.log.read_text().splitlines() for p in procs]
        said = [[x for x in lines if x.startswith("vitexp: terminated")] for lines in logs]
        wheres = [re.search(r"at step \d+ of epoch \d+", lines[0]) for lines in said if lines]
        assert len(wheres) == 2 and all(wheres) and wheres[0][0] == wheres[1][0], said
        assert said[0][0].endswith("resume=true")
        (run,) = client.search_runs([client.get_experiment_by_name("vitexp").experiment_id])
        assert run.info.status == "KILLED"
        procs = two_workers([*args, "resume=true"], "again", tmp_path, scratch)
        errors = []
        for proc in procs:
            proc.wait(timeout=600)
            errors.append(proc.log.read_text())
            assert proc.returncode == 0, errors[-1][-5000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
    (resumed,) = client.search_runs([client.get_experiment_by_name("vitexp").experiment_id])
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert [s for s, _ in history(client, run.info.run_id, "val_top1")] == list(range(1, epochs + 1))
    assert weights_line(errors[0]) == weights_line(errors[1])
    assert list(scratch.glob("vitexp-worker-*")) == []


def test_a_worker_whose_peer_never_starts_fails_in_one_line(monkeypatch):
    """Checked before TensorFlow, which would wait for the missing worker without end; `train`
    calls this first, so the job ends in this one line (exit 2) before any run exists."""
    from vitexp.train.multiworker import start_workers
    from vitexp.validate import ConfigError

    ports = free_ports(2)  # nothing listens on the second one
    monkeypatch.setenv("TF_CONFIG", tf_config(ports, 0))
    monkeypatch.setenv("VITEXP_WORKER_TIMEOUT", "1")
    with pytest.raises(ConfigError) as err:
        start_workers()
    assert str(err.value) == (
        f"worker 127.0.0.1:{ports[0]}: worker 127.0.0.1:{ports[1]} named in the cluster did "
        "not answer within 1 s: start every worker (or fix TF_CONFIG); VITEXP_WORKER_TIMEOUT sets the wait"
    )


def consecutive_free_ports(n: int) -> int:
    """The first of n free ports in a row (Slurm's workers on one node take base, base+1, ...)."""
    while True:
        base = free_ports(1)[0]
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("", port))
            return base
        except OSError:
            continue


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")  # the one local cluster: its tests one after another
def test_two_workers_under_srun(slurm, tmp_path, store):  # noqa: F811
    uri, client = store
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VITEXP_WORKER_PORT": str(consecutive_free_ports(2))}
    args = [*JOB, "trainer.strategy=multi_worker", f"tracking.uri={uri}"]
    command = ["srun", "-n", "2", "--cpus-per-task=1", sys.executable, "-m", "vitexp", *args]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    (run,) = client.search_runs([client.get_experiment_by_name("vitexp").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["replicas"] == "2"
    assert [step for step, _ in history(client, run.info.run_id, "val_top1")] == list(range(1, EPOCHS + 1))
    digests = [x.rsplit(" ", 1)[1] for x in proc.stderr.splitlines() if "final weights sha256" in x]
    assert len(digests) == 2 and digests[0] == digests[1]


def slurm_state(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True)
    return out.stdout.strip()


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")  # the one local cluster: its tests one after another
def test_a_preempted_two_worker_slurm_job_requeues_and_resumes_its_run(slurm, tmp_path, store):  # noqa: F811
    """An sbatch job of two workers (`srun -n 2`) pre-empted in epoch 2, as Slurm does it:
    SIGTERM to every task. Both stop at the same step, the job requeues itself, and the
    requeued job's workers continue the same run from its last epoch to FINISHED, each epoch
    recorded once, and no worker's scratch folder is left behind."""
    uri, client = store
    epochs = 3
    args = [*JOB, "data.num_train=1280", f"trainer.epochs={epochs}", "trainer.strategy=multi_worker"]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"exec srun -n 2 --cpus-per-task=1 {sys.executable} -m vitexp {' '.join(args)} tracking.uri={uri}\n"
    )
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TMPDIR": str(scratch),
        "VITEXP_WORKER_PORT": str(consecutive_free_ports(2)),
    }
    log = tmp_path / "job.log"
    submit = ["sbatch", "--parsable", "--requeue", "--open-mode=append", "-n", "2", "--cpus-per-task=1"]
    submit += ["--mem=4G", f"--output={log}", str(script)]
    job = subprocess.run(
        submit, cwd=tmp_path, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        wait_for(
            lambda: list(tmp_path.glob("outputs/*/*/checkpoints/epoch_0001.keras")), timeout=600, poll=0.05
        )
        subprocess.run(["scancel", "--signal=TERM", job], check=True)  # to both tasks of the step
        # Slurm holds a requeued job back for two minutes (reason BeginTime); the test lets it start now
        wait_for(lambda: slurm_state(job) == "PENDING BeginTime", timeout=300, poll=0.5)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        wait_for(lambda: "COMPLETED" in job_states(slurm, job), timeout=600, poll=0.5)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    text = log.read_text()
    said = [x for x in text.splitlines() if x.startswith("vitexp: terminated")]
    wheres = [re.search(r"at step \d+ of epoch \d+", x) for x in said]
    assert len(wheres) == 2 and all(wheres) and wheres[0][0] == wheres[1][0], text[-5000:]
    assert any(f"Slurm job {job} requeued" in x for x in said), said
    (run,) = client.search_runs([client.get_experiment_by_name("vitexp").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["replicas"] == "2"
    assert run.data.tags["vitexp.slurm_restarts"] == "1"  # Slurm ran the job a second time
    assert [s for s, _ in history(client, run.info.run_id, "val_top1")] == list(range(1, epochs + 1))
    # multi-worker jobs resume from the last committed epoch: epoch 2 is trained again, whole
    assert "resuming run" in text and history(client, run.info.run_id, "resumed_step") == []
    digests = [x.rsplit(" ", 1)[1] for x in text.splitlines() if "final weights sha256" in x]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert list(scratch.glob("vitexp-worker-*")) == []


def job_states(jobcomp, job: str) -> list[str]:
    """The job's states in the cluster's job-completion log, oldest first."""
    lines = jobcomp.read_text().splitlines() if jobcomp.exists() else []
    return [x.split("JobState=", 1)[1].split()[0] for x in lines if f"JobId={job} " in x and "JobState=" in x]
