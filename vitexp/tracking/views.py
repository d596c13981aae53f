"""Pages of the MLflow UI (3.x) that open on what a user came for, through the UI's own state.

The runs table keeps its columns, sort and filter in the browser; its "Share" button stores
them as an experiment tag `mlflow.sharedViewState.<key>` (JSON) and links to
`#/experiments/<id>/runs?viewStateShareKey=<key>`, which opens the table in that state for
anyone. `sweep_view` writes such a state for a sweep: its parent and jobs, best first, with
the swept parameters and the scores as columns. With a filter and a sort other than by start
time, the UI lists children flat instead of folded under their parent, so every job's row
shows without a click.
"""

import json

SHARED_VIEW_TAG = "mlflow.sharedViewState."
# an experiment tag holds at most 20,000 characters; past that, the jobs alone by parent
MAX_FILTER_CHARS = 15_000
# pixels: a short param value under its key, a whole score (0.9805825352668762), a tag's key
WIDTHS = {"params": 120, "metrics": 140, "tags": 150}


def column(kind: str, key: str) -> str:
    """The UI's id of a runs-table column: `params.\\`model.depth\\``, `metrics.\\`test_top1\\``."""
    return f"{kind}.`{key}`"


def sweep_view(
    parent_id: str, run_ids: list[str], params: list[str], metrics: list[str], tags: list[str]
) -> dict:
    """The runs table of a sweep: the parent and its jobs, sorted by the first metric (highest
    first), with the given params, metrics and tags as columns."""
    listed = ", ".join(f"'{r}'" for r in [parent_id, *run_ids])
    search = f"attributes.run_id IN ({listed})"
    if len(search) > MAX_FILTER_CHARS:
        search = f"tags.`mlflow.parentRunId` = '{parent_id}'"
    columns = [column("params", p) for p in params]
    columns += [column("metrics", m) for m in metrics] + [column("tags", t) for t in tags]
    return {
        "searchFilter": search,
        "orderByKey": column("metrics", metrics[0]),
        "orderByAsc": False,
        "selectedColumns": columns,
        "columnOrder": columns,
        "columnWidths": {c: WIDTHS[c.split(".", 1)[0]] for c in columns},
    }


def encode(state: dict) -> str:
    return json.dumps(state, separators=(",", ":"))
