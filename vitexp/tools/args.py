"""The arguments every tool shares (`vitexp.tools.evaluate`, `predict`, `compare`, `registry`, `explain`).

The MLflow store is `--tracking-uri`, or `tracking.uri=...` among a tool's overrides, or
$MLFLOW_TRACKING_URI, or the project's store; the experiment, where a tool needs one, is
$MLFLOW_EXPERIMENT_NAME or `vitexp`, as for training. Options and overrides may come in
any order, and every mistake ends in one line `vitexp.<tool>: error: ...`.
"""

import argparse
from typing import NoReturn

from vitexp.config import compose
from vitexp.errors import fail, failing_on
from vitexp.quiet import filter_native_noise
from vitexp.startup import leave_sklearn_out_of_keras
from vitexp.tracking.uri import env_uri, sqlite_path, tracking_uri_problem


def default_experiment() -> str:
    """The experiment a run goes to by default: conf/tracking/mlflow.yaml's, which is
    $MLFLOW_EXPERIMENT_NAME where that is set."""
    return compose([]).tracking.experiment


class ToolParser(argparse.ArgumentParser):
    """An argument parser with `--tracking-uri` that reports mistakes in one line.

    Args:
        module: the tool's module, `vitexp.tools.evaluate`; it names the tool in messages.
        doc: the module docstring; its first line is the description.
    """

    def __init__(self, module: str, doc: str):
        # no abbreviations: `--seed 3` must not quietly mean `--seeds 3`
        super().__init__(
            prog=f"python -m {module}", description=doc.strip().split("\n")[0], allow_abbrev=False
        )
        self.module = module
        self.add_argument(
            "--tracking-uri",
            default=None,
            help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the project's store)",
        )

    def error(self, message: str) -> NoReturn:  # argparse's usage block buries the message
        self.fail(message)

    def fail(self, message: str) -> NoReturn:
        fail(message, self.module)

    def failing_on(self, *errors: type[Exception]):
        """A block whose `errors` end the tool in one line, `vitexp.<tool>: error: ...`."""
        return failing_on(*errors, prog=self.module)

    def parse(self, argv: list[str] | None = None) -> argparse.Namespace:
        """Parses options and positionals in any order and settles the tracking URI."""
        filter_native_noise()
        leave_sklearn_out_of_keras()
        args = self.parse_intermixed_args(argv)
        overrides = getattr(args, "overrides", None)
        if overrides is not None:  # `tracking.uri=...` reads like the training command's
            given = [o.split("=", 1)[1] for o in overrides if o.startswith("tracking.uri=")]
            args.overrides = [o for o in overrides if not o.startswith("tracking.uri=")]
            if given and args.tracking_uri not in (None, given[-1]):
                self.fail(f"--tracking-uri {args.tracking_uri} and tracking.uri={given[-1]} disagree")
            args.tracking_uri = given[-1] if given else args.tracking_uri
        args.tracking_uri = args.tracking_uri or env_uri()
        if args.tracking_uri is not None:
            problem = tracking_uri_problem(args.tracking_uri)
            if problem is not None:
                self.fail(f"tracking URI {args.tracking_uri}: {problem}")
        return args

    def require_store(self, uri: str | None) -> None:
        """Ends the tool in one line when the sqlite store it is to read runs from does not
        exist: reading must not create it."""
        path = sqlite_path(uri)
        if path is not None and (not path.is_file() or path.stat().st_size == 0):
            self.fail(
                f"no MLflow store at {path} (no runs to read): train first, or name the store that "
                "holds your runs with --tracking-uri or $MLFLOW_TRACKING_URI"
            )
