"""The `vitexp` command and its tools, as users run them: an installed wheel, Hydra's full
override grammar, user config folders, MLflow's environment variables, one-line errors."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from vitexp import cli
from vitexp.cli import preflight
from vitexp.config import compose
from vitexp.tools import compare, evaluate, explain, predict, registry

MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")
# A user's own recipe in their own folder, built from the packaged groups: one tiny epoch.
TINY_EXPERIMENT = """# @package _global_
defaults:
  - override /model: vit_tiny
  - override /data: synthetic

patch_size: {patch_size}
depth: 1
model:
  image_size: 16
  projection_dim: 32
  transformer_units: [64, 32]
trainer:
  epochs: 1
  batch_size: 32
report:
  enabled: false
"""


@pytest.fixture(autouse=True)
def no_mlflow_env(monkeypatch):
    for name in MLFLOW_ENV:
        monkeypatch.delenv(name, raising=False)


def user_configs(folder: Path, **recipes: int) -> Path:
    """`folder/experiment/<name>.yaml` for each name=patch_size."""
    (folder / "experiment").mkdir(parents=True)
    for name, patch_size in recipes.items():
        (folder / "experiment" / f"{name}.yaml").write_text(TINY_EXPERIMENT.format(patch_size=patch_size))
    return folder


def rejected(argv, capsys, call=preflight, prefix="vitexp: error: ") -> str:
    """The one line a command prints when it refuses `argv` (exit status 2)."""
    with pytest.raises(SystemExit) as stop:
        call(argv)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), lines
    return lines[0]


def refused_by_main(argv, monkeypatch, capsys) -> str:
    """The one line `vitexp ARGV` refuses with, run in this process through `vitexp.cli.main`."""
    monkeypatch.setattr(sys, "argv", ["vitexp", *argv])
    return rejected(None, capsys, call=lambda _: cli.main())


# ---------------------------------------------------------------- one line for each mistake
@pytest.mark.parametrize(
    "argv, line",
    [
        (["model.foo=1"], "model.foo: no such key (check the spelling; `vitexp --cfg job` lists every key)"),
        (["model=swin", "model.pooling=gap"], "model.pooling: no such key (check the spelling"),
        (["+trainer.foo=1"], "unknown config key trainer.foo: check the spelling"),
        (["optimizer=adam"], "optimizer=adam: no such option in group optimizer; use one of: adamw, sgd"),
        (
            ["model=vitt"],
            "model=vitt: no such option in group model; use one of: swin, swin_base, swin_large, "
            "swin_micro, swin_small, vit, vit_tiny",
        ),
        (["model.pooling=max"], "model.pooling=max: use one of flatten, cls, gap"),
        (["trainer.strategy=tpu"], "trainer.strategy=tpu: use one of auto, one_device, mirrored"),
        (["trainer.epochs=abc"], "trainer.epochs=abc: Value 'abc' of type 'str' could not be converted"),
        (["model.dropout=[0.1]"], "model.dropout=[0.1]: Value '[0.1]' of type 'list' could not be converted"),
    ],
)
def test_main_refuses_a_mistake_in_one_line(argv, line, monkeypatch, capsys):
    assert refused_by_main(argv, monkeypatch, capsys).startswith(f"vitexp: error: {line}")


def test_a_sweeps_cfg_job_prints_the_config_of_each_job(monkeypatch, capsys):
    import yaml

    monkeypatch.setattr(
        sys, "argv", ["vitexp", "-m", "trainer.seed=1,2", "depth=3", "--cfg", "job", "-p", "trainer"]
    )
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 0
    jobs = capsys.readouterr().out.split("# job ")[1:]
    assert [job.splitlines()[0] for job in jobs] == ["0: trainer.seed=1", "1: trainer.seed=2"]
    assert [yaml.safe_load(job.split("\n", 1)[1])["seed"] for job in jobs] == [1, 2]
    line = refused_by_main(["-m", "trainer.seed=1,2", "--cfg", "all"], monkeypatch, capsys)
    assert (
        line
        == "vitexp: error: --cfg all with -m: use --cfg job for each job's config, or drop -m for Hydra's own"
    )


def test_main_names_the_file_of_a_bad_value(tmp_path, monkeypatch, capsys):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\nmodel:\n  tokenizer: cnn\n")
    line = refused_by_main(["--config-dir", str(tmp_path), "experiment=mine"], monkeypatch, capsys)
    assert line == "vitexp: error: model.tokenizer=cnn in experiment/mine.yaml: use one of patch, conv"


# ---------------------------------------------------------------- Hydra behaves like Hydra
@pytest.mark.parametrize(
    "override, expected",
    [
        ("experiment=vit_fashion_mnst", "vit_fashion_mnist"),
        ("hparams_search=vit_optuma", "vit_optuna"),
        ("model=vit_schema", "vit_tiny"),
        ("data=data_schema", "fashion_mnist"),
    ],
)
def test_misspelt_option_of_any_group_fails_in_one_line(override, expected, capsys):
    line = rejected([override], capsys)
    assert f"{override}: no such option" in line and expected in line
    assert "_schema" not in line.split("use one of:")[1]


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "model=glob(vit*)"],
        ["-m", "patch_size=range(2,5,2)"],
        ["-m", "depth=choice(2,4)", "model=vit_tiny"],
        ["-m", "optimizer.learning_rate=interval(1e-4,1e-2)"],
        ["-m", "optimizer.learning_rate=tag(log,interval(1e-4,1e-2))", "depth=2,4"],
    ],
)
def test_sweep_grammar_passes_the_preflight(argv):
    preflight(argv)  # returns: Hydra's sweeper takes it from here


def test_glob_sweeps_are_checked_per_option(capsys):
    line = rejected(["-m", "model=glob(vit*)", "model.image_size=28"], capsys)
    assert line.startswith("vitexp: error: [model=vit] ") and "not divisible by patch_size=6" in line
    assert "matches no value" in rejected(["-m", "model=glob(vitt*)"], capsys)


def test_user_config_folder_composes_with_the_packaged_groups(tmp_path, capsys):
    folder = user_configs(tmp_path / "mine", tiny=4, bad=7)
    cfg = compose(["experiment=tiny"], config_dir=str(folder))
    assert (cfg.model.name, cfg.data.name, cfg.model.patch_size, cfg.trainer.epochs) == (
        "vit_tiny",
        "synthetic",
        4,
        1,
    )
    for where in (["--config-dir", str(folder)], [f"hydra.searchpath=[file://{folder}]"]):
        preflight([*where, "experiment=tiny"])
        assert "not divisible by patch_size=7" in rejected([*where, "experiment=bad"], capsys)
    assert "no such folder" in rejected(["--config-dir", str(tmp_path / "nowhere")], capsys)


def test_a_user_experiment_without_its_package_header_is_named(tmp_path, monkeypatch, capsys):
    folder = user_configs(tmp_path / "my_configs", small=4)
    small = folder / "experiment" / "small.yaml"
    small.write_text(small.read_text().replace("# @package _global_\n", ""))
    monkeypatch.chdir(tmp_path)
    for argv in (["experiment=small"], ["-m", "experiment=small", "trainer.seed=1,2"]):
        line = refused_by_main(["--config-dir", "my_configs", *argv], monkeypatch, capsys)
        assert line == (
            "vitexp: error: my_configs/experiment/small.yaml: options of group experiment set keys at the "
            "top of the config: make its first line `# @package _global_`, as vitexp's own experiment "
            "options have it"
        )


def test_help_says_vitexp_and_lists_options_not_schemas(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "vitexp", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("vitexp trains Vision Transformers")
    groups = out.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert "model: swin, swin_base" in groups and "experiment: seed_swin" in groups
    assert "_schema" not in groups and "cli" not in out.stdout.splitlines()[0]
    tools = out.stdout.split("== Tools ==")[1].split("== Configuration groups ==")[0]
    for tool in ("evaluate", "predict", "explain", "compare", "registry", "speedrun", "bench"):
        (line,) = [t for t in tools.splitlines() if t.startswith(f"python -m vitexp.{tool} ")]
        assert len(line.split(None, 3)) == 4  # the command, then what it does


# ---------------------------------------------------------------- the tools' arguments
@pytest.fixture(scope="module")
def team_store(tmp_path_factory):
    """A sqlite store with experiment `team` (one finished run) and an empty `idle`."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("team"), run_name="team-run")
    client.log_metric(run.info.run_id, "test_top1", 0.5)
    client.log_param(run.info.run_id, "num_params", "10")
    client.set_terminated(run.info.run_id)
    client.create_experiment("idle")
    return uri


