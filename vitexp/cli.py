"""The command line: `vitexp [overrides]` (or `python -m vitexp`), Hydra's syntax, checked up front.

The configs ship inside the package (`pkg://vitexp.conf`, the repository's `conf/`), so an
installed `vitexp` works from any folder; `--config-dir DIR` or `hydra.searchpath=[file://DIR]`
adds a user's own config folder. Before Hydra runs anything, every job's config is composed
from the same search path (`vitexp.config.hydra_app`, as `vitexp.config.compose` does for
tools and tests) and checked here (for a sweep, every combination of a grid), so a
typo fails in one line within a second instead of deep in a traceback after data has been
loaded. TensorFlow is imported only when a job actually trains, so `--help` and `--cfg job`
answer at once; `-m ... --cfg job` prints the config of each job of the sweep.
"""

import contextlib
import io
import itertools
import os
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from vitexp.config import CONFIG_PATH, compose_with, config_folder, hydra_app
from vitexp.errors import fail
from vitexp.quiet import filter_native_noise
from vitexp.startup import leave_sklearn_out_of_keras
from vitexp.tracking.uri import is_server
from vitexp.train.cluster import launcher_problem
from vitexp.validate import ConfigError, check_config

MAX_CHECKED_JOBS = 256
ENUM_CHOICES = re.compile(r"^Invalid value .*, expected one of \[(.*)\]$")
IN_FILE = re.compile(
    r"In '(?P<file>[^']+)': \w+ raised while composing config:\n"
    r"(?P<detail>(?:Invalid value '(?P<value>[^']*)')?.*)\n\s+full_key: (?P<key>\S+)"
)


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
    config_name = parsed.config_name or "config"
    try:
        with hydra_app(parsed.config_dir, parsed.config_path) as app:
            cfg, servers = _check_jobs(app, config_name, args)
            _check_search(app, config_name, parsed.overrides)
    except ConfigError as err:  # a --config-dir that is not a folder
        fail(str(err))
    if problem := launcher_problem(argv, cfg.tracking.uri):  # a Slurm sweep: cluster and store
        fail(problem)
    for uri, timeout in sorted(servers):  # before a sweep creates its parent run
        from vitexp.tracking import TrackingError, check_reachable  # MLflow loads only for a server

        try:
            check_reachable(uri, timeout)
        except TrackingError as err:
            fail(str(err))


GLOBAL_HEADER = "# @package _global_"


def missing_global_header(config_dir: str | None, overrides: list[str]) -> str | None:
    """A user's option (`--config-dir`) of a group whose options set keys at the top of the
    config (experiment, hparams_search) without their `# @package _global_` line: Hydra would
    put its keys under the group's name and blame another file. Returns the line to print."""
    if config_dir is None:
        return None
    packaged = config_folder()
    for override in overrides:
        key, _, names = override.partition("=")
        group = key.lstrip("+")
        options = list((packaged / group).glob("*.yaml")) if group.isidentifier() else []
        if not options or not all(_has_global_header(o) for o in options):
            continue
        for name in names.split(","):
            mine = Path(config_dir) / group / f"{name.strip()}.yaml"
            if mine.is_file() and not _has_global_header(mine):
                return (
                    f"{mine}: options of group {group} set keys at the top of the config: make its "
                    f"first line `{GLOBAL_HEADER}`, as vitexp's own {group} options have it"
                )
    return None


def _has_global_header(path: Path) -> bool:
    """Whether the file's leading comment lines (where Hydra reads it) hold the header."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return False
        if line.strip() == GLOBAL_HEADER:
            return True
    return False


def check_user_options(argv: list[str]) -> None:
    """Fails in one line on a user's option file that Hydra would misplace (before Hydra runs)."""
    parsed = _quiet_hydra_parse(argv)
    if parsed is not None and (problem := missing_global_header(parsed.config_dir, parsed.overrides)):
        fail(problem)


def _quiet_hydra_parse(argv: list[str]):
    """Hydra's reading of the command line, or None for one it rejects (it says why itself)."""
    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return get_args_parser().parse_args(argv)
    except SystemExit:
        return None


