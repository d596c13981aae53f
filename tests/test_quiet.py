"""TensorFlow's start-up chatter is dropped from stderr; everything else still shows."""

import subprocess
import sys

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
