"""Beyond one machine: checks a Slurm sweep before it submits anything.

A Slurm sweep needs a cluster that answers (`sbatch` on the PATH, `slurmctld` up) and a
tracking store that jobs on other nodes can share: an `mlflow server`, not a sqlite file
(sqlite on a shared file system corrupts under many writers, and a node-local file is
invisible to the others).
"""

import shutil
import subprocess

from vitexp.tracking.uri import is_server, resolve_uri

SLURM_LAUNCHERS = ("hydra/launcher=slurm", "hydra/launcher=submitit_slurm")


def uses_slurm(argv: list[str]) -> bool:
    return any(arg.lstrip("+~") in SLURM_LAUNCHERS for arg in argv)


def slurm_problem() -> str | None:
    """Why no Slurm cluster can take jobs from here, or None when one answers."""
    if shutil.which("sbatch") is None:
        return (
            "hydra/launcher=slurm: sbatch is not on the PATH; run on a Slurm login node, or start "
            "a one-node cluster here with `make slurm-up`"
        )
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"hydra/launcher=slurm: scontrol ping failed ({type(err).__name__}); is slurmctld up?"
    if ping.returncode != 0 or " is UP" not in ping.stdout:
        reply = (ping.stdout + ping.stderr).strip().splitlines() or ["no reply"]
        return (
            f"hydra/launcher=slurm: the Slurm controller does not answer ({reply[-1]}); "
            "start slurmctld (`make slurm-up` for a local one)"
        )
    return None


def launcher_problem(argv: list[str], tracking_uri: str | None) -> str | None:
    """The one-line reason a sweep cannot be launched as asked, or None."""
    if not uses_slurm(argv):
        return None
    uri = resolve_uri(tracking_uri)
    if not is_server(uri):
        return (
            f"hydra/launcher=slurm: tracking.uri is {uri}, a local store that jobs on other nodes "
            "cannot share safely; start a server (make server HOST=0.0.0.0) and set "
            "tracking.uri=http://<this host>:5000"
        )
    return slurm_problem()
