"""The tracking store itself: where it is, whether it can be used, a client that creates a
new sqlite store once, and the statuses a run ends with. Only vitexp.tracking uses it."""

import fcntl
import gc
import json
import logging
import os
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

# A dead server must cost seconds, not MLflow's default minutes of retries (MLflow reads
# these when it sends a request).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
# Progress bars for each small download (config, class names, checkpoints) are noise here.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# MLflow's INFO lines about creating a new store's tables are noise to a user.
for _name in ("mlflow.store.db.utils", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)

PACKAGE_DIR = Path(__file__).resolve().parent.parent
PROJECT_ROOT = PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "pyproject.toml").exists() else Path.cwd()


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message is one line naming the fix."""


def sqlite_store(folder: Path) -> str:
    """The URI of a sqlite store in `folder` (its artifacts go beside it)."""
    return f"sqlite:///{Path(folder) / 'mlflow.db'}"


def resolve_uri(uri: str | None) -> str:
    return uri or sqlite_store(PROJECT_ROOT)


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


def open_client(uri: str) -> MlflowClient:
    """The MLflow client for `uri`; a new sqlite store is created once, whoever starts first.

    MLflow creates a sqlite store's tables when the first client opens it, and processes that
    do so at the same moment race in the schema migration (`_alembic_tmp_... already exists`).
    The database file itself is the lock: the first process creates the tables while the
    others wait, then find them made.
    """
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    with open(uri[len("sqlite:///") :], "ab") as db:  # sqlite takes an empty file as a new database
        fcntl.flock(db, fcntl.LOCK_EX)  # independent of sqlite's own fcntl byte-range locks
        try:
            return MlflowClient(tracking_uri=uri)
        finally:
            fcntl.flock(db, fcntl.LOCK_UN)


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """`{"model": {"depth": 4}}` -> `{"model.depth": "4"}`, for MLflow params."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, list) else str(tree)}


def release_interrupted(stop: BaseException) -> None:
    """Lets go of what the interrupted code held: a signal can land inside a tracking-store
    write, whose open sqlite transaction would lock the store against closing the run."""
    traceback.clear_frames(stop.__traceback__)
    gc.collect()


FINISHED = RunStatus.to_string(RunStatus.FINISHED)
FAILED = RunStatus.to_string(RunStatus.FAILED)
KILLED = RunStatus.to_string(RunStatus.KILLED)
