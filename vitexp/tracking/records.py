"""What the tracker hands out: vitexp's own records of runs and models, not MLflow's objects,
so that nothing outside vitexp.tracking depends on how the store spells them."""

import json
from dataclasses import dataclass, field
from typing import Any

# the tag MLflow itself keeps a child run's parent in
PARENT_TAG = "mlflow.parentRunId"
# how a run ended (MLflow's statuses)
FINISHED, FAILED, KILLED, RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"


@dataclass(frozen=True)
class RunRecord:
    """One run as the store holds it.

    Attributes:
        id: the run's id.
        name: the run's name.
        status: RUNNING, FINISHED, FAILED or KILLED.
        experiment_id: the id of the experiment it belongs to.
        start_time: when it started, in ms since the epoch.
        end_time: when it ended, in ms since the epoch; None while it runs.
        active: False for a deleted run.
        params, metrics, tags: its params, latest metric values and tags.
    """

    id: str
    name: str
    status: str
    experiment_id: str
    start_time: int
    end_time: int | None = None
    active: bool = True
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def parent_id(self) -> str | None:
        return self.tags.get(PARENT_TAG)

    @classmethod
    def of(cls, run) -> "RunRecord":
        """The record of an MLflow `Run`."""
        info, data = run.info, run.data
        return cls(
            id=info.run_id,
            name=info.run_name,
            status=info.status,
            experiment_id=info.experiment_id,
            start_time=info.start_time,
            end_time=info.end_time,
            active=info.lifecycle_stage == "active",
            params=dict(data.params),
            metrics=dict(data.metrics),
            tags=dict(data.tags),
        )


@dataclass(frozen=True)
class ModelRecord:
    """A model a run logged (MLflow's LoggedModel): its id and tags."""

    id: str
    tags: dict[str, str] = field(default_factory=dict)


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """`{"model": {"depth": 4}}` -> `{"model.depth": "4"}`, for MLflow params."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, list) else str(tree)}