def test_compare_reads_mlflow_env_and_names_columns_on_a_bad_sort(team_store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team")
    compare.main(["--out", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    assert "vitexp.compare: read experiment team, 1 runs\n" in out and "team-run" in out
    line = rejected(["--sort", "test_top9", "--out", str(tmp_path)], capsys, compare.main, "vitexp.compare:")
    assert "--sort test_top9: no such column; use one of: run, status" in line and "test_top1" in line


@pytest.mark.parametrize(
    "tool, argv, env",
    [
        (evaluate, ["feedbeef", "--tracking-uri", "URI", "data.test_limit=8"], False),
        (evaluate, ["feedbeef", "tracking.uri=URI", "--checkpoint", "last"], False),
        (evaluate, ["feedbeef"], True),
        (predict, ["feedbeef", "photo.png"], True),
        (explain, ["feedbeef"], True),
    ],
)
def test_tools_find_the_store_the_same_way(tool, argv, env, team_store, monkeypatch, capsys):
    if env:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", team_store)
    argv = [a.replace("URI", team_store) for a in argv]
    name = tool.__name__.replace(".tools.", ".")  # the command users type: python -m vitexp.<tool>
    line = rejected(argv, capsys, tool.main, f"{name}: error: ")
    assert f"no run 'feedbeef' in {team_store}" in line


def test_registry_takes_the_experiment_from_the_env(team_store, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "idle")
    line = rejected([], capsys, registry.main, "vitexp.registry: error: ")
    assert "no FINISHED run with metric test_top1 under 'idle'" in line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["feedbeef", "trainer.epochs=3"], "trainer.epochs=3: evaluate takes data=<option>"),
        (["feedbeef", "--tracking-uri", "sqlite:///relative.db"], "the path is relative"),
        (["feedbeef", "--tracking-uri", "sqlite:////a.db", "tracking.uri=sqlite:////b.db"], "disagree"),
        (["--checkpoint", "best"], "the following arguments are required: run_id"),
        (["feedbeef", "--check", "last"], "unrecognized arguments: --check"),  # not --checkpoint
    ],
)
def test_tool_mistakes_end_in_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert message in rejected(argv, capsys, evaluate.main, "vitexp.evaluate: error: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "tool, argv",
    [
        (compare, []),
        (evaluate, ["feedbeef"]),
        (predict, ["feedbeef", "photo.png"]),
        (explain, ["feedbeef"]),
        (registry, ["feedbeef"]),
    ],
)
def test_tools_never_create_the_store_they_read(tool, argv, tmp_path, capsys):
    name = tool.__name__.replace(".tools.", ".")  # the command users type
    db = tmp_path / "mlflow.db"
    line = rejected([*argv, "--tracking-uri", f"sqlite:///{db}"], capsys, tool.main, f"{name}: error: ")
    assert line == (
        f"{name}: error: no MLflow store at {db} (no runs to read): train first, or name the "
        "store that holds your runs with --tracking-uri or $MLFLOW_TRACKING_URI"
    )
    assert list(tmp_path.iterdir()) == []


