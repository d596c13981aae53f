"""Config composition: every group option composes, defaults are the textbook's, and bad
overrides fail in one line before anything runs."""

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CONF, ROOT, compose, runs_of
from hydra.errors import ConfigCompositionException
from hydra.utils import get_method, get_object
from omegaconf import MISSING, OmegaConf

from vitexp.config import SCHEMAS, option_schemas
from vitexp.validate import ConfigError, check_config, doubts

GROUPS = ["model", "data", "optimizer", "schedule", "trainer", "tracking", "report"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_defaults_are_the_textbook():
    cfg = compose()
    m, t, o = cfg.model, cfg.trainer, cfg.optimizer
    assert (m.name, m.image_size, m.patch_size, m.depth) == ("vit", 72, 6, 4)
    assert (m.image_size // m.patch_size) ** 2 == 144
    assert (m.projection_dim, m.num_heads) == (64, 4)
    assert list(m.transformer_units) == [128, 64] and list(m.head_units) == [2048, 1024]
    assert (m.dropout, m.attention_dropout, m.head_dropout) == (0.1, 0.1, 0.5)
    assert (o.learning_rate, o.weight_decay) == (1e-3, 1e-4)
    assert cfg.schedule.warmup_fraction == 0.1 and cfg.schedule.final_lr == 0.0
    assert (t.batch_size, t.validation_split, t.epochs) == (64, 0.2, 30)
    assert cfg.data.name == "cifar100" and cfg.data.num_classes == 100
    assert cfg.run_name == "vit-p6-d4-cifar100"
    check_config(cfg)


def test_shortcuts_reach_the_model():
    cfg = compose(["patch_size=4", "depth=2"])
    assert (cfg.model.patch_size, cfg.model.depth, cfg.run_name) == (4, 2, "vit-p4-d2-cifar100")
    tiny = compose(["model=vit_tiny"])
    assert (tiny.model.patch_size, tiny.model.depth) == (4, 4)


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group):
    for option in options(group):
        overrides = [f"{group}={option}"]
        if option == "image_folder":
            overrides += ["data.path=/somewhere", "data.num_classes=3"]
        cfg = compose(overrides)
        assert cfg[group] is not None


def test_every_target_is_inside_vitexp():
    targets = []
    for path in CONF.rglob("*.yaml"):
        for line in path.read_text().splitlines():
            if "_target_:" in line:
                targets.append((path.name, line.split("_target_:")[1].strip()))
    for name, schema in {**SCHEMAS, **option_schemas()}.items():
        default = next((f.default for f in dataclasses.fields(schema) if f.name == "_target_"), MISSING)
        if default != MISSING:
            targets.append((name, default))
    found = {name for name, _ in targets}
    assert {"vit_schema", "swin_schema", "synthetic_schema", "adamw_schema", "warmup_cosine_schema"} <= found
    outside = [t for t in targets if not t[1].startswith("vitexp.")]
    assert not outside, outside


TOY_SCHEMA = """
from dataclasses import dataclass
from omegaconf import MISSING
from vitexp.models.schema import ModelConfig
from vitexp.validate import require


@dataclass
class ToyConfig(ModelConfig):
    _target_: str = "vitexp.models.toy.build_toy"
    width: int = MISSING

    @classmethod
    def check(cls, m):
        super().check(m)
        require(m.width % 2 == 0, f"model.width={m.width}: use an even width")
"""
TOY_OPTION = """defaults:
  - /toy_schema@_here_
  - _self_

name: toy
image_size: 32
patch_size: ${shortcut:patch_size,4}
depth: ${shortcut:depth,1}
width: 8
"""


def test_a_model_family_is_its_own_files(tmp_path, monkeypatch):
    import vitexp.config
    import vitexp.models

    (tmp_path / "family" / "model").mkdir(parents=True)
    (tmp_path / "family" / "toy_schema.py").write_text(TOY_SCHEMA)
    (tmp_path / "family" / "model" / "toy.yaml").write_text(TOY_OPTION)
    monkeypatch.setattr(vitexp.models, "__path__", [*vitexp.models.__path__, str(tmp_path / "family")])
    vitexp.config.register_schemas()
    cfg = compose(["model=toy", "patch_size=8", "data=synthetic", "data.image_shape=[32,32,3]"],
                  config_dir=str(tmp_path / "family"))  # fmt: skip
    assert (cfg.model.width, cfg.model.patch_size, cfg.model.num_classes) == (8, 8, 4)
    check_config(cfg)
    with pytest.raises(ConfigError, match="model.width=7: use an even width"):
        check_config(compose(["model=toy", "model.width=7"], config_dir=str(tmp_path / "family")))
    with pytest.raises(ConfigError, match="not divisible by patch_size=5"):  # what every family checks
        check_config(compose(["model=toy", "patch_size=5"], config_dir=str(tmp_path / "family")))


TOY_OPTIMIZER = """
from dataclasses import dataclass
from omegaconf import MISSING
from vitexp.optim.schema import OptimizerConfig
from vitexp.validate import require


@dataclass
class LionConfig(OptimizerConfig):
    _target_: str = "vitexp.optim.lion.lion"
    beta: float = MISSING

    @classmethod
    def check(cls, opt):
        super().check(opt)
        require(opt.beta < 1, f"optimizer.beta={opt.beta}: use a beta below 1")
"""
TOY_DATASET = """
from dataclasses import dataclass
from omegaconf import MISSING
from vitexp.data.schema import DataConfig
from vitexp.validate import require


@dataclass
class StripesDataConfig(DataConfig):
    _target_: str = "vitexp.data.stripes.load_stripes"
    width: int = MISSING

    @classmethod
    def check(cls, d):
        super().check(d)
        require(d.width > 0, f"data.width={d.width}: use a positive width")
"""


@pytest.mark.parametrize(
    "package, group, name, schema, option, good, bad, message",
    [
        ("optim", "optimizer", "lion", TOY_OPTIMIZER,
         "learning_rate: 1.0e-4\nweight_decay: 0.1\nclipnorm: null\nema_momentum: null\nbeta: 0.9\n",
         "optimizer.beta", ["optimizer.beta=1.5"], "optimizer.beta=1.5: use a beta below 1"),
        ("data", "data", "stripes", TOY_DATASET,
         "name: stripes\nnum_classes: 2\nimage_shape: [8, 8, 1]\nwidth: 2\n",
         "data.width", ["data.width=0"], "data.width=0: use a positive width"),
        ("data", "data", "stripes", TOY_DATASET,
         "name: stripes\nnum_classes: 2\nimage_shape: [8, 8, 1]\nwidth: 2\n",
         "data.width", ["data.num_classes=1"], "need at least 2 classes"),  # what every dataset checks
    ],
)  # fmt: skip
def test_an_optimizer_or_a_dataset_is_its_own_files(
    package, group, name, schema, option, good, bad, message, tmp_path, monkeypatch
):
    """As a model family: its schema beside its factory and its option; no list to add it to."""
    import importlib

    import vitexp.config

    module = importlib.import_module(f"vitexp.{package}")
    (tmp_path / "own" / group).mkdir(parents=True)
    (tmp_path / "own" / f"{name}_schema.py").write_text(schema)
    header = f"defaults:\n  - /{name}_schema@_here_\n  - _self_\n\n"
    (tmp_path / "own" / group / f"{name}.yaml").write_text(header + option)
    monkeypatch.setattr(module, "__path__", [*module.__path__, str(tmp_path / "own")])
    vitexp.config.register_schemas()
    cfg = compose([f"{group}={name}"], config_dir=str(tmp_path / "own"))
    assert OmegaConf.select(cfg, good) is not None
    check_config(cfg)
    with pytest.raises(ConfigError, match=message):
        check_config(compose([f"{group}={name}", *bad], config_dir=str(tmp_path / "own")))


def test_the_conv_stem_pads_where_patches_must_tile():
    # 28x28 at stride 8: the recipe's conv stem pads to 4x4 tokens; patches of 8 cannot tile 28
    cfg = compose(["experiment=vit_fashion_mnist"])
    assert cfg.model.patch_size == 8 and cfg.model.tokenizer == "conv"
    check_config(cfg)
    patches = ["experiment=vit_fashion_mnist", "model.tokenizer=patch", "model.stem_channels=[]"]
    with pytest.raises(ConfigError, match="not divisible by patch_size=8"):
        check_config(compose(patches))


def test_a_search_budget_keeps_the_mlp_twice_the_width():
    cfg = compose(["experiment=vit_fashion_mnist_search", "model.projection_dim=96"])
    check_config(cfg)
    assert list(cfg.model.transformer_units) == [192, 96]


def own_keys(path: Path) -> dict:
    """What an option file itself sets (not its defaults list)."""
    return {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k != "defaults"}


def parent(path: Path) -> str | None:
    """The option a file extends (`- vit`), or None where it extends a schema (`- /vit_schema@_here_`)."""
    first = (yaml.safe_load(path.read_text()) or {}).get("defaults", [None])[0]
    return None if first is None or str(first).startswith("/") else str(first)


@pytest.mark.parametrize("option", options("model"))
def test_model_options_compose_to_their_parent_and_their_own_keys(option):
    """An option is its family's option (or its schema) with its own keys over it: no second
    list of model layouts to keep in step with conf/model."""
    path = CONF / "model" / f"{option}.yaml"
    composed = OmegaConf.to_container(compose([f"model={option}"]).model, resolve=True)
    base = parent(path)
    if base is None:  # a family's option sets every key its schema leaves open
        schema = OmegaConf.get_type(compose([f"model={option}"]).model)
        assert set(composed) == {f.name for f in dataclasses.fields(schema)}
        return
    expected = OmegaConf.to_container(compose([f"model={base}"]).model, resolve=True)
    expected.update({k: composed[k] for k in own_keys(path)})  # its own keys, shortcuts resolved
    assert composed == expected  # and every other key as its parent option has it


TARGET_GROUPS = ["model", "data", "optimizer", "schedule"]


@pytest.mark.parametrize(
    "group, option",
    [(g, o) for g in TARGET_GROUPS for o in options(g)] + [("hydra/sweeper", "vitexp_optuna")],
)
def test_values_are_written_once(group, option):
    """A value an option sets is not also a default in its schema or in the signature of its
    factory (the `_target_`): every group option that builds something, and the sweeper."""
    path = CONF / group / f"{option}.yaml"
    written = {k for k, v in own_keys(path).items() if v != "???"}  # ??? makes a key required
    if group == "hydra/sweeper":
        from hydra_plugins.vitexp_optuna_sweeper.config import VitexpOptunaSweeperConf as schema

        target = schema._target_
    else:
        node = compose(
            [f"{group}={option}"]
            + (["data.path=/x", "data.num_classes=3"] if option == "image_folder" else [])
        )[group]
        schema, target = OmegaConf.get_type(node), node._target_
    fields = {f.name: f for f in dataclasses.fields(schema)}
    with_defaults = {
        k
        for k in written & set(fields)
        if fields[k].default is not MISSING or fields[k].default_factory is not dataclasses.MISSING
    }
    assert not with_defaults, f"{option}: {sorted(with_defaults)} also have defaults in {schema.__name__}"
    if group == "hydra/sweeper":
        return
    factory = get_method(target) if not isinstance(get_object(target), type) else get_object(target).__init__
    params = inspect.signature(factory).parameters
    defaulted = {k for k in written if k in params and params[k].default is not inspect.Parameter.empty}
    assert not defaulted, f"{option}: {sorted(defaulted)} also have defaults in {target}"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+model.foo=1"], "unknown config key model.foo"),
        (["+bar=2"], "unknown config key bar"),
        (["patch_size=7"], "not divisible by patch_size=7"),
        (["model.num_heads=3"], "not divisible by num_heads=3"),
        (["trainer.validation_split=1.0"], "validation_split"),
        (["schedule.warmup_fraction=1.0"], "warmup must be shorter"),
        (["model.transformer_units=[128,32]"], "must end with projection_dim"),
        (["optimizer.learning_rate=-1"], "positive learning rate"),
        (["data=image_folder"], "is required"),
        (["tracking.uri=ftp://x"], "tracking.uri"),
        (["model.tokenizer=conv", "patch_size=6"], "stride must be 2, 4, 8 or 16"),
        (["model.tokenizer=conv", "patch_size=8", "model.stem_channels=[8]"], "needs at least 3 stride-2"),
        (["model.stem_channels=[8,8]"], "add model.tokenizer=conv"),
    ],
)
def test_check_config_rejects(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose(overrides))


