"""Devices, threads, precision and distribution strategy, set before any model is built."""

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import keras
import tensorflow as tf
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from vitexp.machine import native_bfloat16
from vitexp.train.jobs import parallel_jobs
from vitexp.validate import ConfigError


def setup_tensorflow(cfg: DictConfig) -> tuple[str, str]:
    """Threads, device, seeds, determinism and precision, before any model is built; returns
    the precision and why (`choose_precision`).

    Jobs that a parallel launcher runs side by side share the CPU cores evenly and, on a
    machine with several GPUs, each take one GPU (by job number).
    """
    trainer = cfg.trainer
    keras.backend.clear_session()  # a sweep's jobs may share this process
    if trainer.logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * trainer.logical_cpus
            )
        except RuntimeError:
            pass  # devices already initialised in this process
    jobs = parallel_jobs()
    threads = trainer.threads or (max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None)
    try:
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
        gpus = tf.config.list_physical_devices("GPU")
        if jobs > 1 and len(gpus) > 1:
            tf.config.set_visible_devices(gpus[HydraConfig.get().job.num % len(gpus)], "GPU")
    except RuntimeError:
        pass  # a worker process that already ran a job keeps its first settings
    precision, reason = choose_precision(
        trainer.precision, model_gflop=lambda: training_flops(cfg.model) / 1e9
    )
    keras.backend.clear_session()  # a model measured for `auto` leaves no trace in the run's layer names
    keras.utils.set_random_seed(trainer.seed)
    if trainer.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(precision)
    return precision, reason


def distribution(name: str, jit_compile: str = "auto") -> tf.distribute.Strategy | None:
    """The tf.distribute strategy for `trainer.strategy`; None trains on the default device.

    `auto` mirrors over all GPUs when there are several. `mirrored` uses every GPU, else
    every logical CPU device (`trainer.logical_cpus`). `trainer.batch_size` is the global
    batch, split over the replicas; the learning rate is not changed for you: when you
    scale the batch by k, scale `optimizer.learning_rate` by k too (the linear rule), with
    the warmup the schedule already has.
    """
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else None
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        if not gpus and len(cpus) > 1 and jit_setting(jit_compile) is True:
            raise ConfigError(
                f"trainer.jit_compile=true with trainer.strategy=mirrored over {len(cpus)} logical CPUs: "
                "XLA cannot reach a variable on another CPU device; set trainer.jit_compile=auto"
            )
        return tf.distribute.MirroredStrategy(devices=[d.name for d in gpus] or cpus)
    raise ValueError(f"{name}: multi_worker comes from vitexp.train.multiworker.start_workers")


# On a CPU with native bfloat16 (AVX-512 BF16 or AMX alike), the training GFLOP per image
# (forward x 3) from which bfloat16 trains faster than float32 (measured: README, the table
# after "trainer.precision=auto chooses by what was measured faster")
BF16_MIN_GFLOP = 0.1


@dataclass(frozen=True)
class Gpu:
    """What `auto` needs to know of a GPU: its name and CUDA compute capability."""

    name: str
    compute_capability: tuple[int, int]


def visible_gpus() -> list[Gpu]:
    """The GPUs TensorFlow sees here (none on a machine with CUDA wheels but no GPU)."""
    found = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        found.append(Gpu(details.get("device_name", "GPU"), tuple(details.get("compute_capability", (0, 0)))))
    return found


def choose_precision(
    precision: str,
    cpu_flags: set[str] | None = None,
    gpus: list[Gpu] | None = None,
    model_gflop: Callable[[], float] | None = None,
) -> tuple[str, str]:
    """The Keras policy for `trainer.precision`, and why (recorded as run params).

    `auto`: bfloat16 compute on GPUs that have it (Ampere and newer), float16 with loss
    scaling on older GPUs. On a CPU, float32 where bfloat16 would be emulated (no AVX-512
    BF16 or AMX); where it runs natively, bfloat16 for models whose training costs at least
    `BF16_MIN_GFLOP` per image, float32 for smaller ones, which `make bench` measured slower
    in bfloat16 (README, under `trainer.precision=auto`). Logits and softmax stay float32
    always.

    Args:
        precision: `trainer.precision`.
        cpu_flags: the CPU's flags (/proc/cpuinfo); None reads this machine's.
        gpus: the GPUs to train on; None asks TensorFlow for this machine's.
        model_gflop: the model's training GFLOP per image (forward x 3), asked only on a CPU
            with native bfloat16; None counts as a large model.
    """
    if precision != "auto":
        return str(precision), "set by trainer.precision"  # the plain name, not the Enum
    gpus = visible_gpus() if gpus is None else gpus
    if gpus:
        gpu = gpus[0]
        major = gpu.compute_capability[0]
        if major >= 8:
            return "mixed_bfloat16", f"auto: {gpu.name} has bfloat16 (compute capability {major}.x)"
        return "mixed_float16", f"auto: {gpu.name} has no bfloat16 (compute capability {major}.x)"
    isa = native_bfloat16(cpu_flags)
    if not isa:
        return "float32", "auto: CPU without native bfloat16 (no avx512_bf16 or amx_bf16)"
    threshold = BF16_MIN_GFLOP
    if model_gflop is None:
        return "mixed_bfloat16", f"auto: CPU runs bfloat16 natively ({isa})"
    gflop = model_gflop()
    if gflop >= threshold:
        return "mixed_bfloat16", (
            f"auto: CPU runs bfloat16 natively ({isa}) and the model costs {gflop:.3g} GFLOP per "
            f"training image (>= {threshold:g}: bfloat16 measured faster)"
        )
    return "float32", (
        f"auto: CPU runs bfloat16 natively ({isa}), but the model costs {gflop:.3g} GFLOP per "
        f"training image (< {threshold:g}: float32 measured faster)"
    )


def training_flops(model: DictConfig) -> float:
    """FLOPs of training on one image: the forward pass (TensorFlow's graph profiler over a
    float32 build of `model` at batch 1), times 3 for the backward pass."""
    keras.backend.clear_session()
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        built = instantiate(model, _convert_="all")
    finally:
        keras.mixed_precision.set_global_policy(policy)
    spec = tf.TensorSpec([1, *model.input_shape], tf.float32)
    graph = tf.function(lambda x: built(x)).get_concrete_function(spec).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)  # the profiler's deprecation notice, on every run's terminal
    try:
        return 3.0 * tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops
    finally:
        tf_logger.setLevel(level)


def jit_setting(value: str) -> bool | str:
    return {"auto": "auto", "true": True, "false": False}[str(value).lower()]
