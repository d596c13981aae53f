"""Data-parallel training over several processes or machines (`trainer.strategy=multi_worker`).

Each worker is one process started with the same command. They find each other through
`TF_CONFIG` (`{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker",
"index": i}}`) or, inside `srun`, through Slurm's environment (TensorFlow's
`SlurmClusterResolver`, ports from 8888). `trainer.batch_size` is the global batch, split
evenly over the workers' replicas; scale `optimizer.learning_rate` with it (the linear rule).

The chief (task `chief`, else worker 0) alone writes the MLflow run and the run folder's
checkpoints; the other workers train the same steps and keep their own checkpoints and a
private tracking store in their own run folders.
"""

import json
import os
import socket
import time
from dataclasses import dataclass

import tensorflow as tf

from vitexp.validate import ConfigError

PEER_WAIT_S = float(os.environ.get("VITEXP_PEER_WAIT_S", "60"))


@dataclass
class Workers:
    strategy: tf.distribute.Strategy
    is_chief: bool
    peers: list[str]


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
        return tf.distribute.cluster_resolver.SlurmClusterResolver()
    raise ConfigError(
        "trainer.strategy=multi_worker needs its workers: set TF_CONFIG in each worker's environment "
        "or start the workers with `srun -n N` inside a Slurm allocation"
    )


def start_workers() -> Workers:
    """Creates the strategy; call before anything initialises TensorFlow's devices."""
    resolver = cluster_resolver()
    spec = resolver.cluster_spec().as_dict()
    me = spec[resolver.task_type][resolver.task_id]
    peers = [addr for job in spec.values() for addr in job if addr != me]
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    chief = resolver.task_type == "chief" or (resolver.task_id == 0 and "chief" not in spec)
    wait_for_peers(peers)
    return Workers(strategy, chief, peers)


def wait_for_peers(peers: list[str], wait_s: float = PEER_WAIT_S) -> None:
    """Fails in one line when a worker named in the cluster does not listen within `wait_s`."""
    deadline = time.monotonic() + wait_s
    for peer in peers:
        host, _, port = peer.rpartition(":")
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"multi_worker: worker {peer} did not answer within {wait_s:.0f} s; start every "
                        "worker named in TF_CONFIG (or fix its address)"
                    ) from None
                time.sleep(0.5)
