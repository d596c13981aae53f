"""Data-parallel training over several processes or machines (`trainer.strategy=multi_worker`).

Each worker is one process started with the same command. They find each other through
`TF_CONFIG` (`{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker",
"index": i}}`) or, inside `srun`, through Slurm's environment (TensorFlow's
`SlurmClusterResolver`, ports from `VITEXP_WORKER_PORT`, default 8888, up on each node).
`trainer.batch_size` is the global batch: every global batch is the one a single process
would train on, split evenly over the workers' replicas (tf.data shards each batch by data).
Keep `optimizer.learning_rate` for the same global batch; when you scale the global batch by
k, scale the learning rate by k (the linear rule), with the warmup the schedule already has.

The chief (task `chief`, else worker 0) alone writes the MLflow run and the run folder's
checkpoints. The other workers train the same steps in lockstep (every collective operation
must run on all of them), recording into a private store and checkpoint folder in a temporary
directory that is deleted when they exit; one left by a worker that was killed is deleted
by the next worker that starts on that machine. Resuming, every worker loads the chief's
checkpoint (on several machines, the run folder must be on a shared file system).

A worker first checks, within `VITEXP_WORKER_TIMEOUT` seconds (default 300), that every peer
is up: TensorFlow itself would wait for a missing worker without end.
"""

import atexit
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras.src import tree
from keras.src.backend.tensorflow import trainer as keras_trainer
from omegaconf import DictConfig

from vitexp.tracking import Tracker
from vitexp.tracking.uri import sqlite_store
from vitexp.train.preempt import requeued
from vitexp.train.record import run_tags
from vitexp.train.resume import find_resume
from vitexp.validate import ConfigError

TIMEOUT_ENV = "VITEXP_WORKER_TIMEOUT"
PORT_ENV = "VITEXP_WORKER_PORT"
SCRATCH_PREFIX = "vitexp-worker-"
ALIVE = ".alive"  # made once the folder is locked by its worker


@dataclass
class Workers:
    strategy: tf.distribute.Strategy
    is_chief: bool
    name: str
    shared_cfg: DictConfig | None = None
    scratch: Path | None = None

    def private_config(self, cfg: DictConfig) -> DictConfig:
        """A non-chief worker's config: the same job, recorded in a private store in its
        scratch folder (removed at exit, or by a later worker when this one is killed)."""
        self.shared_cfg = cfg
        remove_dead_scratch()
        self.scratch = claim_scratch()
        atexit.register(shutil.rmtree, self.scratch, True)
        cfg = cfg.copy()
        cfg.tracking.uri = sqlite_store(self.scratch)
        return cfg

    def find_resume(self):
        """The chief's run to continue, read from the shared store (a non-chief worker's
        own store is private); None when not resuming."""
        cfg = self.shared_cfg
        if not requeued() and str(cfg.resume).lower() == "false":
            return None
        return find_resume(Tracker.from_config(cfg.tracking), cfg)

    def open_run(self, tracker, cfg: DictConfig, resume) -> tuple[str, Path, int]:
        """A non-chief worker's private run, with a copy of the chief's checkpoint folder when
        resuming (early stopping and the best epoch then read the same history)."""
        if resume and (resume.out_dir / "checkpoints").is_dir():
            shutil.copytree(resume.out_dir / "checkpoints", self.scratch / "checkpoints", symlinks=True)
        run_id = tracker.start_run(cfg.run_name, run_tags(cfg, self.scratch))
        return run_id, self.scratch, resume.epoch if resume else 0

    def report(self, model) -> None:
        """One line per worker with a digest of its final weights: equal on every worker."""
        digest = hashlib.sha256()
        for weight in model.weights:
            digest.update(np.asarray(keras.ops.convert_to_numpy(weight)).tobytes())
        role = "chief" if self.is_chief else f"the chief recorded the run in {self.shared_cfg.tracking.uri}"
        line = f"vitexp: {self.name} done ({role}); final weights sha256 {digest.hexdigest()[:16]}"
        print(line, file=sys.stderr)


def claim_scratch() -> Path:
    """A new scratch folder, locked for as long as this process lives: the kernel lets go of
    the lock when the process ends, however it ends (SIGKILL, out of memory)."""
    folder = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX))
    lock = os.open(folder, os.O_RDONLY)  # kept open until the process ends
    fcntl.flock(lock, fcntl.LOCK_EX)
    (folder / ALIVE).touch()
    return folder


