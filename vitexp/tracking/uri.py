"""Where the tracking store is, from a URI alone: no MLflow import, so the command line
checks a config in a fraction of a second. The rest of vitexp asks this module, not the URI
string, what a store is."""

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
PROJECT_ROOT = PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "pyproject.toml").exists() else Path.cwd()
# MLflow's own variables, honoured as MLflow's tools honour them
URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"


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


def sqlite_path(uri: str | None) -> Path | None:
    """The database file of a sqlite store's URI (the project's store for None), else None."""
    uri = resolve_uri(uri)
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0])


def env_uri() -> str | None:
    """$MLFLOW_TRACKING_URI, where it is set."""
    return os.environ.get(URI_ENV) or None


def env_experiment() -> str | None:
    """$MLFLOW_EXPERIMENT_NAME, where it is set."""
    return os.environ.get(EXPERIMENT_ENV) or None


def is_server(uri: str | None) -> bool:
    return str(uri).startswith(("http://", "https://"))


TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "file", "databricks")
SQLITE_HEADER = b"SQLite format 3\x00"


def tracking_uri_problem(uri: str) -> str | None:
    """What keeps MLflow from using `uri` (checked before anything is written), or None."""
    scheme = uri.split(":", 1)[0]
    if scheme not in TRACKING_SCHEMES:
        return "use sqlite:///ABS/PATH.db or http://host:port"
    if scheme != "sqlite":
        return None
    if not uri.startswith("sqlite:///") or len(uri) == len("sqlite:///"):
        return "use sqlite:///ABS/PATH.db (three slashes, then an absolute path)"
    path = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    if not path.is_absolute():  # relative to which folder? a job may run elsewhere: say it
        return f"the path is relative: use sqlite:///{path.absolute()}"
    if path.is_dir():
        return f"{path} is a folder: name a .db file in it"
    if not path.parent.is_dir():
        return f"folder {path.parent} does not exist: create it or name another file"
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                return f"{path} is not an SQLite database: name a new file or an MLflow .db file"
    return None