@pytest.mark.parametrize(
    "overrides, doubted",
    [
        (["trainer.tta=flip"], True),  # the base data config trains without flips
        (["trainer.tta=flip_shift"], True),
        (["trainer.tta=flip", "data.augment.horizontal_flip=true"], False),
        (["trainer.tta=none"], False),
        (["experiment=vit_fashion_mnist_speedrun"], False),
        (["experiment=vit_fashion_mnist_speedrun", "data.augment.horizontal_flip=false"], True),
    ],
)
def test_test_time_mirrors_of_a_model_that_never_saw_one_are_doubted(overrides, doubted):
    """A run that would score its test split with mirrored views it never trained on (a search
    over flips with the speedrun's test-time flips did) is told, in one line, what to change."""
    cfg = compose(overrides)
    check_config(cfg)  # it still runs
    found = doubts(cfg)
    assert len(found) == doubted
    if doubted:
        tta = cfg.trainer.tta
        assert f"trainer.tta={tta} scores" in found[0] and "data.augment.horizontal_flip=true" in found[0]
        assert "\n" not in found[0]


@pytest.mark.parametrize(
    "override, allowed",
    [
        ("model.pooling=max", "flatten, cls, gap"),
        ("model.pos_embedding=rope", "learned, sincos"),
        ("model.tokenizer=cnn", "patch, conv"),
        ("trainer.precision=fp8", "float32, mixed_bfloat16, mixed_float16, auto"),
        ("trainer.strategy=tpu", "auto, one_device, mirrored, multi_worker"),
    ],
)
def test_enum_values_fail_at_compose_time(override, allowed):
    with pytest.raises(ConfigCompositionException) as err:
        compose([override])
    assert f"expected one of [{allowed}]" in str(err.value.__cause__)


