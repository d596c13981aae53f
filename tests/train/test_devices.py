"""`trainer.precision=auto` for every kind of machine and model a user has, told the facts,
not read here."""

import keras
import numpy as np
import pytest
from conftest import TINY, compose
from hydra.utils import instantiate

from vitexp.train import devices
from vitexp.train.devices import BF16_MIN_GFLOP, Gpu, choose_precision, setup_tensorflow, training_flops

ZEN3 = {"avx2", "fma"}
ZEN4 = {"avx2", "avx512f", "avx512_bf16"}
SAPPHIRE_RAPIDS = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
A100 = Gpu("NVIDIA A100-SXM4-40GB", (8, 0))
T4 = Gpu("Tesla T4", (7, 5))
# training GFLOP per image of the two models measured in both precisions (README, "Benchmark")
SPEEDRUN = 0.0168  # experiment=vit_fashion_mnist_speedrun
TEXTBOOK = 0.681  # model=vit


@pytest.mark.parametrize(
    "flags, gpus, gflop, policy, reason",
    [
        (ZEN3, [], TEXTBOOK, "float32", "no avx512_bf16 or amx_bf16"),
        (ZEN4, [], SPEEDRUN, "float32", "(avx512_bf16), but the model costs 0.0168 GFLOP"),
        (ZEN4, [], TEXTBOOK, "mixed_bfloat16", "(avx512_bf16) and the model costs 0.681 GFLOP"),
        (SAPPHIRE_RAPIDS, [], SPEEDRUN, "float32", "(amx_bf16), but the model costs 0.0168 GFLOP"),
        (SAPPHIRE_RAPIDS, [], TEXTBOOK, "mixed_bfloat16", "(amx_bf16) and the model costs 0.681 GFLOP"),
        (ZEN3, [A100], SPEEDRUN, "mixed_bfloat16", "A100-SXM4-40GB has bfloat16 (compute capability 8.x)"),
        (SAPPHIRE_RAPIDS, [T4], TEXTBOOK, "mixed_float16", "T4 has no bfloat16 (compute capability 7.x)"),
    ],
    ids=[
        "avx2-only",
        "avx512-bf16-small-model",
        "avx512-bf16-large-model",
        "amx-small-model",
        "amx-large-model",
        "gpu-with-bf16",
        "gpu-without-bf16",
    ],
)
def test_auto_picks_by_the_machine_and_model_it_is_told_of(flags, gpus, gflop, policy, reason):
    asked = []

    def model_gflop():
        asked.append(gflop)
        return gflop

    chosen, why = choose_precision("auto", cpu_flags=flags, gpus=gpus, model_gflop=model_gflop)
    assert chosen == policy
    assert why.startswith("auto:") and reason in why
    # the model is measured only where the choice depends on it: a CPU with native bfloat16
    assert bool(asked) == (flags in (ZEN4, SAPPHIRE_RAPIDS) and not gpus)


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_a_set_precision_is_kept_on_any_machine(precision):
    for flags, gpus in ((ZEN3, []), (ZEN4, []), (SAPPHIRE_RAPIDS, []), (ZEN3, [T4])):
        chosen = choose_precision(precision, cpu_flags=flags, gpus=gpus, model_gflop=lambda: TEXTBOOK)
        assert chosen == (precision, "set by trainer.precision")


def test_the_measured_models_fall_where_they_were_measured():
    """The presets' own models cost what the rule's thresholds were placed between."""
    speedrun = training_flops(compose(["experiment=vit_fashion_mnist_speedrun"]).model) / 1e9
    textbook = training_flops(compose(["model=vit"]).model) / 1e9
    assert speedrun == pytest.approx(SPEEDRUN, rel=0.01) and textbook == pytest.approx(TEXTBOOK, rel=0.01)
    assert speedrun < BF16_MIN_GFLOP <= textbook


def test_measuring_the_model_leaves_no_trace_in_the_run(monkeypatch):
    """Where auto measures the model (a CPU told to have AVX-512 BF16), the model the run then
    builds has the same layer names and initial weights as where nothing was measured."""
    monkeypatch.setattr(devices, "visible_gpus", lambda: [])
    monkeypatch.setattr(devices, "native_bfloat16", lambda flags=None: "avx512_bf16")

    def model_after_setup(precision):
        cfg = compose([*TINY, f"trainer.precision={precision}"])
        chosen = setup_tensorflow(cfg)
        return chosen, instantiate(cfg.model, _convert_="all")

    try:
        (_, set_reason), plain = model_after_setup("float32")
        (chosen, reason), measured = model_after_setup("auto")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert set_reason == "set by trainer.precision"
    assert chosen == "float32" and "GFLOP per training image" in reason  # a tiny model
    assert [w.path for w in measured.weights] == [w.path for w in plain.weights]
    for a, b in zip(measured.weights, plain.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
