"""Data-parallel training over several processes or machines (`trainer.strategy=multi_worker`).

Each worker is one process started with the same command. They find each other through
`TF_CONFIG` (`{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker",
"index": i}}`) or, inside `srun`, through Slurm's environment (TensorFlow's
`SlurmClusterResolver`, ports from 8888). `trainer.batch_size` is the global batch, split
evenly over the workers' replicas; scale `optimizer.learning_rate` with it (the linear rule).

The chief (task `chief`, else worker 0) alone writes the MLflow run and the run folder's
checkpoints; the other workers train the same steps and keep their own checkpoints and a
private tracking store in their own run folders.

Not working yet: with Keras 3.15, `fit` under this strategy stops at its first batch
("Attempt to convert a value (PerReplica...) to a Tensor"), and a worker named in TF_CONFIG
that never starts makes the others wait in TensorFlow without end.
"""

import json
import os
from dataclasses import dataclass

import tensorflow as tf

from vitexp.validate import ConfigError


@dataclass
class Workers:
    strategy: tf.distribute.Strategy
    is_chief: bool


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
    """Creates the strategy; call before anything initialises TensorFlow's devices. It waits
    until every worker named in the cluster has joined."""
    resolver = cluster_resolver()
    spec = resolver.cluster_spec().as_dict()
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    chief = resolver.task_type == "chief" or (resolver.task_id == 0 and "chief" not in spec)
    return Workers(strategy, chief)
