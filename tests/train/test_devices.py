"""`trainer.precision=auto` for every kind of machine a user has, told the facts, not read here."""

import pytest

from vitexp.train.devices import Gpu, choose_precision

ZEN3 = {"avx2", "fma"}
ZEN4 = {"avx2", "avx512f", "avx512_bf16"}
SAPPHIRE_RAPIDS = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
A100 = Gpu("NVIDIA A100-SXM4-40GB", (8, 0))
T4 = Gpu("Tesla T4", (7, 5))


@pytest.mark.parametrize(
    "flags, gpus, policy, reason",
    [
        (ZEN3, [], "float32", "no avx512_bf16 or amx_bf16"),
        (ZEN4, [], "mixed_bfloat16", "natively (avx512_bf16)"),
        (SAPPHIRE_RAPIDS, [], "mixed_bfloat16", "natively (amx_bf16)"),
        (ZEN3, [A100], "mixed_bfloat16", "A100-SXM4-40GB has bfloat16 (compute capability 8.x)"),
        (SAPPHIRE_RAPIDS, [T4], "mixed_float16", "Tesla T4 has no bfloat16 (compute capability 7.x)"),
    ],
    ids=["avx2-only", "avx512-bf16", "amx", "gpu-with-bf16", "gpu-without-bf16"],
)
def test_auto_picks_by_the_machine_it_is_told_of(flags, gpus, policy, reason):
    chosen, why = choose_precision("auto", cpu_flags=flags, gpus=gpus)
    assert chosen == policy
    assert why.startswith("auto:") and reason in why


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_a_set_precision_is_kept_on_any_machine(precision):
    for flags, gpus in ((ZEN3, []), (SAPPHIRE_RAPIDS, []), (ZEN3, [T4])):
        chosen = choose_precision(precision, cpu_flags=flags, gpus=gpus)
        assert chosen == (precision, "set by trainer.precision")