def test_explain_out_must_be_a_folder(team_store, tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    argv = ["feedbeef", "--out", str(taken), "--tracking-uri", team_store]
    line = rejected(argv, capsys, explain.main, "vitexp.explain: error: ")
    assert line.endswith(f"--out {taken}: is a file; name a folder for the PNG files (created if missing)")
    assert taken.read_text() == "mine"


def test_compare_on_an_empty_store_says_it_is_empty(store, tmp_path, capsys):
    uri, _ = store
    line = rejected(
        ["--tracking-uri", uri, "--out", str(tmp_path / "cmp")], capsys, compare.main, "vitexp.compare:"
    )
    assert line == (
        f"vitexp.compare: error: the store {uri} is empty (no runs): train first, or name the store "
        "that holds your runs with --tracking-uri or $MLFLOW_TRACKING_URI"
    )


# ---------------------------------------------------------------- make clean keeps results
def test_make_clean_keeps_results_and_clean_results_says_what_it_deletes(tmp_path):
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path)
    results = [
        "mlflow.db",
        "mlruns/1/meta.yaml",
        "outputs/a/b.log",
        "multirun/2026/0/x.log",
        "multirun/.gitkeep",
    ]
    builds = ["build/lib/x.py", ".pytest_cache/v", "test-artifacts/a.png", "vitexp/__pycache__/a.pyc"]
    for path in results + builds:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    subprocess.run(["make", "-s", "clean"], cwd=tmp_path, check=True, capture_output=True)
    assert all((tmp_path / p).exists() for p in results)
    assert not any((tmp_path / p).exists() for p in builds)
    out = subprocess.run(["make", "clean-results"], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert "mlflow.db" in out.stdout and "multirun/2026" in out.stdout
    assert [p for p in results if (tmp_path / p).exists()] == ["multirun/.gitkeep"]


# ---------------------------------------------------------------- an installed wheel
def run(args, cwd, env=None, timeout=300):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def install_wheel(tmp_path: Path) -> Path:
    """Builds an sdist from a copy of the checkout, a wheel from that sdist, and installs it
    into a new venv that reuses this venv's dependencies (a .pth line) but not its editable
    vitexp."""
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".venv",
            ".git",
            "build",
            "dist",
            "outputs",
            "multirun",
            "mlruns",
            "mlflow.db",
            "mlartifacts",
            "*.egg-info",
            "__pycache__",
            "test-artifacts",
            ".pytest_cache",
            ".ruff_cache",
            "bench",
        ),
    )
    # the wheel is built from an sdist, as pip builds one from PyPI: the sdist must hold it all
    build = "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])"
    run([sys.executable, "-c", build, str(tmp_path / "sdist")], source)
    (sdist,) = (tmp_path / "sdist").glob("vitexp-*.tar.gz")
    wheel_cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    run([*wheel_cmd, "-w", str(tmp_path / "dist"), str(sdist)], tmp_path)
    (wheel,) = (tmp_path / "dist").glob("vitexp-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    site = run(
        [str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path
    )
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(site.strip(), "dev-dependencies.pth").write_text("\n".join(deps) + "\n")
    run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], tmp_path)
    return venv


