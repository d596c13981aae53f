"""TensorFlow's start-up chatter is dropped from stderr; everything else still shows."""

import os
import re
import subprocess
import sys

import pytest
from conftest import TINY

from vitexp.quiet import has_nvidia_device

SCRIPT = r"""
import os, sys
from vitexp.quiet import filter_native_noise
filter_native_noise()
os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
os.write(2, b"I0000 00:00:1.0 26108 cudart_stub.cc:31] Could not find cuda drivers on your machine\n")
os.write(2, b"E0000 00:00:1.0 26108 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\n")
os.write(2, b"E0000 a real native error\n")
print("a Python warning", file=sys.stderr)
print("on stdout")
raise SystemExit("vitexp: error: the last line")
"""


def test_noise_is_dropped_and_real_lines_kept_in_order():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and proc.stdout == "on stdout\n"
    assert "absl::InitializeLog" not in proc.stderr
    assert lines[-3:] == ["E0000 a real native error", "a Python warning", "vitexp: error: the last line"]
    cuda = [line for line in lines if "cuInit" in line or "cuda drivers" in line]
    assert len(cuda) == (2 if has_nvidia_device() else 0)  # with a GPU those lines mean something


# What a training run may print: vitexp's lines (its summary's indented ones included) and
# Keras' progress as it prints it when stdout is not a terminal (verbose=2)
ALLOWED = re.compile(
    r"vitexp: .*"
    r"|  (test top-1|best val top-1|checkpoint|tracking|then) .*"
    r"|Epoch \d+/\d+"
    r"|\d+/\d+ - \d+s - \d+[mµu]?s/step - loss: .*"
    r"|"
)


def user_env() -> dict[str, str]:
    """The environment of a user's shell: TensorFlow's log level is not set there."""
    return {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


@pytest.mark.slow
def test_a_training_run_and_a_tool_print_only_vitexp_and_keras_lines(tmp_path, store):
    uri, client = store
    overrides = ["report.enabled=true", "tracking.log_model=true", "trainer.epochs=2", f"tracking.uri={uri}"]
    cmd = [sys.executable, "-m", "vitexp", *TINY, *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=user_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert [line for line in lines if not ALLOWED.fullmatch(line)] == []
    said = [line for line in proc.stderr.splitlines() if line.startswith("vitexp: ")]
    for doing in ("testing the best checkpoint", "drawing the curves", "logging the model"):
        assert any(doing in line for line in said), said  # the seconds after the last epoch
    (run,) = client.search_runs([client.get_experiment_by_name("vitexp").experiment_id])
    tool = [sys.executable, "-m", "vitexp.evaluate", run.info.run_id, "--tracking-uri", uri]
    evaluated = subprocess.run(
        tool, cwd=tmp_path, env=user_env(), capture_output=True, text=True, timeout=600
    )
    assert evaluated.returncode == 0 and "top-1" in evaluated.stdout, evaluated.stderr[-3000:]
    assert evaluated.stderr.splitlines() == []  # no TensorFlow notice (oneDNN, CPU instructions)


def test_the_bench_command_says_a_mistake_in_one_line_and_no_tensorflow_notice(tmp_path):
    # its own process never imports TensorFlow (its workers do, their stderr read by it)
    cmd = [sys.executable, "-m", "vitexp.bench", "--steps", "0"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=user_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "vitexp.bench: error: argument --steps: '0': use a whole number of at least 1"
    ]


# a run on a CPU with native bfloat16, whatever CPU the test runs on: `auto` counts the
# model's FLOPs there (TensorFlow's graph profiler), the one path float32 runs never take
ON_AMX = r"""
import runpy, sys
import vitexp.machine
flags = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
vitexp.machine.cpu_info = lambda path=None: {"model": "a Xeon with AMX (as the test says)", "flags": flags}
sys.argv = ["vitexp", *sys.argv[1:]]
runpy.run_module("vitexp", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_auto_precision_on_a_bfloat16_cpu_prints_only_vitexp_and_keras_lines(tmp_path, store):
    uri, client = store
    args = [a for a in TINY if not a.startswith("trainer.precision")]
    args += ["trainer.precision=auto", "trainer.epochs=1", f"tracking.uri={uri}"]
    args.append(f"hydra.run.dir={tmp_path}/r")
    cmd = [sys.executable, "-c", ON_AMX, *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=user_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert [line for line in lines if not ALLOWED.fullmatch(line)] == []
    (run,) = client.search_runs([client.get_experiment_by_name("vitexp").experiment_id])
    assert run.data.params["precision_reason"].startswith("auto: CPU runs bfloat16 natively (amx_bf16)")
    assert "GFLOP per training image" in run.data.params["precision_reason"]  # the FLOPs were counted
