"""MLflow: where runs go, checked up front, and writes that survive a flaky server.

By default every run lands in `sqlite:///<project>/mlflow.db` with artifacts in
`<project>/mlruns`, the store `make ui` opens, whatever directory Hydra runs a job in.
"""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# A dead server must cost seconds, not MLflow's default minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")

from mlflow.entities import Metric, Param, RunStatus  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME, MLFLOW_RUN_NOTE  # noqa: E402

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "pyproject.toml").exists() else Path.cwd()
PARENT_ENV = "VITEXP_PARENT_RUN_ID"


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message is one line naming the fix."""


def resolve_uri(uri: str | None) -> str:
    return uri or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store live beside the database file; servers choose their own."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.parent / "mlruns" / experiment).as_uri()
    return None


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fails fast, in one line, when the store at `uri` cannot be used."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as reply:
                if reply.status != 200:
                    raise TrackingError(f"tracking server {uri} answered {reply.status} on /health")
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(
                f"tracking server {uri} is unreachable ({reason}): start it (make server) "
                "or set tracking.uri to a reachable server or a sqlite:/// file"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"tracking.uri={uri}: folder {folder} does not exist or is not writable")


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """`{"model": {"depth": 4}}` -> `{"model.depth": "4"}`, for MLflow params."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, list) else str(tree)}


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
    """The command that started this process; with `resume`, the one that continues it."""
    args = [a for a in sys.argv[1:] if not (resume and a.startswith("resume="))]
    return " ".join(["python -m vitexp", *args, *(["resume=true"] if resume else [])])


class Tracker:
    """One tracking store; metric writes that fail are kept and sent again later.

    Args:
        uri: an MLflow tracking URI, or None for the project's sqlite store.
        experiment: experiment name (created on first use).
        timeout: seconds to wait for a server's /health before giving up.
    """

    def __init__(self, uri: str | None, experiment: str, timeout: float = 10.0):
        self.uri = resolve_uri(uri)
        check_reachable(self.uri, timeout)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment = experiment
        self._experiment_id: str | None = None
        self._pending: list[tuple[str, list[Metric]]] = []

    @classmethod
    def from_config(cls, cfg: Any) -> "Tracker":
        return cls(cfg.uri, cfg.experiment, cfg.timeout_s)

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment, artifact_location=artifact_location(self.uri, self.experiment)
                    )
                except Exception:  # a parallel job created it first
                    self._experiment_id = self.client.get_experiment_by_name(self.experiment).experiment_id
            else:
                self._experiment_id = found.experiment_id
        return self._experiment_id

    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        tags = {MLFLOW_RUN_NAME: name, **tags}
        if parent_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_id
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """Logs metrics at `step`; if the store is down they wait for the next call or `flush`."""
        now = int(time.time() * 1000)
        self._pending.append((run_id, [Metric(k, float(v), now, step) for k, v in metrics.items()]))
        self.flush(raise_errors=False)

    def flush(self, raise_errors: bool = True) -> bool:
        """Sends the metrics kept back by earlier failures; True when none are left."""
        while self._pending:
            run_id, metrics = self._pending[0]
            try:
                self.client.log_batch(run_id, metrics=metrics)
            except Exception as err:
                if raise_errors:
                    raise TrackingError(f"tracking store {self.uri} still failing: {err}") from None
                reason = type(err).__name__
                print(f"vitexp: warning: tracking store down ({reason}), metrics kept", file=sys.stderr)
                return False
            self._pending.pop(0)
        return True

    def flush_with_retry(self, attempts: int = 10, wait_s: float = 3.0) -> bool:
        for _ in range(attempts):
            if self.flush(raise_errors=False):
                return True
            time.sleep(wait_s)
        return False

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def describe(self, run_id: str, text: str) -> None:
        """The run's description, shown at the top of its page in the MLflow UI."""
        self.client.set_tag(run_id, MLFLOW_RUN_NOTE, text)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def children(self, parent_id: str) -> list:
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'",
            max_results=10000,
        )


FINISHED = RunStatus.to_string(RunStatus.FINISHED)
FAILED = RunStatus.to_string(RunStatus.FAILED)
KILLED = RunStatus.to_string(RunStatus.KILLED)
