"""MLflow, behind one wall: nothing outside this package imports MLflow or reads its objects.

By default every run lands in `sqlite:///<project>/mlflow.db` with artifacts in
`<project>/mlruns`, the store `make ui` opens, whatever directory Hydra runs a job in.

- `tracker`: the Tracker, which writes runs (through a server's outage) and reads them back
  as `records` (RunRecord, ModelRecord: vitexp's own, not MLflow's objects);
- `tag`: the names of vitexp's run tags; `uri`: where a store is, from its URI alone;
- `store`: a client that creates a new sqlite store once, reachability;
- `pyfunc`: vitexp's MLflow Model; `views`: runs-table views for the UI; `system`: system
  metrics.

The names below load on first use, so the light modules (`uri`, `tag`, `records`) cost
no MLflow import: the command line checks a config in a fraction of a second.
"""

import importlib

_HOMES = {
    "Tracker": "tracker",
    "StoreDown": "tracker",
    "PARENT_ENV": "tracker",
    "CLASS_NAMES_ARTIFACT": "tracker",
    "source_tags": "tracker",
    "model_name_problem": "tracker",
    "check_reachable": "store",
    "RunRecord": "records",
    "ModelRecord": "records",
    "FINISHED": "records",
    "FAILED": "records",
    "KILLED": "records",
    "RUNNING": "records",
    "flatten": "records",
    "TrackingError": "uri",
    "PROJECT_ROOT": "uri",
    "resolve_uri": "uri",
    "sqlite_store": "uri",
    "sqlite_path": "uri",
    "env_uri": "uri",
    "env_experiment": "uri",
    "is_server": "uri",
}
__all__ = [*_HOMES, "tag"]


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    if name == "tag":
        return importlib.import_module(f"{__name__}.tag")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
