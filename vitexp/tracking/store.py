"""The tracking store itself: where it is, whether it can be used, a client that creates a
new sqlite store once, and the statuses a run ends with. Only vitexp.tracking uses it."""

import contextlib
import fcntl
import functools
import gc
import logging
import os
import sqlite3
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

from vitexp.tracking.uri import TrackingError

# A dead server must cost seconds, not MLflow's default minutes of retries (MLflow reads
# these when it sends a request).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
# Progress bars for each small download (config, class names, checkpoints) are noise here.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# MLflow's INFO lines about creating a new store's tables are noise to a user.
for _name in ("mlflow.store.db.utils", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)


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
    others wait, then find them made. Clients outside vitexp (the UI, a notebook) do not take
    that lock: the tables are made in one transaction of sqlite's own (`create_tables`).
    """
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    path = Path(uri[len("sqlite:///") :])
    with open(path, "ab") as db:  # sqlite takes an empty file as a new database
        fcntl.flock(db, fcntl.LOCK_EX)  # independent of sqlite's own fcntl byte-range locks
        try:
            create_tables(path)
            return MlflowClient(tracking_uri=uri)
        finally:
            fcntl.flock(db, fcntl.LOCK_UN)


def create_tables(path: Path, patience_s: float = 30.0) -> None:
    """Gives a new sqlite store MLflow's whole schema, whoever else is creating it.

    MLflow builds a new store's schema step by step (a create, then dozens of migrations,
    each its own commit), and a second client doing the same at that moment makes one of them
    fail midway ("table ... already exists", "duplicate column name"). So a store another
    client has begun is left to it, while its schema moves on; a new one, or one left
    half-made for `patience_s`, gets the schema that MLflow makes in a private file, copied
    in one exclusive transaction. A store that holds runs or experiments is never touched.
    """
    from mlflow.store.db.utils import _get_latest_schema_revision

    head = _get_latest_schema_revision()
    with contextlib.closing(sqlite3.connect(path, timeout=60, isolation_level=None)) as db:
        seen, since = None, time.monotonic()
        while _schema_version(db) != head:
            statements = _schema_statements() if seen is None or _stalled(since, patience_s) else None
            db.execute("BEGIN EXCLUSIVE")  # another client's statements wait meanwhile
            try:
                tables = [row[0] for row in db.execute(_TABLES)]
                state = (_schema_version(db), len(tables))
                if state[0] == head or _holds_records(db, tables):
                    return  # made meanwhile; or an older store, which MLflow upgrades itself
                if statements is not None and (not tables or state == seen):
                    for table in tables:
                        db.execute(f'DROP TABLE "{table}"')
                    for statement in statements:
                        db.execute(statement)
                    db.execute("COMMIT")
                    return
            finally:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            if state != seen:  # another client is making it: wait while it gets on
                seen, since = state, time.monotonic()
            time.sleep(0.5)


def _stalled(since: float, patience_s: float) -> bool:
    return time.monotonic() - since > patience_s


_TABLES = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"


def _schema_version(db: sqlite3.Connection) -> str | None:
    try:
        row = db.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.OperationalError:  # no such table yet
        return None
    return row[0] if row else None


def _holds_records(db: sqlite3.Connection, tables: list[str]) -> bool:
    """Whether the store holds runs or experiments of its own (beyond MLflow's Default, 0)."""
    found = "runs" in tables and db.execute("SELECT 1 FROM runs LIMIT 1").fetchone()
    return bool(found) or (
        "experiments" in tables
        and db.execute("SELECT 1 FROM experiments WHERE experiment_id != 0 LIMIT 1").fetchone() is not None
    )


@functools.cache
def _schema_statements() -> list[str]:
    """The statements that make a new store (its tables and the rows it starts with), from
    one MLflow creates in a private folder."""
    with tempfile.TemporaryDirectory() as tmp:
        MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
        with contextlib.closing(sqlite3.connect(f"{tmp}/mlflow.db")) as db:
            return [s for s in db.iterdump() if s not in ("BEGIN TRANSACTION;", "COMMIT;")]


@contextlib.contextmanager
def said_if_slow(what: str, then: str, after_s: float = 1.0):
    """Says on stderr, once the block has waited `after_s` seconds on a store that does not
    answer, what waits and what the user can do (`then`); from a timer thread, so that the
    block itself is not touched."""
    timeout = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "?")
    line = (
        f"vitexp: {what}: the tracking store has not answered for {after_s:g} s (a server gets "
        f"up to {timeout} s); {then}"
    )
    timer = threading.Timer(after_s, os.write, (2, f"{line}\n".encode()))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


class Shielded:
    """A store client whose every call is made whole: each runs inside `shield()`, a context
    manager that holds Ctrl-C and SIGTERM until the call returns (the job's `STOP.held`).

    An interrupt that lands inside SQLAlchemy's handling of a sqlite call can leave a
    statement open on a connection the pool still holds, and SQLAlchemy may turn it into an
    `OperationalError` ('database is locked') that reads as an outage: the write is kept, the
    run trains on, and the lock outlives it, so even its KILLED status cannot be written.
    """

    def __init__(self, client: MlflowClient, shield):
        self._client = client
        self._shield = shield

    def __getattr__(self, name: str):
        found = getattr(self._client, name)
        if not callable(found):
            return found

        @functools.wraps(found)
        def whole(*args, **kwargs):
            with self._shield():
                return found(*args, **kwargs)

        return whole


def release_interrupted(stop: BaseException) -> None:
    """Lets go of what the interrupted code held: a signal can land inside a tracking-store
    write, whose open sqlite transaction would lock the store against closing the run."""
    traceback.clear_frames(stop.__traceback__)
    gc.collect()
