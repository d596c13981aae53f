"""A sweep seen as a user sees it: a real 2x2 sweep, then the link vitexp printed, followed in
headless Chromium against a real `mlflow ui` on its store; and a training run's terminal."""

import html.parser
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import ARTIFACTS, TINY, answers, chromium_flags, free_port, run_vitexp, runs_of, wait_for

# one worker runs the module: its sweep and UI are made once, not once a worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sweep_ui")]
needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None, reason="install chromium (.ci/run does)"
)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """`vitexp -m patch_size=4,8 depth=1,2` (tiny) into a new sqlite store: (folder, uri, stderr)."""
    folder = tmp_path_factory.mktemp("sweep-ui")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    args = ["-m", *TINY, "trainer.epochs=2", "patch_size=4,8", "depth=1,2", f"tracking.uri={uri}"]
    proc = run_vitexp([*args, f"hydra.sweep.dir={folder / 'sweep'}"], folder)
    return folder, uri, proc.stderr


@pytest.fixture(scope="module")
def ui(sweep):
    """`mlflow ui` on the sweep's store at a free port on 127.0.0.1: its base URL."""
    folder, uri, _ = sweep
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--workers", "1"],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(f"{base}/health"), proc, timeout=120, poll=0.5, what="the MLflow UI")
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def sweep_runs(uri):
    from mlflow.tracking import MlflowClient

    runs = runs_of(MlflowClient(uri))
    (parent,) = [r for r in runs if r.data.tags.get("vitexp.sweep") == "true"]
    return parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def shown(value: float) -> str:
    """A metric as the UI writes it (JavaScript's number to string: 1, not 1.0)."""
    return repr(value).removesuffix(".0")


class GridCells(html.parser.HTMLParser):
    """The runs table's cells as the browser rendered them: {row id (run id): {column id: text}}.

    The table is an ag-grid: each row is a `div role=row row-id=<run id>` (once per pinned and
    scrolled part), each cell a `div role=gridcell col-id=<column>` inside it.
    """

    def __init__(self):
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self.stack: list[tuple[str, str | None, str | None]] = []  # (tag, row id, column id)
        self.text: dict[tuple[str, str], list[str]] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        row, col = (self.stack[-1][1], self.stack[-1][2]) if self.stack else (None, None)
        if a.get("role") == "row" and a.get("row-id"):
            row = a["row-id"]
        if a.get("role") == "gridcell" and a.get("col-id"):
            col = a["col-id"]
        if tag not in ("br", "img", "input", "meta", "link", "hr", "path", "circle", "rect"):
            self.stack.append((tag, row, col))

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        if self.stack and self.stack[-1][1] and self.stack[-1][2] and data.strip():
            self.text.setdefault((self.stack[-1][1], self.stack[-1][2]), []).append(data.strip())

    def table(self) -> dict[str, dict[str, str]]:
        for (row, col), parts in self.text.items():
            self.rows.setdefault(row, {})[col] = " ".join(parts)
        return self.rows


def browser(tmp_path) -> list[str]:
    """Chromium on a 1920x1080 screen: the table's columns beyond the window are not rendered."""
    return [f for f in chromium_flags(tmp_path) if not f.startswith("--window-size=")] + [
        "--window-size=1920,1080"
    ]


def rendered(url: str, tmp_path, expected) -> str:
    """The page's DOM once it holds every `expected` text (the UI loads runs after its first
    paint)."""
    flags = browser(tmp_path)
    for _ in range(6):
        dom = subprocess.run(
            ["chromium", *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180
        ).stdout
        if all(text in dom for text in expected):
            break
    return dom


@needs_chromium
def test_the_printed_link_shows_each_job_with_its_swept_values_and_scores_and_the_winner(sweep, ui, tmp_path):
    folder, uri, stderr = sweep
    parent, jobs = sweep_runs(uri)
    assert len(jobs) == 4 and all(j.info.status == "FINISHED" for j in jobs)
    printed = re.search(r"^  UI: (http://127\.0\.0\.1:5000/\S+)", stderr, re.M)
    assert printed, stderr[-3000:]
    link = printed[1].replace("http://127.0.0.1:5000", ui)  # `mlflow ui` here runs on a free port
    dom = rendered(link, tmp_path, [j.info.run_id for j in jobs] + [parent.info.run_id])
    (ARTIFACTS / "mlflow_ui_sweep_link.html").write_text(dom)
    subprocess.run(
        [
            "chromium",
            *chromium_flags(tmp_path),
            f"--screenshot={ARTIFACTS / 'mlflow_ui_sweep_link.png'}",
            link,
        ],
        capture_output=True,
        timeout=180,
    )
    parser = GridCells()
    parser.feed(dom)
    rows = parser.table()
    for job in jobs:  # each job's row: its swept values and its validation and test top-1
        row = rows.get(job.info.run_id, {})
        assert row.get("attributes.`Run Name`", "").endswith(job.info.run_name), row  # after its colour
        for key in ("model.patch_size", "model.depth"):
            assert row.get(f"params.`{key}`") == job.data.params[key], (key, row)
        for key in ("best_val_top1", "test_top1"):
            assert row.get(f"metrics.`{key}`") == shown(job.data.metrics[key]), (key, row)
    best = max(jobs, key=lambda j: j.data.metrics["best_val_top1"])
    winner = rows.get(parent.info.run_id, {})  # the parent's row answers the sweep
    assert winner.get("metrics.`best_val_top1`") == shown(best.data.metrics["best_val_top1"]), winner
    assert winner.get("metrics.`best_test_top1`") == shown(best.data.metrics["test_top1"]), winner
    for key in ("model.patch_size", "model.depth"):
        assert winner.get(f"tags.`best.{key}`") == best.data.params[key], (key, winner)
    assert len(rows) == 5 and "matching runs" in dom  # the sweep only, flat: no click to unfold


@needs_chromium
def test_the_compare_page_plots_validation_top1_not_a_system_metric(sweep, ui, tmp_path):
    _, uri, _ = sweep
    parent, jobs = sweep_runs(uri)
    ids = ",".join(f'"{j.info.run_id}"' for j in jobs)
    url = f'{ui}/#/compare-runs?runs=[{ids}]&experiments=["{parent.info.experiment_id}"]'
    dom = rendered(url, tmp_path, ["Parallel Coordinates Plot", "Metrics:"])
    (ARTIFACTS / "mlflow_ui_sweep_compare_plot.html").write_text(dom)
    chosen = dom.split("Metrics:", 1)[1].split("Clear All", 1)[0]  # the plot's metric selector
    assert re.search(r">val_top1<", chosen) and "system/" not in chosen, chosen[:2000]


def test_the_sweep_logs_each_param_once_and_its_pictures(sweep):
    from mlflow.tracking import MlflowClient

    _, uri, stderr = sweep
    parent, jobs = sweep_runs(uri)
    for job in jobs:
        assert "patch_size" not in job.data.params and "depth" not in job.data.params
    pictures = {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/comparison.png", "comparison/val_top1_curves.png"} <= pictures
    assert parent.data.metrics["trials_finished"] == 4 and parent.data.metrics["trials_failed"] == 0