def test_enum_values_reach_code_and_params_as_plain_names():
    from vitexp.tracking import flatten
    from vitexp.train.resume import config_hash

    cfg = compose(["model.pooling=gap", "trainer.precision=mixed_bfloat16", "trainer.strategy=mirrored"])
    values = (cfg.model.pooling, cfg.trainer.precision, cfg.trainer.strategy)
    assert values == ("gap", "mixed_bfloat16", "mirrored") and isinstance(values[0], str)
    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    assert (params["model.pooling"], params["trainer.precision"]) == ("gap", "mixed_bfloat16")
    # the hash that finds a run to resume is the one a config of plain strings had before the Enums
    plain = OmegaConf.create(OmegaConf.to_container(cfg, enum_to_str=True))
    assert OmegaConf.get_type(plain.model) is dict and config_hash(cfg) == config_hash(plain)
    assert config_hash(cfg) != config_hash(compose(["model.pooling=gap", "trainer.strategy=mirrored"]))


BAD_COMMANDS = [
    (["+model.foo=1"], "unknown config key model.foo"),
    (["patch_size=7"], "not divisible by patch_size=7"),
    (["model.projection_dim=30"], "not divisible by num_heads=4"),
    (["-m", "patch_size=4,7"], "[patch_size=7]"),
    (["trainer.validation_split=0"], "use a fraction in (0, 1)"),
    (["schedule.warmup_fraction=1.5"], "warmup must be shorter than training"),
    (["data=image_folder"], "data.num_classes is required"),
    (["+trainer.foo=1"], "unknown config key trainer.foo"),
    (["trainer.precision=fp8"], "trainer.precision=fp8: use one of float32, mixed_bfloat16"),
    (["model=swin", "model.image_size=16"], "at least 32 pixels"),
    (["-m", "depth=1,2", "tracking.uri=http://127.0.0.1:9"], "is unreachable"),
    (["tracking.uri=sqlite:///relative.db"], "the path is relative: use sqlite:////"),
]


