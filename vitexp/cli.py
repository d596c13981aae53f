"""The command line: `vitexp [overrides]` (or `python -m vitexp`), Hydra's syntax, checked up front.

The configs ship inside the package (`pkg://vitexp.conf`, the repository's `conf/`), so an
installed `vitexp` works from any folder; `--config-dir DIR` or `hydra.searchpath=[file://DIR]`
adds a user's own config folder. Before Hydra runs anything, every job's config is composed
from the same search path and checked here (for a sweep, every combination of a grid), so a
typo fails in one line within a second instead of deep in a traceback after data has been
loaded. TensorFlow is imported only when a job actually trains, so `--help` and `--cfg job`
answer at once.
"""

import contextlib
import importlib.util
import io
import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict

import vitexp.config  # noqa: F401  (registers the schemas and the `shortcut` resolver)
from vitexp.cluster import launcher_problem
from vitexp.errors import fail
from vitexp.quiet import filter_native_noise
from vitexp.validate import ConfigError, check_config

CONFIG_MODULE = "vitexp.conf"
MAX_CHECKED_JOBS = 256


def config_path() -> str:
    """The packaged configs; a source tree that is not installed falls back to its conf/."""
    if importlib.util.find_spec(CONFIG_MODULE) is not None:
        return f"pkg://{CONFIG_MODULE}"
    return str(Path(__file__).resolve().parent.parent / "conf")


CONFIG_PATH = config_path()


@contextlib.contextmanager
def _hydra(config_dir: str | None = None, path: str | None = None) -> Iterator:
    """A Hydra instance with the command line's search path (what `@hydra.main` builds)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    search_path = create_automatic_config_search_path(None, None, path or CONFIG_PATH)
    if config_dir is not None:
        folder = Path(config_dir).absolute()
        if not folder.is_dir():
            fail(f"--config-dir {config_dir}: no such folder")
        search_path.prepend("command-line", f"file://{folder}", SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()
    try:
        yield Hydra.create_main_hydra2(task_name="vitexp", config_search_path=search_path)
    finally:
        GlobalHydra.instance().clear()


def _compose(app, config_name: str, overrides: list[str]) -> DictConfig:
    from hydra.types import RunMode

    cfg = app.compose_config(config_name, overrides, run_mode=RunMode.RUN, with_log_configuration=False)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def compose(overrides: list[str], config_dir: str | None = None) -> DictConfig:
    """Composes the config the way `vitexp` does (for tools and tests)."""
    with _hydra(config_dir) as app:
        return _compose(app, "config", overrides)


def _job_overrides(app, args: list[str]) -> list[list[str]]:
    """Expands a sweep's choice/range/glob overrides into the jobs it will run (a grid)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create(config_loader=app.config_loader).parse_overrides(args)
    axes = []
    for ov in parsed:
        if ov.is_sweep_override():
            if ov.is_interval_sweep():  # a search space: the sweeper samples it later
                continue
            values = [f"{ov.get_key_element()}={v}" for v in ov.sweep_string_iterator()]
            if not values:
                fail(f"{ov.input_line}: matches no value")
            axes.append(values)
        else:
            axes.append([ov.input_line])
    return [list(combo) for combo in itertools.islice(itertools.product(*axes), MAX_CHECKED_JOBS)]


def _hydra_args(argv: list[str]):
    """Hydra's own reading of the command line, or None where Hydra should answer itself."""
    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            args = get_args_parser().parse_args(argv)
    except SystemExit:
        return None  # --version, or a flag Hydra rejects with its own usage message
    answers = (args.help, args.hydra_help, args.cfg, args.info, args.shell_completion)
    # a relative --config-path is relative to Hydra's calling module: Hydra resolves it
    relative = args.config_path and not args.config_path.startswith(("/", "pkg://"))
    return None if any(answers) or args.experimental_rerun or relative else args


def preflight(argv: list[str]) -> None:
    """Composes and checks every job of the command line; exits with one line on error."""
    parsed = _hydra_args(argv)
    if parsed is None:
        return  # --help, --cfg, --info, -sc ...: Hydra answers these itself
    # hydra.* overrides choose Hydra's machinery (launcher, sweeper, run dir), not the job,
    # except the search path, which decides where the job's options come from
    args = [a for a in parsed.overrides if not a.startswith("hydra") or a.startswith("hydra.searchpath")]
    with _hydra(parsed.config_dir, parsed.config_path) as app:
        try:
            jobs = _job_overrides(app, args)
        except Exception as err:
            fail(f"cannot parse the overrides: {_first_line(err)}")
        servers = set()
        for job in jobs:
            try:
                cfg = _compose(app, parsed.config_name or "config", job)
            except Exception as err:
                fail(_explain_compose_error(err))
            if str(cfg.tracking.uri).startswith(("http://", "https://")):
                servers.add((cfg.tracking.uri, cfg.tracking.timeout_s))
            try:
                check_config(cfg)
            except ConfigError as err:
                swept = [ov for ov in job if ov not in args]  # this job's values of the sweep axes
                prefix = f"[{' '.join(swept)}] " if swept else ""
                fail(f"{prefix}{err}")
        _check_search(app, parsed.config_name or "config", parsed.overrides)
    if problem := launcher_problem(argv, cfg.tracking.uri):  # a Slurm sweep: cluster and store
        fail(problem)
    for uri, timeout in sorted(servers):  # before a sweep creates its parent run
        from vitexp.tracking import TrackingError, check_reachable

        try:
            check_reachable(uri, timeout)
        except TrackingError as err:
            fail(str(err))


def _check_search(app, config_name: str, overrides: list[str]) -> None:
    """An Optuna search (hparams_search=...): its space, sampler, pruner, storage and study name."""
    from vitexp.search import SearchError, check

    try:
        check(app, config_name, overrides)
    except SearchError as err:
        fail(str(err))
    except Exception as err:  # a hydra.* override that does not compose
        fail(_explain_compose_error(err))


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _explain_compose_error(err: BaseException) -> str:
    """Turns Hydra's multi-line compose errors into one line that names the fix."""
    from hydra.errors import MissingConfigException

    if isinstance(err, MissingConfigException) and err.options is not None:
        group, _, name = str(err.missing_cfg_file).rpartition("/")
        options = ", ".join(err.options)
        return f"{group}={name}: no such option in group {group}; use one of: {options}"
    chain = [err]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    lines = [_first_line(e) for e in chain]
    if "Could not override" in lines[0] or "Error merging override" in lines[0]:
        override = lines[0].split("override", 1)[1].strip(" '.")
        detail = lines[-1] if len(lines) > 1 else str(err).splitlines()[-1]
        if "To append to your config" in str(err):
            detail = "no such key (check the spelling; `vitexp --cfg job` lists every key)"
        return f"{override}: {detail}"
    return lines[-1] if len(lines) > 1 else lines[0]


@hydra.main(config_path=CONFIG_PATH, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    from vitexp.train import run_job  # imports TensorFlow: only when a job really runs

    return run_job(cfg)


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    filter_native_noise()
    preflight(sys.argv[1:])
    _hydra_main()
