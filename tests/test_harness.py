"""The suite's own machinery: `make test` runs it with `--dist loadgroup`, and the tests that
share an expensive module fixture (or the one local Slurm cluster) rely on their xdist group
keeping them on one worker. A pytest / pytest-xdist pair that drops the groups does so
silently; this says so."""

import subprocess
import sys

GROUPED = """
import os, pytest
pytestmark = pytest.mark.xdist_group("shared")

@pytest.fixture(scope="module")
def made():
    with open("made.log", "a") as log:
        log.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")

@pytest.mark.parametrize("i", range(6))
def test_grouped(i, made):
    pass
"""

LOOSE = """
import pytest

@pytest.mark.parametrize("i", range(6))
def test_loose(i):
    pass
"""


def test_an_xdist_group_runs_on_one_worker_and_builds_its_fixture_once(tmp_path):
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    (tmp_path / "test_loose.py").write_text(LOOSE)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    workers = (tmp_path / "made.log").read_text().split()
    assert len(workers) == 1, f"the group's fixture was built on each worker: {workers}"
