"""Supervision in the SGDJob API: how an executor restarts, replaces, times out and cleans up
replicas (``spec.supervision``), and the counters it keeps between passes
(``status.supervision``), which ``sgdjob.policy`` reads and writes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from sgdjob.api.strict import Strict


class StragglerSpec(Strict):
    """Replace a worker > `factor` x median (and > median + `minLagSeconds`) for `windows` polls."""

    factor: float = Field(
        default=3.0, gt=1.0, le=1000.0, description="k: slow means step time > k x median."
    )
    # A replacement costs a process start and a resync (seconds); a worker a few ms behind a
    # millisecond median is noise on a busy machine, not a straggler worth that.
    min_lag_seconds: float = Field(
        default=0.01,
        ge=0.0,
        le=3600.0,
        description="Slow also means step time > median + this many seconds (0: k x median alone).",
    )
    windows: int = Field(
        default=3, ge=1, le=10_000, description="W: consecutive slow observations before acting."
    )
    max_replacements: int = Field(
        default=1, ge=0, le=1000, description="Straggler replacements allowed per worker."
    )


class SupervisionSpec(Strict):
    """How an executor restarts, replaces, times out and cleans up replicas."""

    max_restarts: int = Field(
        default=3, ge=0, le=10_000, description="Restarts allowed per replica after failures."
    )
    straggler: StragglerSpec = Field(default_factory=StragglerSpec)
    pre_running_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        le=31_536_000,
        description="Fail the job when a replica stays Pending (unscheduled, pulling) this long.",
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, le=31_536_000, description="Fail the job after running this long."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        le=31_536_000,
        description="Delete the finished job (and, through owner references, its children).",
    )
    clean_pod_policy: Literal["Running", "All", "None"] = Field(
        default="Running",
        description="After the job finishes: delete still-running pods, all pods, or none.",
    )


class ReplicaSupervision(BaseModel):
    """What an executor remembers about one replica between passes (see sgdjob.policy)."""

    model_config = ConfigDict(populate_by_name=True, alias_generator=to_camel, frozen=True)

    attempt: int = 0
    seen: bool = False
    restarts: int = 0
    replacements: int = 0
    slow_windows: int = 0
    avoid_nodes: list[str] = Field(default_factory=list)


class SupervisionStatus(BaseModel):
    """The supervision counters, persisted in the status so an operator restart loses none."""

    model_config = ConfigDict(populate_by_name=True, alias_generator=to_camel, frozen=True)

    replicas: dict[str, ReplicaSupervision] = Field(default_factory=dict)
    last_window: int = 0
