"""Where a run came from: the command as the user typed it and the code's git commit."""

import shlex
import subprocess
import sys
from pathlib import Path

from vitexp.tracking import PROJECT_ROOT


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def command_line(resume: bool = False) -> str:
    """The command that started this process, as the user typed it (the installed `vitexp`
    script or `python -m vitexp`), quoted for a shell; with `resume`, the one that continues it."""
    program = "vitexp" if Path(sys.argv[0]).name == "vitexp" else "python -m vitexp"
    args = [a for a in sys.argv[1:] if not (resume and a.startswith("resume="))]
    return " ".join([program, *map(shlex.quote, args), *(["resume=true"] if resume else [])])
