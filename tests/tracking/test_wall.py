"""The tracking wall: MLflow is spoken to in vitexp/tracking/ alone, so swapping the tracker
touches that package and the tracking config (conf/tracking/) and nothing else."""

import ast
import re

from conftest import ROOT

from vitexp.tracking import tag

TRACKING = ROOT / "vitexp" / "tracking"
OUTSIDE = sorted(
    p
    for p in [*(ROOT / "vitexp").rglob("*.py"), *(ROOT / "hydra_plugins").rglob("*.py")]
    if TRACKING not in p.parents
)
TAG_NAMES = {value for name, value in vars(tag).items() if name.isupper()}
MLFLOW_OBJECTS = re.compile(
    r"\.info\.(run_id|run_name|status|experiment_id|start_time|end_time)\b|\.data\.(params|metrics|tags)\b"
)


def strings(tree: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_only_the_tracking_package_imports_mlflow():
    offenders = []
    for path in OUTSIDE:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "mlflow"]
    assert not offenders, offenders


def test_no_module_outside_reads_mlflow_objects_or_spells_a_tag_name():
    """Runs come back as vitexp's RunRecord (`run.id`, `run.params`), tags by their name in
    vitexp.tracking.tag, MLflow's variables and URIs through vitexp.tracking.uri."""
    offenders = []
    for path in OUTSIDE:
        text = path.read_text()
        where = path.relative_to(ROOT)
        offenders += [f"{where}: {m.group(0)}" for m in MLFLOW_OBJECTS.finditer(text)]
        for value in strings(ast.parse(text)):
            a_package = value in TAG_NAMES and (ROOT / value.replace(".", "/")).is_dir()  # vitexp.data
            if (value in TAG_NAMES and not a_package) or value.startswith(("mlflow.", "MLFLOW_")):
                offenders.append(f"{where}: {value!r}")
    assert not offenders, offenders


def test_the_wall_is_seen_from_both_sides():
    """The test above would catch what it looks for: the tracking package itself does read
    MLflow's objects and spell the tag names (in vitexp/tracking/tag.py)."""
    inside = "".join(p.read_text() for p in TRACKING.glob("*.py"))
    assert MLFLOW_OBJECTS.search(inside) and "import mlflow" in inside
    assert all(f'"{value}"' in (TRACKING / "tag.py").read_text() for value in TAG_NAMES)
