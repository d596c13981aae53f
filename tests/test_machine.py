"""The machine description that goes with every speed figure, and what precision auto picks."""

from vitexp.machine import ISA_FLAGS, cpu_info, describe, native_bfloat16, one_line

CPUINFO = """processor\t: 0
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 sha_ni
processor\t: 1
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 sha_ni
"""


def test_cpu_info_reads_model_and_flags(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    info = cpu_info(path)
    assert info["model"] == "AMD EPYC 9B14" and {"avx2", "avx512_bf16"} <= info["flags"]
    assert cpu_info(tmp_path / "missing") == {"model": "unknown", "flags": set()}


def test_native_bfloat16_needs_the_instructions():
    assert native_bfloat16({"avx2", "avx512f"}) is None
    assert native_bfloat16({"avx512f", "avx512_bf16"}) == "avx512_bf16"
    assert native_bfloat16({"avx512_bf16", "amx_bf16", "amx_tile"}) == "amx_bf16"


def test_describe_this_machine_and_auto_precision_agree():
    from vitexp.devices import choose_precision

    machine = describe()
    assert machine["cores"] >= 1 and set(machine["isa"]) <= set(ISA_FLAGS)
    policy, reason = choose_precision("auto")
    assert policy == ("mixed_bfloat16" if native_bfloat16() else "float32")
    assert reason.startswith("auto: CPU") and (native_bfloat16() or "no avx512_bf16") in reason
    assert choose_precision("float32") == ("float32", "set by trainer.precision")
    assert f"{machine['cores']} cores" in one_line(machine)