def with_store(args, uri) -> list[str]:
    return args if any(a.startswith("tracking.uri=") for a in args) else [*args, f"tracking.uri={uri}"]


def nothing_recorded(uri) -> bool:
    """No store at `uri` (a preflight failure should not even create it), or no run in it."""
    from mlflow.tracking import MlflowClient

    return not Path(uri[len("sqlite:///") :]).exists() or runs_of(MlflowClient(uri)) == []


@pytest.mark.parametrize("args, message", BAD_COMMANDS)
def test_bad_command_line_fails_in_one_line(args, message, tmp_path, vitexp_in_process):
    """`vitexp.cli.main` in this process; the next test runs the real command."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, stderr = vitexp_in_process(with_store(args, uri))
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("vitexp: error:") and message in lines[0]
    assert nothing_recorded(uri)


def test_the_command_prints_only_that_line(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args, message = BAD_COMMANDS[3]  # a sweep: every job is checked before any runs
    proc = subprocess.run(
        [sys.executable, "-m", "vitexp", *with_store(args, uri)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vitexp: error:") and message in lines[0]
    assert nothing_recorded(uri)


def test_help_and_cfg_do_not_import_tensorflow(tmp_path):
    code = (
        "import sys, runpy; sys.argv=['vitexp','--cfg','job'];"
        "\ntry:\n    runpy.run_module('vitexp', run_name='__main__')\nexcept SystemExit: pass"
        "\nassert 'tensorflow' not in sys.modules, 'tensorflow was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["name"] == "vit"


def test_readme_lists_every_group_option():
    readme = (ROOT / "README.md").read_text()
    for group in ["model", "data", "optimizer", "schedule"]:
        for option in options(group):
            if not option.endswith("_schema"):
                assert option in readme, f"{group}={option} missing from README"


def test_tracking_defaults_follow_mlflow_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert (compose().tracking.uri, compose().tracking.experiment) == (None, "vitexp")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team")
    cfg = compose()
    assert (cfg.tracking.uri, cfg.tracking.experiment) == ("http://127.0.0.1:5999", "team")
    cfg = compose(["tracking.uri=sqlite:////tmp/x.db", "tracking.experiment=mine"])  # the command line wins
    assert (cfg.tracking.uri, cfg.tracking.experiment) == ("sqlite:////tmp/x.db", "mine")


@pytest.mark.parametrize(
    "uri, message",
    [
        ("sqlite:///relative.db", "the path is relative: use sqlite:///{tmp}/relative.db"),
        ("sqlite:///{tmp}/notes.txt", "notes.txt is not an SQLite database"),
        ("sqlite:///{tmp}", "is a folder: name a .db file in it"),
        ("sqlite:///{tmp}/nowhere/x.db", "folder {tmp}/nowhere does not exist"),
        ("sqlite://", "use sqlite:///ABS/PATH.db"),
    ],
)
def test_bad_tracking_file_fails_in_the_preflight(uri, message, tmp_path, monkeypatch, capsys):
    from vitexp.cli import preflight

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a database")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tmp_path))  # as MLflow users set it
    with pytest.raises(SystemExit):
        preflight(["data=synthetic"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("vitexp: error: tracking.uri=") and "(from MLFLOW_TRACKING_URI)" in line
    assert message.format(tmp=tmp_path) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing left behind