def test_the_wheel_lists_every_package():
    """pyproject.toml names the packages (conf/ ships as vitexp.conf): a new one must be there."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "vitexp").rglob("__init__.py")}
    found |= {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hydra_plugins").rglob("__init__.py")
    }
    assert listed == found | {"vitexp.conf"}, listed ^ found  # conf/ itself is vitexp.conf


@pytest.mark.slow
def test_wheel_installs_a_vitexp_command_that_runs_from_any_folder(tmp_path):
    from mlflow.tracking import MlflowClient

    venv = install_wheel(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    user_configs(elsewhere / "my_configs", tiny=4)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", *MLFLOW_ENV)}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    where = run(
        [
            "python",
            "-c",
            "import vitexp.cli, importlib.resources as r; print(vitexp.cli.__file__, "
            "r.files('vitexp.conf') / 'config.yaml')",
        ],
        elsewhere,
        env,
    )
    assert all(p.startswith(str(venv)) and Path(p).is_file() for p in where.split()), where
    assert run(["vitexp", "--help"], elsewhere, env).startswith("vitexp trains Vision Transformers")
    completion = run(
        [
            "bash",
            "-c",
            'eval "$(vitexp -sc install=bash)"; COMP_LINE="vitexp model=vit" COMP_CWORD=1 '
            'COMP_POINT=16; hydra_bash_completion; echo "${COMPREPLY[@]}"',
        ],
        elsewhere,
        env,
    )
    assert "model=vit_tiny" in completion and "_schema" not in completion, completion

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME="from_the_wheel")
    run(["vitexp", "--config-dir", "my_configs", "experiment=tiny"], elsewhere, env, timeout=600)
    experiment = MlflowClient(uri).get_experiment_by_name("from_the_wheel")
    (recorded,) = MlflowClient(uri).search_runs([experiment.experiment_id])
    assert recorded.info.status == "FINISHED" and "test_top1" in recorded.data.metrics
    assert recorded.data.params["model.name"] == "vit_tiny"
    assert list(elsewhere.glob("outputs/*/*/vitexp.log"))
