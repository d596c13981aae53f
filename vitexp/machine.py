"""What machine this is: CPU model, cores, the instruction sets that decide bfloat16 speed, GPUs.

Speed figures mean little without the machine beside them (these CPUs differ: some run
bfloat16 matmuls natively, with AVX-512 BF16 or AMX, some do not), so every benchmark
prints `describe()` and `trainer.precision=auto` reads `native_bfloat16()`.
"""

import os
import shutil
import subprocess
from pathlib import Path

# the flags that decide how fast bfloat16 (and float32) matmuls run on a CPU
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_info(path: Path = Path("/proc/cpuinfo")) -> dict[str, str | set[str]]:
    """The first processor's model name, with its family and model numbers (a VM's name can
    be as vague as "AMD EPYC", the numbers still tell Zen 3 from Zen 4), and its flags, from
    /proc/cpuinfo (empty elsewhere)."""
    fields, flags = {}, set()
    try:
        text = path.read_text()
    except OSError:
        return {"model": "unknown", "flags": flags}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key in ("model name", "cpu family", "model") and key not in fields:
            fields[key] = value.strip()
        elif not key and fields:  # the blank line after the first processor
            break
    model = fields.get("model name", "unknown")
    if "cpu family" in fields and "model" in fields:
        model += f" (family {fields['cpu family']} model {fields['model']})"
    return {"model": model, "flags": flags}


def native_bfloat16(flags: set[str] | None = None) -> str | None:
    """The instruction set that runs bfloat16 matmuls natively on this CPU, or None."""
    flags = cpu_info()["flags"] if flags is None else flags
    if "amx_bf16" in flags:
        return "amx_bf16"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return None


def gpu_names() -> list[str]:
    """NVIDIA GPUs by name (nvidia-smi), without importing TensorFlow."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def describe() -> dict:
    """The machine, for reports: CPU model, cores usable here, ISA flags, GPUs."""
    info = cpu_info()
    return {
        "cpu": info["model"],
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": [flag for flag in ISA_FLAGS if flag in info["flags"]],
        "gpus": gpu_names(),
    }


def one_line(machine: dict) -> str:
    """`AMD EPYC, 2 cores, isa avx2 (no native bfloat16), no GPU` and the like."""
    isa = " ".join(machine["isa"]) or "none of " + " ".join(ISA_FLAGS)
    bf16 = "" if native_bfloat16(set(machine["isa"])) else " (no native bfloat16)"
    gpus = ", ".join(machine["gpus"]) or "no GPU"
    return f"{machine['cpu']}, {machine['cores']} cores, isa {isa}{bf16}, {gpus}"
