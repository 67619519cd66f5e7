"""The supervision policy: observed replicas + progress + counters -> actions + new counters.

One pure function, :func:`decide`, shared by both executors (the Kopf operator and the local
``sgdjob run`` launcher). It does no I/O and imports neither torch nor zmq. An executor
observes its replicas (pods or processes), calls ``decide`` and carries out the actions, then
persists ``Decision.counters`` (the operator in the job's ``status.supervision``, the local
launcher in memory). Restarts are counted here, per replica, from the executor's own state,
never read back from pods or processes (see kubeflow/trainer#2045: a pod's restartCount
resets when the pod is recreated).

Interface::

    decide(*, spec, replicas, counters, progress, now, start_time,
           shards_recoverable=False) -> Decision

- ``spec``: the validated :class:`~sgdjob.api.types.SGDJobSpec` (``spec.supervision``).
- ``replicas``: one :class:`ObservedReplica` per replica the executor can see; replicas it
  cannot see are simply absent (they are "Missing"). ``node`` and ``pending_since`` are
  optional: a local executor leaves ``node`` as None.
- ``counters``: the :class:`~sgdjob.api.types.SupervisionStatus` returned by the previous
  call (``SupervisionStatus()`` the first time).
- ``progress``: the coordinator's latest :class:`Progress` (global step and per-worker step
  times), or None when there is none yet.
- ``now``, ``start_time``: seconds since the epoch (any monotonic-enough clock works, as long
  as ``pending_since`` uses the same one).

Actions (all frozen dataclasses):

- :class:`Create` (role, index, attempt, avoid_nodes): start this replica; nothing runs now.
- :class:`Recreate` (role, index, attempt, reason, avoid_nodes): stop/delete what runs for
  this replica (if anything) and start it again as attempt ``attempt``. A straggler
  replacement is a ``Recreate`` with ``straggler=True`` and the old node in ``avoid_nodes``;
  the operator turns that into node anti-affinity, a local executor just kills and restarts.
- :class:`Delete` (role, index, reason): stop a leftover of an older attempt and wait.
- :class:`Succeed` / :class:`Fail` (reason, message): the job is finished. It succeeds
  when every worker succeeded (``AllWorkersSucceeded``), or when every shard did
  (``ShardsFinished``, ``SHARDS_FINISHED_GRACE_S`` after the last shard exited, by
  ``finished_at``): a shard exits 0 only after each worker said it was done, so a worker
  still running then has nothing left to do (a replacement that came up as its predecessor
  finished), and the executor stops it.
- :class:`SetCondition`: a condition the executor should show: Created (nothing left to
  create), Running (every replica runs), Restarting (while a restarted or replaced replica
  is not running again; its message names them).

Every replica carries an ``attempt`` number (pod label ``sgdjob.dev/attempt`` or a field of
the local process record). A replica observed with an older attempt is a leftover being torn
down; one observed with a newer attempt than the counters know is adopted (the counters were
not persisted after a create): so an executor restarted mid-job neither duplicates nor
double counts.

Failure classification (which exits are retryable, and how an exit reads in a message) is
``sgdjob.exits``'s.
A failed shard is restarted like a worker (same classification, same budget) when the
executor says its checkpoints survive it (``shards_recoverable``: the local executor with
``checkpoint.every`` set; the operator when, in addition, the output is a PersistentVolumeClaim
shared by the job's pods). Otherwise it fails the job at once: a restarted shard would start
from fresh parameters, and pretending to recover would silently lose the training.

Stragglers: each time the coordinator's global step advances (a "window"), a worker whose step
time exceeds ``factor`` x the median of the workers' step times gets one more slow window
(otherwise its count resets); after ``windows`` consecutive slow windows a running worker is
replaced, at most ``maxReplacements`` times per worker.

Example (a local executor)::

    counters = SupervisionStatus()
    while True:
        observed = [ObservedReplica(role="worker", index=i, attempt=p.attempt,
                                    phase=p.phase, exit_code=p.returncode)
                    for i, p in procs.items()]
        d = decide(spec=spec, replicas=observed, counters=counters,
                   progress=read_status(), now=time.time(), start_time=t0)
        counters = d.counters
        for a in d.actions:
            if isinstance(a, (Create, Recreate)):
                restart(a.role, a.index, attempt=a.attempt)
            elif isinstance(a, (Succeed, Fail)):
                return a
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from sgdjob.api.supervision import ReplicaSupervision, SupervisionStatus
from sgdjob.api.types import SGDJobSpec
from sgdjob.exits import describe_exit, is_retryable

Role = Literal["ps", "worker"]
Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Terminating"]
JobPhase = Literal["Pending", "Running", "Succeeded", "Failed"]

# How long every shard must have been finished before workers still running are stopped
# (``ShardsFinished``): a worker exits within a second of its DONE, a kubelet reports it
# within a few.
SHARDS_FINISHED_GRACE_S = 30.0


def replica_name(role: Role, index: int) -> str:
    """The key of a replica in counters and status: `ps-0`, `worker-3`."""
    return f"{role}-{index}"


@dataclass(frozen=True)
class ObservedReplica:
    """What an executor sees of one replica (absent replicas are Missing)."""

    role: Role
    index: int
    phase: Phase
    attempt: int = 0
    exit_code: int | None = None
    reason: str = ""  # OOMKilled, Evicted, ImagePullBackOff, Unschedulable, ...
    node: str | None = None
    pending_since: float | None = None
    finished_at: float | None = None  # when it exited (Succeeded, Failed), on ``now``'s clock

    @property
    def name(self) -> str:
        return replica_name(self.role, self.index)


@dataclass(frozen=True)
class Progress:
    """The coordinator's view: the global step and each worker's recent step time (s)."""

    step: int
    step_times: Mapping[int, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Create:
    role: Role
    index: int
    attempt: int
    avoid_nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recreate:
    role: Role
    index: int
    attempt: int
    reason: str
    avoid_nodes: tuple[str, ...] = ()
    straggler: bool = False


@dataclass(frozen=True)
class Delete:
    role: Role
    index: int
    reason: str


@dataclass(frozen=True)
class SetCondition:
    type: Literal["Created", "Running", "Restarting"]
    status: Literal["True", "False"]
    reason: str
    message: str = ""


@dataclass(frozen=True)
class Succeed:
    reason: str
    message: str


@dataclass(frozen=True)
class Fail:
    reason: str
    message: str


Action = Create | Recreate | Delete | SetCondition | Succeed | Fail


@dataclass(frozen=True)
class Decision:
    """What to do now, the job phase to show and the counters to persist."""

    actions: tuple[Action, ...]
    counters: SupervisionStatus
    phase: JobPhase
    message: str


def expected_replicas(spec: SGDJobSpec) -> list[tuple[Role, int]]:
    """Every replica the job runs: shards first, then workers (replicas + backup workers)."""
    shards: list[tuple[Role, int]] = [("ps", k) for k in range(spec.parameter_servers.shards)]
    n = spec.workers.replicas + spec.training.backup_workers
    return shards + [("worker", i) for i in range(n)]


def cleanup_targets(
    policy: Literal["Running", "All", "None"], replicas: Sequence[ObservedReplica]
) -> list[ObservedReplica]:
    """Replicas to stop after the job finished, per ``supervision.cleanPodPolicy``."""
    if policy == "None":
        return []
    if policy == "All":
        return [r for r in replicas if r.phase != "Terminating"]
    return [r for r in replicas if r.phase in ("Pending", "Running")]


def _slow_workers(
    spec: SGDJobSpec, progress: Progress | None
) -> tuple[set[int], set[int], float | None]:
    """Workers above k x median in this window, workers measured, and the median."""
    if progress is None:
        return set(), set(), None
    times = {i: t for i, t in progress.step_times.items() if t is not None and t > 0}
    if len(times) < 2:
        return set(), set(times), None
    median = statistics.median(times.values())
    st = spec.supervision.straggler
    slow = {
        i for i, t in times.items() if t > st.factor * median and t - median > st.min_lag_seconds
    }
    return slow, set(times), median


def decide(
    *,
    spec: SGDJobSpec,
    replicas: Sequence[ObservedReplica],
    counters: SupervisionStatus,
    progress: Progress | None,
    now: float,
    start_time: float | None,
    shards_recoverable: bool = False,
) -> Decision:
    """One supervision pass; see the module docstring for the contract."""
    sup = spec.supervision
    observed = {r.name: r for r in replicas}
    state: dict[str, ReplicaSupervision] = dict(counters.replicas)
    actions: list[Action] = []
    restarted: list[str] = []

    def fail(reason: str, message: str) -> Decision:
        return Decision(
            actions=(Fail(reason, message),),
            counters=SupervisionStatus(replicas=state, last_window=counters.last_window),
            phase="Failed",
            message=message,
        )

    if (
        sup.active_deadline_seconds is not None
        and start_time is not None
        and now - start_time > sup.active_deadline_seconds
    ):
        return fail(
            "DeadlineExceeded",
            f"the job ran longer than activeDeadlineSeconds ({sup.active_deadline_seconds}s)",
        )

    finished = _finished_by_shards(spec, replicas, state, now)
    if finished is not None:
        return Decision(
            actions=(Succeed("ShardsFinished", finished),),
            counters=SupervisionStatus(replicas=state, last_window=counters.last_window),
            phase="Succeeded",
            message=finished,
        )

    new_window = progress is not None and progress.step > counters.last_window
    slow, measured, median = _slow_workers(spec, progress) if new_window else (set(), set(), None)

    for role, index in expected_replicas(spec):
        name = replica_name(role, index)
        rs = state.get(name, ReplicaSupervision())
        obs = observed.get(name)
        avoid = tuple(rs.avoid_nodes)

        if obs is not None and obs.attempt > rs.attempt:
            # Created by us before the counters were persisted: adopt it.
            rs = rs.model_copy(update={"attempt": obs.attempt, "seen": False})
        if obs is not None and obs.attempt < rs.attempt:
            if obs.phase != "Terminating":
                actions.append(Delete(role, index, f"leftover of attempt {obs.attempt}"))
            state[name] = rs
            continue
        if obs is not None and obs.phase == "Terminating":
            state[name] = rs
            continue

        failure: tuple[int | None, str] | None = None
        if obs is None:
            if not rs.seen:
                actions.append(Create(role, index, rs.attempt, avoid))
                state[name] = rs
                continue
            failure = (None, "Deleted")
        else:
            rs = rs.model_copy(update={"seen": True})
            if obs.phase == "Failed":
                failure = (obs.exit_code, obs.reason)
            elif obs.phase == "Pending":
                deadline = sup.pre_running_deadline_seconds
                if (
                    deadline is not None
                    and obs.pending_since is not None
                    and now - obs.pending_since > deadline
                ):
                    state[name] = rs
                    why = obs.reason or "Pending"
                    return fail(
                        "PreRunningDeadlineExceeded",
                        f"{name} stayed Pending for more than {deadline}s: {why}",
                    )

        if failure is not None:
            code, reason = failure
            what = describe_exit(code, reason)
            label = f"worker {index}" if role == "worker" else f"parameter-server shard {index}"
            if role == "ps" and not shards_recoverable:
                state[name] = rs
                return fail(
                    "ShardFailed",
                    f"parameter-server shard {index} failed ({what}); its checkpoints do not "
                    "survive it here (checkpoint.every is unset, or, on Kubernetes, no "
                    "kubernetes.outputClaimName), so the job cannot continue without losing "
                    "its parameters",
                )
            if not is_retryable(code, reason):
                state[name] = rs
                return fail(
                    "WorkerFailedPermanently" if role == "worker" else "ShardFailedPermanently",
                    f"{label} failed ({what}): a permanent error, not retried",
                )
            if rs.restarts >= sup.max_restarts:
                state[name] = rs
                return fail(
                    "RestartBudgetExhausted",
                    f"{label} failed ({what}) after {rs.restarts} restarts "
                    f"(maxRestarts {sup.max_restarts})",
                )
            rs = rs.model_copy(
                update={
                    "attempt": rs.attempt + 1,
                    "seen": False,
                    "restarts": rs.restarts + 1,
                    "slow_windows": 0,
                }
            )
            actions.append(Recreate(role, index, rs.attempt, f"failed ({what})", avoid))
            restarted.append(name)
            state[name] = rs
            continue

        if role == "worker" and new_window and index in measured:
            windows = rs.slow_windows + 1 if index in slow else 0
            rs = rs.model_copy(update={"slow_windows": windows})
            st = sup.straggler
            if (
                windows >= st.windows
                and rs.replacements < st.max_replacements
                and obs is not None
                and obs.phase == "Running"
            ):
                avoid_now = avoid + ((obs.node,) if obs.node and obs.node not in avoid else ())
                rs = rs.model_copy(
                    update={
                        "attempt": rs.attempt + 1,
                        "seen": False,
                        "replacements": rs.replacements + 1,
                        "slow_windows": 0,
                        "avoid_nodes": list(avoid_now),
                    }
                )
                t = progress.step_times.get(index) if progress else None
                actions.append(
                    Recreate(
                        role,
                        index,
                        rs.attempt,
                        f"straggler: step time {t:.3g}s > {st.factor:g} x median "
                        f"{median:.3g}s for {windows} windows"
                        if t is not None and median is not None
                        else "straggler",
                        avoid_now,
                        straggler=True,
                    )
                )
        state[name] = rs

    last_window = progress.step if new_window and progress is not None else counters.last_window
    new_counters = SupervisionStatus(replicas=state, last_window=last_window)
    workers = [r for r in replicas if r.role == "worker"]
    n_workers = spec.workers.replicas + spec.training.backup_workers
    succeeded = [r for r in workers if r.phase == "Succeeded" and not _stale(r, state)]
    if len(succeeded) == n_workers and not actions:
        return Decision(
            actions=(Succeed("AllWorkersSucceeded", f"all {n_workers} workers succeeded"),),
            counters=new_counters,
            phase="Succeeded",
            message=f"all {n_workers} workers succeeded",
        )

    live = [r for r in replicas if r.phase in ("Running", "Succeeded") and not _stale(r, state)]
    creating = any(isinstance(a, Create) for a in actions)
    # Restarting stays True until every restarted or replaced replica runs again.
    recovering = [
        name
        for name, rs in state.items()
        if rs.attempt > 0
        and (
            name not in observed
            or observed[name].attempt < rs.attempt
            or observed[name].phase not in ("Running", "Succeeded")
        )
    ]
    if recovering:
        actions.append(
            SetCondition("Restarting", "True", "ReplicaRestarted", ", ".join(recovering))
        )
    if not creating:
        actions.append(SetCondition("Created", "True", "AllReplicasCreated"))
    all_running = len(live) == len(expected_replicas(spec))
    if all_running:
        actions.append(SetCondition("Running", "True", "AllReplicasRunning"))
    # A job that has restarted something was running before: do not flip it back to Pending.
    was_running = any(rs.attempt > 0 for rs in state.values())
    phase: JobPhase = "Running" if all_running or was_running else "Pending"
    message = _summary(spec, live, restarted)
    return Decision(tuple(actions), new_counters, phase, message)


def _finished_by_shards(
    spec: SGDJobSpec,
    replicas: Sequence[ObservedReplica],
    state: Mapping[str, ReplicaSupervision],
    now: float,
) -> str | None:
    """Why the job is finished although some worker has not succeeded; None if it is not.

    A shard exits 0 only once every worker index said it was done (``Shard.should_exit``;
    a signal makes it exit 128 + N), and shard 0 only once worker 0 reported the final
    evaluation, after writing the model. So when every current shard succeeded, the training
    is over. A worker still Pending or Running ``SHARDS_FINISHED_GRACE_S`` later is not just
    exiting after its DONE: it is a replacement that came up after its previous attempt had
    finished (a straggler replaced as it finished, say), and it would wait for the shards'
    welcome forever, and the job with it."""
    shards = [r for r in replicas if r.role == "ps" and not _stale(r, state)]
    if len(shards) != spec.parameter_servers.shards or any(
        r.phase != "Succeeded" or r.finished_at is None for r in shards
    ):
        return None
    # Time for a worker that said DONE to exit 0 on its own, and for a kubelet to report it:
    # worker 0's pod carries the final result in its termination message.
    if now - max(r.finished_at or 0.0 for r in shards) < SHARDS_FINISHED_GRACE_S:
        return None
    workers = [r for r in replicas if r.role == "worker" and not _stale(r, state)]
    n_workers = spec.workers.replicas + spec.training.backup_workers
    if len(workers) == n_workers and all(r.phase == "Succeeded" for r in workers):
        return None  # the usual end: AllWorkersSucceeded
    leftover = sorted(r.name for r in workers if r.phase != "Succeeded")
    return (
        f"all {len(shards)} parameter-server shards finished {SHARDS_FINISHED_GRACE_S:.0f}s "
        "ago: every worker said it was done"
        + (f"; stopping {', '.join(leftover)}, still running" if leftover else "")
    )


def _stale(r: ObservedReplica, state: Mapping[str, ReplicaSupervision]) -> bool:
    rs = state.get(r.name)
    return rs is not None and r.attempt < rs.attempt


def _summary(spec: SGDJobSpec, live: Sequence[ObservedReplica], restarted: Sequence[str]) -> str:
    shards = sum(1 for r in live if r.role == "ps")
    workers = sum(1 for r in live if r.role == "worker")
    n = spec.workers.replicas + spec.training.backup_workers
    text = f"{shards}/{spec.parameter_servers.shards} shards and {workers}/{n} workers running"
    if restarted:
        text += f"; restarting {', '.join(restarted)}"
    return text
