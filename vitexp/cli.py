"""The command line: `python -m vitexp [overrides]`, Hydra's syntax, checked up front.

Before Hydra runs anything, every job's config is composed and checked here (for a
sweep, every combination of a grid), so a typo fails in one line within a second
instead of deep in a traceback after data has been loaded. TensorFlow is imported only
when a job actually trains, so `--help` and `--cfg job` answer at once.
"""

import itertools
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import vitexp.config  # noqa: F401  (registers the schemas and the `shortcut` resolver)
from vitexp.validate import ConfigError, check_config

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
MAX_CHECKED_JOBS = 256


def fail(message: str, code: int = 2) -> None:
    """Prints one line to stderr and exits: the form of every user-facing error."""
    print(f"vitexp: error: {message}", file=sys.stderr)
    sys.exit(code)


def _job_overrides(args: list[str]) -> list[list[str]]:
    """Expands a sweep's choice/range overrides into the jobs it will run (a grid)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(args)
    axes = []
    for ov in parsed:
        if ov.is_sweep_override():
            if ov.is_interval_sweep():  # a search space: the sweeper samples it later
                continue
            axes.append([f"{ov.get_key_element()}={v}" for v in ov.sweep_string_iterator()])
        else:
            axes.append([ov.input_line])
    return [list(combo) for combo in itertools.islice(itertools.product(*axes), MAX_CHECKED_JOBS)]


def compose(overrides: list[str]) -> DictConfig:
    """Composes the config the way `python -m vitexp` does (for tools and tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def preflight(argv: list[str]) -> None:
    """Composes and checks every job of the command line; exits with one line on error."""
    flags = [a for a in argv if a.startswith("-") and a not in ("-m", "--multirun")]
    if flags:
        return  # --help, --cfg, --info, another config ...: Hydra answers these itself
    args = [a for a in argv if not a.startswith("-") and not a.startswith("hydra")]
    try:
        jobs = _job_overrides(args)
    except Exception as err:
        fail(f"cannot parse the overrides: {_first_line(err)}")
    servers = set()
    for job in jobs:
        try:
            cfg = compose(job)
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
    _check_search(argv)
    for uri, timeout in sorted(servers):  # before a sweep creates its parent run
        from vitexp.tracking import TrackingError, check_reachable

        try:
            check_reachable(uri, timeout)
        except TrackingError as err:
            fail(str(err))


def _check_search(argv: list[str]) -> None:
    """An Optuna search (hparams_search=...): its space, sampler, pruner, storage and study name."""
    from vitexp.search import SearchError, check

    try:
        check(argv)
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
        options = ", ".join(o for o in err.options if not o.endswith("_schema"))
        return f"{group}={name}: no such option in conf/{group}/; use one of: {options}"
    chain = [err]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    lines = [_first_line(e) for e in chain]
    if "Could not override" in lines[0] or "Error merging override" in lines[0]:
        override = lines[0].split("override", 1)[1].strip(" '.")
        detail = lines[-1] if len(lines) > 1 else str(err).splitlines()[-1]
        if "To append to your config" in str(err):
            detail = "no such key (check the spelling; `--cfg job` lists every key)"
        return f"{override}: {detail}"
    return lines[-1] if len(lines) > 1 else lines[0]


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    from vitexp.train import run_job  # imports TensorFlow: only when a job really runs

    return run_job(cfg)


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    preflight(sys.argv[1:])
    _hydra_main()