def remove_dead_scratch() -> None:
    """Removes the scratch folders of workers that ended without removing them: those whose
    lock nobody holds (a folder without `.alive` may be one being claimed right now)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        if not (folder / ALIVE).is_file():
            continue
        try:
            lock = os.open(folder, os.O_RDONLY)
        except OSError:  # gone meanwhile, or another user's
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # its worker is alive
            pass
        finally:
            os.close(lock)


def cluster_resolver() -> tf.distribute.cluster_resolver.ClusterResolver:
    """TF_CONFIG if set, else the Slurm step this process is a task of; one line otherwise."""
    if os.environ.get("TF_CONFIG"):
        try:
            json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]
        except (ValueError, KeyError, TypeError):
            shape = '{"cluster": {"worker": [...]}, "task": {...}}'
            raise ConfigError(f"TF_CONFIG is not JSON of the form {shape}") from None
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "0")) or 0) > 1:
        return slurm_resolver()
    raise ConfigError(
        "trainer.strategy=multi_worker needs its workers: set TF_CONFIG in each worker's environment "
        "or start the workers with `srun -n N` inside a Slurm allocation"
    )


def slurm_resolver() -> tf.distribute.cluster_resolver.SlurmClusterResolver:
    """The workers of this `srun` step; ports from `VITEXP_WORKER_PORT` (8888) up, per node.

    TensorFlow's resolver shares a node's GPUs among its tasks and cannot resolve a node
    with none (it steps through the GPUs by zero): there, each task gets a nominal slot.
    """
    port = int(os.environ.get(PORT_ENV, "8888"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = bool(visible) if visible is not None else shutil.which("nvidia-smi") is not None
    if gpus:
        return tf.distribute.cluster_resolver.SlurmClusterResolver(port_base=port)
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")))
    return _CPUSlurmResolver(port_base=port, gpus_per_node=tasks, gpus_per_task=1, auto_set_gpu=False)


class _CPUSlurmResolver(tf.distribute.cluster_resolver.SlurmClusterResolver):
    """Slurm's workers on nodes without GPUs: the nominal slots are no devices."""

    def num_accelerators(self, task_type=None, task_id=None, config_proto=None):
        return {}


def worker_timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV, "300")
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={text}: give the seconds to wait for the other workers") from None


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def wait_for_peers(resolver, timeout: float) -> None:
    """Returns once every other worker of the cluster accepts connections on its port.

    Meanwhile this worker listens on its own port, so that peers checking on it find it
    before its TensorFlow server starts there. A peer that is not up within `timeout`
    seconds is a one-line error, before TensorFlow would wait for it without end.
    """
    spec = resolver.cluster_spec().as_dict()
    own = spec[resolver.task_type][resolver.task_id]
    peers = [a for job in spec.values() for a in (job.values() if isinstance(job, dict) else job) if a != own]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        port = _split(own)[1]
        try:
            listener.bind(("", port))
        except OSError as err:
            raise ConfigError(f"worker {own}: cannot listen on port {port} ({err.strerror})") from None
        listener.listen(len(peers) + 8)
        deadline = time.monotonic() + timeout
        for peer in peers:
            while not _reachable(peer):
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"worker {own}: worker {peer} named in the cluster did not answer within "
                        f"{timeout:g} s: start every worker (or fix TF_CONFIG); {TIMEOUT_ENV} sets the wait"
                    )
                time.sleep(0.2)  # a retry interval, not a timing assumption


def _reachable(address: str) -> bool:
    try:
        with socket.create_connection(_split(address), timeout=1.0):
            return True
    except OSError:
        return False


def start_workers() -> Workers:
    """Creates the strategy; call before anything initialises TensorFlow's devices."""
    resolver = cluster_resolver()
    wait_for_peers(resolver, worker_timeout())
    spec = resolver.cluster_spec().as_dict()
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    fix_keras_multi_worker()
    logging.getLogger("tensorflow").setLevel(logging.WARNING)  # a line per collective otherwise
    chief = resolver.task_type == "chief" or (resolver.task_id == 0 and "chief" not in spec)
    size = sum(len(job) for job in spec.values())
    return Workers(strategy, chief, f"{resolver.task_type} {resolver.task_id} of {size}")


# ------------------------------------------------------- Keras 3.15 under several workers
def fix_keras_multi_worker() -> None:
    """Two calls in Keras 3.15's TensorFlow trainer that only work within one worker.

    `fit` learns the input shapes by reducing the first distributed batch, a tuple, with
    `strategy.reduce`; across workers that call hands the whole tuple to a collective, which
    cannot convert it ("Attempt to convert a value (PerReplica...) to a Tensor"). Shapes need
    no reduction: this worker's first replica's batch has them.
    Each step then averages its metric results, scalars, over the workers with
    `strategy.reduce(..., axis=0)`, which a scalar does not have: average them whole.
    """
    if getattr(keras_trainer, "_vitexp_multi_worker", False):
        return
    keras_trainer._vitexp_multi_worker = True
    keras_trainer.TensorFlowTrainer._maybe_symbolic_build = _symbolic_build_from_local_batch
    keras_trainer.reduce_per_replica = _reduce_scalars_whole(keras_trainer.reduce_per_replica)


def _symbolic_build_from_local_batch(self, iterator=None, data_batch=None):
    strategy = self._distribute_strategy
    if strategy is None:
        return

    def first_replica(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    if iterator is not None:
        for _, _, batches in iterator:
            data_batch = tree.map_structure(first_replica, next(batches))
            break
    with strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def _reduce_scalars_whole(reduce_per_replica: types.FunctionType):
    def reduce(values, strategy, reduction):
        across_workers = keras_trainer._collective_all_reduce_multi_worker(strategy)
        if reduction not in ("auto", "mean") or not across_workers:
            return reduce_per_replica(values, strategy, reduction)

        def one(value):
            if strategy.experimental_local_results(value)[0].shape.rank == 0:
                return strategy.reduce("MEAN", value, axis=None)
            return reduce_per_replica(value, strategy, reduction)

        return tree.map_structure(one, values)

    return reduce
