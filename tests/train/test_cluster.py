"""Beyond one machine: SIGTERM, a real one-node Slurm cluster, pre-emption."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LOCAL_JOBS, TINY, run_vitexp, runs_of, start_vitexp, wait_for

pytestmark = pytest.mark.slow

EPOCHS = 2
LONG = [*TINY, "data.num_train=3072", f"trainer.epochs={EPOCHS}"]  # 77 steps an epoch
PER_EPOCH = -(-int(3072 * 0.8) // 32)


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_sigterm_in_the_first_epoch_ends_killed_and_resumes(tmp_path, store):
    uri, client = store
    run_dir = tmp_path / "run"
    args = [*LONG, f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"]
    proc = start_vitexp(args, tmp_path)
    wait_for((run_dir / "model_summary.txt").exists, proc)  # the run exists, training starts
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("vitexp: terminated (SIGTERM) in the first epoch; run") and "KILLED" in last
    (run,) = runs_of(client)
    assert run.info.status == "KILLED"
    assert not list((run_dir / "checkpoints").glob("epoch_*.keras"))  # stopped before epoch 1 ended
    result = run_vitexp([*args, "resume=true"], tmp_path)  # or closed: it is KILLED, not RUNNING
    assert f"resuming run {run.info.run_id} after epoch 0" in result.stderr
    (again,) = runs_of(client)
    assert again.info.status == "FINISHED"
    steps = history(client, run.info.run_id, "optimizer_step")
    assert steps == [(e, float(PER_EPOCH * e)) for e in range(1, EPOCHS + 1)]  # each epoch once


def job_states(jobcomp: Path, job_ids) -> dict[str, list[str]]:
    """Each job's states in the job-completion log, oldest first."""
    states = {job: [] for job in job_ids}
    for line in jobcomp.read_text().splitlines() if jobcomp.exists() else []:
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("JobId") in states:
            states[fields["JobId"]].append(fields["JobState"])
    return states


def squeue(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True)
    return out.stdout.strip()


@pytest.mark.xdist_group("slurm")  # the one local cluster: its tests one after another
def test_slurm_sweep_reports_to_a_tracking_server(slurm, server, tmp_path):  # noqa: F811
    uri, client, _, _ = server
    args = [*LOCAL_JOBS, *TINY, "trainer.epochs=1", "patch_size=4,8", "tracking.experiment=slurm"]
    run_vitexp(["-m", *args, f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    runs = runs_of(client, "slurm")
    (parent,) = [r for r in runs if r.data.tags.get("vitexp.sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.params["model.patch_size"] for r in children) == ["4", "8"]
    assert {r.info.status for r in children} == {"FINISHED"}
    jobs = [r.data.tags["vitexp.slurm_job_id"] for r in children]
    assert len(set(jobs)) == 2  # each point its own Slurm job
    wait_for(lambda: all("COMPLETED" in s for s in job_states(slurm, jobs).values()), timeout=120, poll=0.5)


@pytest.mark.parametrize("cluster", ["no_sbatch", "controller_down"])
def test_slurm_sweep_without_a_cluster_fails_in_one_line(cluster, tmp_path):
    env = {}
    if cluster == "no_sbatch":
        env["PATH"] = str(Path(sys.executable).parent)
    else:  # a cluster whose controller does not answer
        conf = tmp_path / "slurm.conf"
        conf.write_text(
            "ClusterName=gone\nSlurmctldHost=localhost\nSlurmctldPort=9\nMessageTimeout=2\n"
            "AuthType=auth/munge\nNodeName=localhost CPUs=1\nPartitionName=debug Nodes=localhost\n"
        )
        env["SLURM_CONF"] = str(conf)
    args = ["-m", *LOCAL_JOBS, *TINY, "patch_size=4,8", "tracking.uri=http://127.0.0.1:9"]
    proc = run_vitexp(args, tmp_path, check=False, env=env)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("vitexp: error: hydra/launcher=slurm: ")
    assert ("sbatch is not on the PATH" if cluster == "no_sbatch" else "does not answer") in line
    assert not (tmp_path / "multirun").exists()  # nothing launched


def test_slurm_sweep_into_a_sqlite_file_fails_in_one_line(tmp_path):
    db = tmp_path / "mlflow.db"
    proc = run_vitexp(
        ["-m", *LOCAL_JOBS, *TINY, "patch_size=4,8", f"tracking.uri=sqlite:///{db}"], tmp_path, check=False
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "start a server" in line and line.startswith(
        "vitexp: error: hydra/launcher=slurm: tracking.uri is sqlite"
    )
    assert not db.exists()  # before any run


@pytest.mark.xdist_group("slurm")  # the one local cluster: its tests one after another
def test_preempted_slurm_job_requeues_and_resumes_its_run(slurm, server, tmp_path):  # noqa: F811
    uri, client, _, _ = server
    sweep = tmp_path / "sweep"
    epochs = 3
    args = [*LOCAL_JOBS, *LONG, f"trainer.epochs={epochs}", "tracking.experiment=preempt"]
    proc = start_vitexp(["-m", *args, f"tracking.uri={uri}", f"hydra.sweep.dir={sweep}"], tmp_path)
    wait_for((sweep / "0" / "checkpoints" / "epoch_0001.keras").exists, proc, timeout=600)
    (run,) = [r for r in runs_of(client, "preempt") if "vitexp.slurm_job_id" in r.data.tags]
    job = run.data.tags["vitexp.slurm_job_id"]
    subprocess.run(["scancel", "--signal=TERM", job], check=True)  # pre-empted in epoch 2
    # Slurm holds a requeued job back for two minutes (reason BeginTime); the test lets it start now
    wait_for(lambda: squeue(job) == "PENDING BeginTime", timeout=300, poll=0.5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    (again,) = [r for r in runs_of(client, "preempt") if "vitexp.slurm_job_id" in r.data.tags]
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.tags["vitexp.slurm_restarts"] == "1"  # Slurm ran the job a second time
    steps = history(client, run.info.run_id, "optimizer_step")
    assert steps == [(e, float(PER_EPOCH * e)) for e in range(1, epochs + 1)]  # each epoch once
    # the requeued job went on from the step it was stopped at, inside epoch 2: none trained twice
    ((epoch, resumed),) = history(client, run.info.run_id, "resumed_step")
    assert resumed > PER_EPOCH and resumed % PER_EPOCH and epoch == resumed // PER_EPOCH + 1
    assert not list((sweep / "0" / "checkpoints").glob("step_*"))  # the step checkpoint is spent
    wait_for(lambda: "COMPLETED" in job_states(slurm, [job])[job], timeout=120, poll=0.5)


# ----------------------------------------------------------------- multi-worker data parallelism
def test_multi_worker_without_its_workers_fails_in_one_line(tmp_path, store):
    uri, client = store
    args = [*TINY, "trainer.strategy=multi_worker", f"tracking.uri={uri}"]
    proc = run_vitexp(args, tmp_path, check=False, env={"TF_CONFIG": ""})
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vitexp: error: trainer.strategy=multi_worker needs its workers: set TF_CONFIG")
    assert runs_of(client) == []  # before any run
