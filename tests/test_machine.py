"""What the reports say about the machine, read from /proc/cpuinfo."""

from vitexp.machine import cpu_info, native_bfloat16

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse avx2 fma

processor\t: 1
cpu family\t: 26
model\t\t: 17
model name\t: Other
flags\t\t: avx512f avx512_bf16
"""


def test_cpu_info_names_the_first_processor_with_its_family_and_model(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    info = cpu_info(path)
    assert info["model"] == "AMD EPYC (family 25 model 1)"
    assert info["flags"] == {"fpu", "sse", "avx2", "fma"}
    assert native_bfloat16(info["flags"]) is None


def test_cpu_info_without_the_numbers_or_the_file(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("model name\t: Some CPU\nflags\t: amx_bf16\n")
    assert cpu_info(path) == {"model": "Some CPU", "flags": {"amx_bf16"}}
    assert cpu_info(tmp_path / "missing") == {"model": "unknown", "flags": set()}
