"""Keeps TensorFlow's start-up chatter off a user's terminal, and every real message on it.

TensorFlow's native code writes straight to file descriptor 2, below Python's logging and
`TF_CPP_MIN_LOG_LEVEL` for some of its lines: on a machine without NVIDIA drivers a run
opens with "Could not find cuda drivers", "failed call to cuInit: ... (303)" and absl's
"All log messages before absl::InitializeLog()" notice, twice; every process that imports
TensorFlow says "oneDNN custom operations are on" (twice) and which CPU instructions its
binary was not built for. `filter_native_noise()` sets TensorFlow's log level to warnings
and errors (`TF_CPP_MIN_LOG_LEVEL=2`, unless set), and passes the process's fd 2 through a
thread that drops exactly those lines (the CUDA ones only where there is no NVIDIA device,
where they say nothing) and forwards everything else as it comes.
"""

import atexit
import os
import re
import sys
import threading

ALWAYS = (
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    # TensorFlow's notices, not warnings: written before its log level applies, once per import
    r"port\.cc:\d+\] oneDNN custom operations are on",
    r"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized to use available CPU instructions",
    r"^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags",
)
WITHOUT_GPU = (
    r"cudart_stub\.cc.*Could not find cuda drivers",
    r"failed call to cuInit",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"computation placer already registered",
    r"TF-TRT Warning: Could not find TensorRT",
)


def has_nvidia_device() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


def noise_pattern(gpu: bool) -> re.Pattern:
    return re.compile("|".join(ALWAYS + (() if gpu else WITHOUT_GPU)))


def _forward(read_fd: int, out_fd: int, noise: re.Pattern) -> None:
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        pending = b""
        while chunk := pipe.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            kept = [line + b"\n" for line in lines if not noise.search(line.decode(errors="replace"))]
            if kept:
                os.write(out_fd, b"".join(kept))
        if pending and not noise.search(pending.decode(errors="replace")):
            os.write(out_fd, pending)


def filter_native_noise() -> None:
    """From now on, this process's stderr (fd 2) reaches the terminal without the noise."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    terminal = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    forwarder = threading.Thread(
        target=_forward, args=(read_fd, terminal, noise_pattern(has_nvidia_device())), daemon=True
    )
    forwarder.start()

    def restore() -> None:  # at exit: hand fd 2 back, let the thread drain the pipe
        sys.stderr.flush()
        os.dup2(terminal, 2)  # the pipe's last writer in this process is gone
        forwarder.join(timeout=1)  # longer only while a child process still holds the pipe

    atexit.register(restore)
