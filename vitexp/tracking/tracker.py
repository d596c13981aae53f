"""The Tracker: runs written to one MLflow store, through a flaky server, and read back as
vitexp's own records."""

import contextlib
import hashlib
import json
import logging
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param
from mlflow.utils.mlflow_tags import (
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NAME,
    MLFLOW_RUN_NOTE,
)

from vitexp.tracking import tag
from vitexp.tracking.records import FAILED, FINISHED, KILLED, ModelRecord, RunRecord
from vitexp.tracking.store import Shielded, check_reachable, open_client, release_interrupted, said_if_slow
from vitexp.tracking.system import SystemMonitor
from vitexp.tracking.uri import TrackingError, artifact_location, resolve_uri
from vitexp.tracking.views import SHARED_VIEW_TAG, encode

PARENT_ENV = "VITEXP_PARENT_RUN_ID"
# The MLflow UI opens experiments of this kind on their runs table, not its GenAI views.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# A run's class names, index i naming logit i, as a JSON list: any character survives.
CLASS_NAMES_ARTIFACT = "class_names.json"


class StoreDown(TrackingError):
    """The store stayed unreachable to the end of a run: some of its records were not sent."""


class Tracker:
    """One tracking store; writes it cannot take are kept and sent again later, in order.

    Metrics are always kept back that way. Inside `run` every write of the run is (params,
    tags, artifacts, its end), so a run goes on through a server's outage and `settle`
    waits for the server at the end; outside it, other writes fail at once.

    Args:
        uri: an MLflow tracking URI, or None for the project's sqlite store.
        experiment: experiment name (created on first use); None to only read runs by id
            or by experiment name.
        timeout: seconds to wait for a server's /health before giving up.
        reconnect_s: seconds `settle` waits for a store that went away.
        shield: a context manager factory that holds Ctrl-C and SIGTERM while the store is
            called (a training job's `STOP.held`): every call, and each kept write with its
            removal from the queue, is then made whole, never cut off inside the store.
    """

    def __init__(
        self,
        uri: str | None,
        experiment: str | None = None,
        timeout: float = 10.0,
        reconnect_s: float = 0.0,
        shield: Callable[[], contextlib.AbstractContextManager] | None = None,
    ):
        self.uri = resolve_uri(uri)
        self.timeout = timeout
        self.reconnect_s = reconnect_s
        check_reachable(self.uri, timeout)
        self._shield = shield or contextlib.nullcontext
        self._client = open_client(self.uri)
        if shield is not None:
            self._client = Shielded(self._client, shield)
        self.experiment = experiment
        self._experiment_id: str | None = None
        self._pending: list[Callable[[], object]] = []
        self._recording = False  # inside `run`: the run's writes wait out an outage
        self._down = False

    @classmethod
    def from_config(
        cls, cfg: Any, shield: Callable[[], contextlib.AbstractContextManager] | None = None
    ) -> "Tracker":
        """The tracker of a job's `tracking` config; a deleted experiment fails here, at once."""
        tracker = cls(cfg.uri, cfg.experiment, cfg.timeout_s, cfg.get("reconnect_s", 0.0), shield)
        tracker._check_active(tracker._client.get_experiment_by_name(tracker.experiment))
        return tracker

    def _check_active(self, experiment) -> None:
        """MLflow keeps a deleted experiment's name and refuses runs in it: say how to go on."""
        if experiment is not None and experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"tracking.experiment={self.experiment}: that experiment is deleted (id "
                f"{experiment.experiment_id}); restore it with `MLFLOW_TRACKING_URI={self.uri} "
                f"mlflow experiments restore --experiment-id {experiment.experiment_id}`, "
                "or pick another name"
            )

    @property
    def unsent(self) -> int:
        """How many writes are kept back for a store that does not answer."""
        return len(self._pending)

    @property
    def experiment_id(self) -> str:
        if self.experiment is None:
            raise TrackingError("this tracker was opened without an experiment")
        if self._experiment_id is None:
            found = self._client.get_experiment_by_name(self.experiment)
            self._check_active(found)
            if found is None:
                try:
                    self._experiment_id = self._client.create_experiment(
                        self.experiment,
                        artifact_location=artifact_location(self.uri, self.experiment),
                        tags=EXPERIMENT_TAGS,
                    )
                except Exception:  # a parallel job created it first
                    self._experiment_id = self._client.get_experiment_by_name(self.experiment).experiment_id
            else:
                self._experiment_id = found.experiment_id
                for key, value in EXPERIMENT_TAGS.items():  # experiments made before the tag
                    if found.tags.get(key) != value:
                        self._client.set_experiment_tag(found.experiment_id, key, value)
        return self._experiment_id

    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        """Creates a run with the tags MLflow's own runs carry (user, source) and `tags`."""
        from mlflow.tracking.context.registry import resolve_tags

        tags = {**resolve_tags(), MLFLOW_RUN_NAME: name, **tags}
        if parent_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_id
        run = self._client.create_run(self.experiment_id, tags=tags, run_name=name)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._send(partial(self._client.log_batch, run_id, params=items[start : start + 100]))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """Logs metrics at `step`; if the store is down they wait for the next call or `flush`
        (each keeps its timestamp: a batch sent twice is recorded once)."""
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._pending.append(partial(self._client.log_batch, run_id, metrics=batch))
        self.flush(raise_errors=False)

    def _send(self, write: Callable[[], object]) -> None:
        """Makes a write after those kept back; inside `run` it is kept too while the store is down."""
        if not self._recording:
            self.flush(raise_errors=False)
            write()
            return
        self._pending.append(write)
        self.flush(raise_errors=False)

    def flush(self, raise_errors: bool = True) -> bool:
        """Sends the writes kept back by earlier failures, in order; True when none are left.

        A write the store refuses (a bad value, not an outage) is dropped and its error raised.
        """
        while self._pending:
            try:
                with self._shield():  # an interrupt waits until the write has left the queue
                    self._pending[0]()
                    self._pending.pop(0)
            except Exception as err:
                if not unreachable(err):
                    self._pending.pop(0)
                    raise
                if raise_errors:
                    raise TrackingError(f"tracking store {self.uri} still failing: {err}") from None
                if not self._down:
                    print(
                        f"vitexp: warning: tracking store {self.uri} is down ({type(err).__name__}); "
                        "metrics kept, with the run's other records, until it answers again",
                        file=sys.stderr,
                    )
                self._down = True
                return False
        if self._down:
            print(f"vitexp: tracking store {self.uri} is back; the kept records are sent", file=sys.stderr)
        self._down = False
        return True

    def settle(self) -> None:
        """Sends every kept write, waiting up to `reconnect_s` for a store that went away.

        Raises:
            StoreDown: the store did not come back in time; the writes stay kept.
        """
        deadline = time.monotonic() + self.reconnect_s
        if self.flush(raise_errors=False):
            return
        print(
            f"vitexp: waiting up to {self.reconnect_s:.0f} s (tracking.reconnect_s) for tracking store "
            f"{self.uri} to take {len(self._pending)} kept records",
            file=sys.stderr,
        )
        while time.monotonic() < deadline:
            time.sleep(min(3.0, max(deadline - time.monotonic(), 0.0)))
            if self.flush(raise_errors=False):
                return
        raise StoreDown(
            f"tracking store {self.uri} still unreachable after {self.reconnect_s:.0f} s; "
            f"{len(self._pending)} records not sent"
        )

    def wait_reachable(self) -> bool:
        """Whether the store answers, waiting up to `reconnect_s` for one that went away."""
        deadline = time.monotonic() + self.reconnect_s
        while True:
            try:
                check_reachable(self.uri, self.timeout)
                return True
            except TrackingError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(3.0)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self._send(partial(self._client.log_artifact, run_id, str(path), artifact_path))

    def log_artifacts(self, run_id: str, folder: str | Path, artifact_path: str | None = None) -> None:
        self._send(partial(self._client.log_artifacts, run_id, str(folder), artifact_path))

    def log_class_names(self, run_id: str, names: list[str]) -> None:
        def write():  # the file exists while it is sent, however late
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / CLASS_NAMES_ARTIFACT
                path.write_text(json.dumps(list(names), ensure_ascii=False, indent=0), encoding="utf-8")
                self._client.log_artifact(run_id, str(path))

        self._send(write)

    def monitor_system(self, run_id: str, resume: bool = False):
        """Starts MLflow's own system-metrics monitor for the run (CPU, memory, disk,
        network; GPUs through nvidia-ml-py), publishing after the run's first own metrics
        (`vitexp.tracking.system`); `finish()` the returned monitor at the end."""
        monitor = SystemMonitor(run_id, resume_logging=resume, tracking_uri=self.uri)
        monitor.start()
        return monitor

    def log_datasets(self, run_id: str, name: str, source: str, splits: dict[str, tuple]) -> None:
        """Records each split `{context: (images, labels)}` as a run input: name, source,
        digest of its bytes, size."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for context, (images, labels) in splits.items():
            digest = hashlib.sha256(np.ascontiguousarray(images).data)
            digest.update(np.ascontiguousarray(labels).data)
            dataset = Dataset(
                name=name,
                digest=digest.hexdigest()[:16],
                source_type="local" if Path(source).exists() else "code",
                source=json.dumps({"uri": source}),
                schema=json.dumps({"images": f"uint8 {list(images.shape[1:])}", "labels": "int32"}),
                profile=json.dumps({"num_rows": len(images)}),
            )
            inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
        self._send(partial(again_after_a_race, partial(self._client.log_inputs, run_id, datasets=inputs)))

    def log_model(self, run_id: str, checkpoint: Path, class_names: list[str], model=None, tta: str = "none"):
        """Logs a checkpoint as the run's MLflow Model (vitexp's pyfunc, with signature and
        input example) that answers from the test-time views `tta` the run was scored on,
        through the client alone: the run's status stays as it is. Returns the model's id."""
        import mlflow
        from mlflow.entities import LoggedModelOutput

        from vitexp.tracking.pyfunc import (  # pandas and mlflow.pyfunc: to log a model only
            PACKAGE_DIR,
            VitexpClassifier,
            requirements,
        )

        classifier = VitexpClassifier()
        classifier.load(checkpoint, class_names, model, tta)
        example = np.zeros((1, *classifier.model.input_shape[1:]), dtype=np.uint8)
        mlflow.set_tracking_uri(self.uri)
        run = self._client.get_run(run_id)
        # made here, in the run's experiment, so that no fluent run (which would end it) is needed
        logged = self._client.create_logged_model(
            run.info.experiment_id, "model", run_id, tags={tag.TTA: tta}, params=dict(run.data.params)
        )
        # MLflow's hints (type hints, integer columns) do not apply to uint8 images
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            signature = mlflow.models.infer_signature(example, classifier.predict(None, example))
            names = Path(tmp) / CLASS_NAMES_ARTIFACT
            names.write_text(json.dumps(class_names, ensure_ascii=False), encoding="utf-8")
            with quiet_model_logging():
                mlflow.pyfunc.log_model(
                    name="model",
                    python_model=VitexpClassifier(),
                    artifacts={"checkpoint": str(checkpoint), "class_names": str(names)},
                    model_config={"tta": tta},
                    code_paths=[str(PACKAGE_DIR)],
                    signature=signature,
                    input_example=example,
                    pip_requirements=requirements(classifier.model),
                    model_id=logged.model_id,
                )
        self._client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        return logged.model_id

    def run_model(self, run_id: str) -> ModelRecord | None:
        """The newest READY MLflow Model the run logged, None if none."""
        from mlflow.entities import LoggedModelStatus

        outputs = self._client.get_run(run_id).outputs
        models = [
            self._client.get_logged_model(o.model_id) for o in (outputs.model_outputs if outputs else [])
        ]
        ready = [m for m in models if m.status == LoggedModelStatus.READY]
        if not ready:
            return None
        newest = max(ready, key=lambda m: m.creation_timestamp)
        return ModelRecord(newest.model_id, dict(newest.tags))

    def register_model(self, model_id: str, name: str) -> str:
        """Registers a logged MLflow Model under `name`; returns the new version."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        return str(mlflow.register_model(f"models:/{model_id}", name).version)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._send(partial(self._client.set_tag, run_id, key, value))

    def ui_link(self, run_id: str | None = None) -> str:
        """The MLflow UI page of the experiment (or one run), in its model-training mode:
        the store's own server, or `make ui` (127.0.0.1:5000) for a sqlite file."""
        base = self.uri.rstrip("/") if self.uri.startswith("http") else "http://127.0.0.1:5000"
        page = f"runs/{run_id}" if run_id else "runs"
        return f"{base}/#/experiments/{self.experiment_id}/{page}?workflowType=machine_learning"

    def share_view(self, key: str, state: dict) -> str:
        """Stores a runs-table state (`vitexp.tracking.views`) in the experiment under `key`;
        returns the link that opens the table in it."""
        self._client.set_experiment_tag(self.experiment_id, SHARED_VIEW_TAG + key, encode(state))
        return self.ui_link().replace("?", f"?viewStateShareKey={key}&", 1)

    def ui_command(self) -> str | None:
        """The command that serves the UI of a store file; None for a store that is a server."""
        if self.uri.startswith(("http://", "https://")):
            return None
        return f"mlflow ui --backend-store-uri {shlex.quote(self.uri)}"

    def describe(self, run_id: str, text: str) -> None:
        """The run's description, shown at the top of its page in the MLflow UI."""
        self.set_tags(run_id, {MLFLOW_RUN_NOTE: text})

    def reopen(self, run_id: str) -> None:
        """Marks an interrupted run RUNNING again, for the job that resumes it."""
        self._client.update_run(run_id, status="RUNNING")

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._send(partial(self._client.set_terminated, run_id, status=status))

    @contextlib.contextmanager
    def run(self, run_id: str, error_text: Callable[[BaseException], str] | None = None) -> Iterator[str]:
        """Records the run's writes through an outage of the store and ends the run when the
        block ends: FINISHED, once every kept write is sent (`settle`); KILLED on Ctrl-C or
        SIGTERM (any KeyboardInterrupt); FAILED on any other error, which `error_text`
        (default: type and message) writes into the run's `vitexp.error` tag. A run whose
        store stayed down (`StoreDown`) is left as the store last saw it, to be resumed.

        Args:
            run_id: a run made by `start_run` (or reopened by `reopen`).
            error_text: what a FAILED run records about its error.
        """
        self._recording = True
        try:
            yield run_id
            self.end_run(run_id, FINISHED)
            self.settle()
        except StoreDown:
            raise
        except KeyboardInterrupt as stop:
            release_interrupted(stop)
            stop_now = "press Ctrl-C again to stop now and leave the run as the store last saw it"
            with said_if_slow(f"marking run {run_id} KILLED", stop_now):
                self.end_run(run_id, KILLED)
            raise
        except BaseException as err:
            text = error_text(err) if error_text else f"{type(err).__name__}: {err}"[:5000]
            self.set_tags(run_id, {tag.ERROR: text})
            self.end_run(run_id, FAILED)
            raise
        finally:
            self._recording = False

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run `run_id`, None if the store has no such run."""
        try:
            return RunRecord.of(self._client.get_run(run_id))
        except Exception:
            return None

    def experiment_of(self, run) -> str:
        """The name of the experiment a run belongs to."""
        return self._client.get_experiment(run.experiment_id).name

    def experiment_names(self) -> dict[str, str]:
        """Every active experiment of the store: id -> name, oldest first."""
        found = self._client.search_experiments(order_by=["creation_time ASC"])
        return {e.experiment_id: e.name for e in found}

    def find_runs(
        self,
        tags: dict[str, str] | None = None,
        status: str | None = None,
        *,
        unfinished: bool = False,
        newest_first: bool = False,
        best_first: str | None = None,
        limit: int = 10000,
        experiment_id: str | None = None,
    ) -> list[RunRecord]:
        """Runs of the experiment (or of `experiment_id`) that carry all `tags`, optionally of
        one `status` or `unfinished`, newest first or by metric `best_first` (highest first)."""
        conditions = [f"tags.`{key}` = '{value}'" for key, value in (tags or {}).items()]
        conditions += [f"attributes.status = '{status}'"] if status else []
        conditions += [f"attributes.status != '{FINISHED}'"] if unfinished else []
        order = ["attributes.start_time DESC"] if newest_first else []
        order += [f"metrics.`{best_first}` DESC"] if best_first else []
        found = self._client.search_runs(
            [experiment_id or self.experiment_id],
            filter_string=" and ".join(conditions),
            order_by=order or None,
            max_results=limit,
        )
        return [RunRecord.of(run) for run in found]

    def children(self, parent_id: str, experiment_id: str | None = None, best_first: str | None = None):
        """The runs started under `parent_id` (a sweep's jobs)."""
        tags = {MLFLOW_PARENT_RUN_ID: parent_id}
        return self.find_runs(tags, experiment_id=experiment_id, best_first=best_first)

    def unfinished_runs(self, config_hash: str) -> list:
        """Runs of a config (tag `vitexp.config_hash`) that did not finish, newest first."""
        return self.find_runs({tag.CONFIG_HASH: config_hash}, unfinished=True, newest_first=True, limit=50)

    def finished_run(self, config_hash: str):
        """A FINISHED run of a config (tag `vitexp.config_hash`), None if there is none."""
        runs = self.find_runs({tag.CONFIG_HASH: config_hash}, FINISHED, limit=1)
        return runs[0] if runs else None

    def runs_under(self, target: str, best_first: str | None = None) -> tuple[Any, list]:
        """What a tool's `target` names: a run id gives that run and its children (a sweep's
        jobs); an experiment name gives None and the experiment's runs.

        Raises:
            ValueError: `target` is neither.
        """
        run = self.get_run(target)
        if run is not None:
            return run, self.children(target, run.experiment_id, best_first)
        experiment = self._client.get_experiment_by_name(target)
        if experiment is None:
            self.require_runs()
            raise ValueError(f"{target!r} is neither a run id nor an experiment name")
        return None, self.find_runs(experiment_id=experiment.experiment_id, best_first=best_first)

    def require_runs(self) -> None:
        """Raises ValueError, saying which store it read, when the store holds no run at all."""
        if not self._client.search_runs(
            [e.experiment_id for e in self._client.search_experiments()], max_results=1
        ):
            raise ValueError(
                f"the store {self.uri} is empty (no runs): train first, or name the store that "
                "holds your runs with --tracking-uri or $MLFLOW_TRACKING_URI"
            )

    def metric_history(self, run_id: str, key: str) -> dict[int, float]:
        """Every value of metric `key` the run logged, by step, in step order."""
        points = sorted(self._client.get_metric_history(run_id, key), key=lambda m: m.step)
        return {m.step: m.value for m in points}

    def download(self, run_id: str, path: str, folder: str | Path) -> Path:
        """Fetches the run's artifact `path` into `folder`; raises when it has none there."""
        return Path(self._client.download_artifacts(run_id, path, str(folder)))

    def class_names(self, run, num_classes: int) -> list[str]:
        """A run's class names: its `class_names.json`; for runs recorded before it, the old
        comma-joined `class_names` param; else `0 .. num_classes-1`."""
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = self.download(run.id, CLASS_NAMES_ARTIFACT, tmp)
                return json.loads(path.read_text(encoding="utf-8"))
            except Exception:
                pass
        joined = run.params.get("class_names", "")
        names = joined.split(",") if joined else []
        return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


class _ModelLoggingNotices(logging.Filter):
    """MLflow's notices while a model is logged: its INFO lines, and the advice it gives for
    every Python object model (vitexp's is code shipped with the model, its weights a file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        advice = record.getMessage().startswith("Passing a Python object as `python_model`")
        return record.levelno > logging.INFO and not advice


@contextlib.contextmanager
def quiet_model_logging() -> Iterator[None]:
    """MLflow's warnings and errors still show while a model is logged; its notices do not."""
    logger, notices = logging.getLogger("mlflow.pyfunc"), _ModelLoggingNotices()
    logger.addFilter(notices)
    try:
        yield
    finally:
        logger.removeFilter(notices)


def unreachable(err: Exception) -> bool:
    """Whether a failed write met an outage (no answer, a server error, a locked database),
    worth sending again, rather than a refusal of the write itself."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.get_http_status_code() >= 500
    return isinstance(err, (ConnectionError, TimeoutError)) or type(err).__name__ == "OperationalError"


# a unique key violated, in the words of PostgreSQL, sqlite and MySQL
DUPLICATE_KEY = ("UniqueViolation", "UNIQUE constraint", "Duplicate entry")


def again_after_a_race(write: Callable[[], object], attempts: int = 3) -> object:
    """Makes a write that creates a shared row, once more when a concurrent run created it
    first: MLflow checks for a dataset, then inserts it, so two runs of the same data at once
    on a server over PostgreSQL both insert, and one fails on the unique key."""
    from mlflow.exceptions import MlflowException

    for _ in range(attempts - 1):
        try:
            return write()
        except MlflowException as err:
            if not any(text in str(err) for text in DUPLICATE_KEY):
                raise
    return write()


def source_tags(commit: str) -> dict[str, str]:
    """The tags by which MLflow shows the code of a run: its git commit and MLflow's version."""
    import mlflow

    return {MLFLOW_GIT_COMMIT: commit, "version.mlflow": mlflow.__version__}


def model_name_problem(name: str) -> str | None:
    """Why MLflow would refuse `name` for a registered model (its own rule), or None."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    if not name.strip():
        return "a registered model needs a name, e.g. --name vitexp-classifier"
    try:
        _validate_model_name(name)
    except MlflowException as err:
        return f"MLflow refuses it: {err.message.splitlines()[0]}"
    return None