def show_sweep_configs(argv: list[str]) -> None:
    """`vitexp -m ... --cfg job` (Hydra answers a sweep's `--cfg` with "Only one of --run,
    --multirun, --cfg ..."): prints the config of each job of the sweep (its grid; a
    search's sampled ranges stay as the base config has them) and exits."""
    from omegaconf import OmegaConf

    parsed = _quiet_hydra_parse(argv)
    if parsed is None or not (parsed.multirun and parsed.cfg):
        return
    if parsed.cfg != "job":
        fail(f"--cfg {parsed.cfg} with -m: use --cfg job for each job's config, or drop -m for Hydra's own")
    args = [a for a in parsed.overrides if not a.startswith("hydra") or a.startswith("hydra.searchpath")]
    try:
        with hydra_app(parsed.config_dir, parsed.config_path) as app:
            jobs = _job_overrides(app, args)
            for number, job in enumerate(jobs):
                cfg = compose_with(app, parsed.config_name or "config", job)
                shown = OmegaConf.select(cfg, parsed.package) if parsed.package else cfg
                swept = " ".join(ov for ov in job if ov not in args)
                print(f"# job {number}: {swept}" if swept else f"# job {number}")
                print(
                    OmegaConf.to_yaml(shown, resolve=parsed.resolve) if OmegaConf.is_config(shown) else shown
                )
    except ConfigError as err:  # a --config-dir that is not a folder
        fail(str(err))
    except Exception as err:
        fail(explain_compose_error(err))
    sys.exit(0)


def _check_jobs(app, config_name: str, args: list[str]) -> tuple[DictConfig, set]:
    """Composes and checks each job; returns the last config and the tracking servers named."""
    try:
        jobs = _job_overrides(app, args)
    except Exception as err:
        fail(f"cannot parse the overrides: {_first_line(err)}")
    servers = set()
    for job in jobs:
        try:
            cfg = compose_with(app, config_name, job)
        except Exception as err:
            fail(explain_compose_error(err))
        if is_server(cfg.tracking.uri):
            servers.add((cfg.tracking.uri, cfg.tracking.timeout_s))
        try:
            check_config(cfg)
        except ConfigError as err:
            swept = [ov for ov in job if ov not in args]  # this job's values of the sweep axes
            prefix = f"[{' '.join(swept)}] " if swept else ""
            fail(f"{prefix}{err}")
    return cfg, servers


def _check_search(app, config_name: str, overrides: list[str]) -> None:
    """An Optuna search (hparams_search=...): its space, sampler, pruner, storage and study name."""
    from vitexp.search.study import SearchError, check  # Optuna loads only for a search

    try:
        check(app, config_name, overrides)
    except SearchError as err:
        fail(str(err))
    except Exception as err:  # a hydra.* override that does not compose
        fail(explain_compose_error(err))


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def explain_compose_error(err: BaseException) -> str:
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
        return f"{override}: {_say(detail)}"
    if in_file := IN_FILE.match(str(err)):  # a bad value in a config file
        key = f"{in_file['key']}={in_file['value']}" if in_file["value"] else in_file["key"]
        return f"{key} in {in_file['file']}.yaml: {_say(in_file['detail'])}"
    return lines[-1] if len(lines) > 1 else lines[0]


def _say(detail: str) -> str:
    """OmegaConf's words for a value outside a schema's Enum, in vitexp's."""
    choices = ENUM_CHOICES.search(detail)
    return f"use one of {choices[1]}" if choices else detail


@hydra.main(config_path=CONFIG_PATH, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    leave_sklearn_out_of_keras()  # here too: a launcher's worker process starts from this call
    from vitexp.train.run import run_job  # imports TensorFlow: only when a job really runs

    return run_job(cfg)


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    filter_native_noise()
    leave_sklearn_out_of_keras()
    check_user_options(sys.argv[1:])
    show_sweep_configs(sys.argv[1:])
    preflight(sys.argv[1:])
    _hydra_main()
