"""The process contract: what an executor tells a trainer process, as environment variables.

A Kubernetes pod and a local child process get exactly the same variables; this module is the
only place that names them. ``sgdjob trainer`` reads them (command-line flags may override),
the operator's manifests and the local launcher write them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

ENV_ROLE = "SGDJOB_ROLE"  # "ps" or "worker"
ENV_INDEX = "SGDJOB_INDEX"  # shard index k or worker index i
ENV_JOB_NAME = "SGDJOB_JOB_NAME"
ENV_SPEC = "SGDJOB_SPEC"  # path of the validated spec as JSON (camelCase)
ENV_SHARD_ADDRS = "SGDJOB_SHARD_ADDRS"  # comma-separated ZeroMQ endpoints, shard 0 first
ENV_BIND = "SGDJOB_BIND"  # shard: ZeroMQ endpoint to bind, port 0 picks a free one
ENV_STATUS_BIND = "SGDJOB_STATUS_BIND"  # shard 0: host:port for /status and /metrics
ENV_TOKEN = "SGDJOB_TOKEN"  # job token carried in every message header
ENV_OUTPUT = "SGDJOB_OUTPUT"  # output directory (model, metrics, summary)
ENV_READY_FILE = "SGDJOB_READY_FILE"  # optional: a shard writes its bound ports here
# Optional, set on pods to the container's terminationMessagePath: worker 0 writes its final
# step and metric there, which the operator reads after the coordinator has exited.
ENV_TERMINATION_LOG = "SGDJOB_TERMINATION_LOG"
TERMINATION_LOG = "/dev/termination-log"  # the kubelet's default path
ENV_CURVE_SERVER_PUBLIC = "SGDJOB_CURVE_SERVER_PUBLIC"  # shards and workers
ENV_CURVE_SERVER_SECRET = "SGDJOB_CURVE_SERVER_SECRET"  # shards only
ENV_CURVE_CLIENT_PUBLIC = "SGDJOB_CURVE_CLIENT_PUBLIC"  # shards (to admit) and workers
ENV_CURVE_CLIENT_SECRET = "SGDJOB_CURVE_CLIENT_SECRET"  # workers only
CURVE_ENVS = (
    ENV_CURVE_SERVER_PUBLIC,
    ENV_CURVE_SERVER_SECRET,
    ENV_CURVE_CLIENT_PUBLIC,
    ENV_CURVE_CLIENT_SECRET,
)
ENV_ATTEMPT = "SGDJOB_ATTEMPT"  # optional: 0 for the first start of a replica, +1 per restart
# The run this process belongs to: the SGDJob's uid on Kubernetes, a fresh id per `sgdjob run`
# (or the resumed run's id with --resume). Checkpoints and outputs are keyed by it, so a new
# run never restores another run's state.
ENV_RUN_ID = "SGDJOB_RUN_ID"
# Optional, for a restarted shard: comma-separated indices of the workers the executor saw
# succeed. They will never push again, so the shard counts them as done (sgdjob.shard).
ENV_DONE_WORKERS = "SGDJOB_DONE_WORKERS"

# Exit codes of `sgdjob trainer`, the one place they are defined. The executors' policy
# (sgdjob.exits.is_retryable) classifies them: EXIT_PEER and signals (>= 128) are retryable
# within supervision.maxRestarts; EXIT_ERROR and EXIT_SPEC are the program's own errors and
# fail the job at once.
EXIT_OK = 0  # done
EXIT_ERROR = 1  # an error in the program or the user's code
EXIT_SPEC = 2  # invalid spec or contract, or a checkpoint of another spec: permanent
EXIT_PEER = 3  # a peer stopped answering within the job's deadline: retryable
RETRYABLE_EXIT_CODES = frozenset({EXIT_PEER})
EXIT_MEANINGS = {
    EXIT_OK: "done",
    EXIT_ERROR: "error",
    EXIT_SPEC: "invalid spec or contract",
    EXIT_PEER: "a peer stopped answering",
}

Role = Literal["ps", "worker"]
ROLES: tuple[Role, ...] = ("ps", "worker")


class ContractError(ValueError):
    """A required variable is missing or malformed; the message names it."""


@dataclass(frozen=True)
class ProcessContract:
    """Everything a trainer process needs besides the spec itself."""

    role: Role
    index: int
    job_name: str
    spec_path: str
    token: str
    output_dir: str
    shard_addrs: tuple[str, ...] = ()
    bind: str = ""
    status_bind: str = ""
    ready_file: str = ""
    attempt: int = 0
    run_id: str = ""
    done_workers: tuple[int, ...] = ()
    # Z85 CURVE keys; each role gets only what it needs (see curve_for_role).
    curve_server_public: str = ""
    curve_server_secret: str = ""
    curve_client_public: str = ""
    curve_client_secret: str = ""

    def to_env(self) -> dict[str, str]:
        env = {
            ENV_ROLE: self.role,
            ENV_INDEX: str(self.index),
            ENV_JOB_NAME: self.job_name,
            ENV_SPEC: self.spec_path,
            ENV_TOKEN: self.token,
            ENV_OUTPUT: self.output_dir,
            ENV_SHARD_ADDRS: ",".join(self.shard_addrs),
            ENV_ATTEMPT: str(self.attempt),
        }
        for key, value in (
            (ENV_CURVE_SERVER_PUBLIC, self.curve_server_public),
            (ENV_CURVE_SERVER_SECRET, self.curve_server_secret),
            (ENV_CURVE_CLIENT_PUBLIC, self.curve_client_public),
            (ENV_CURVE_CLIENT_SECRET, self.curve_client_secret),
            (ENV_BIND, self.bind),
            (ENV_STATUS_BIND, self.status_bind),
            (ENV_READY_FILE, self.ready_file),
            (ENV_RUN_ID, self.run_id),
            (ENV_DONE_WORKERS, ",".join(str(i) for i in self.done_workers)),
        ):
            if value:
                env[key] = value
        return env


def _need(env: Mapping[str, str], key: str) -> str:
    value = env.get(key, "")
    if not value:
        raise ContractError(f"{key} is not set")
    return value


def from_env(env: Mapping[str, str] | None = None) -> ProcessContract:
    """Read the contract from the environment, naming the first bad variable."""
    env = os.environ if env is None else env
    role = _need(env, ENV_ROLE)
    if role not in ROLES:
        raise ContractError(f"{ENV_ROLE} must be one of {', '.join(ROLES)}, not {role!r}")
    raw_index = _need(env, ENV_INDEX)
    try:
        index = int(raw_index)
    except ValueError:
        raise ContractError(f"{ENV_INDEX} must be an integer, not {raw_index!r}") from None
    if index < 0:
        raise ContractError(f"{ENV_INDEX} must be >= 0, not {index}")
    raw_attempt = env.get(ENV_ATTEMPT, "0") or "0"
    if not raw_attempt.isdigit():
        raise ContractError(f"{ENV_ATTEMPT} must be a non-negative integer, not {raw_attempt!r}")
    addrs = tuple(a for a in env.get(ENV_SHARD_ADDRS, "").split(",") if a)
    raw_done = [d for d in env.get(ENV_DONE_WORKERS, "").split(",") if d]
    if not all(d.isdigit() for d in raw_done):
        raise ContractError(f"{ENV_DONE_WORKERS} must list worker indices, not {raw_done!r}")
    if role == "worker" and not addrs:
        raise ContractError(f"{ENV_SHARD_ADDRS} is not set")
    if role == "ps" and not env.get(ENV_BIND):
        raise ContractError(f"{ENV_BIND} is not set")
    return ProcessContract(
        role="ps" if role == "ps" else "worker",
        index=index,
        job_name=_need(env, ENV_JOB_NAME),
        spec_path=_need(env, ENV_SPEC),
        token=_need(env, ENV_TOKEN),
        output_dir=_need(env, ENV_OUTPUT),
        shard_addrs=addrs,
        bind=env.get(ENV_BIND, ""),
        status_bind=env.get(ENV_STATUS_BIND, ""),
        ready_file=env.get(ENV_READY_FILE, ""),
        attempt=int(raw_attempt),
        run_id=env.get(ENV_RUN_ID, ""),
        done_workers=tuple(int(d) for d in raw_done),
        curve_server_public=env.get(ENV_CURVE_SERVER_PUBLIC, ""),
        curve_server_secret=env.get(ENV_CURVE_SERVER_SECRET, ""),
        curve_client_public=env.get(ENV_CURVE_CLIENT_PUBLIC, ""),
        curve_client_secret=env.get(ENV_CURVE_CLIENT_SECRET, ""),
    )


def with_curve(contract: ProcessContract, keys: Mapping[str, str]) -> ProcessContract:
    """``contract`` plus the share of a job's CURVE keys that its role may hold.

    ``keys`` maps server_public/server_secret/client_public/client_secret to Z85 strings.
    A worker never holds the server secret and a shard never holds the client secret.
    """
    ps = contract.role == "ps"
    return replace(
        contract,
        curve_server_public=keys["server_public"],
        curve_client_public=keys["client_public"],
        curve_server_secret=keys["server_secret"] if ps else "",
        curve_client_secret="" if ps else keys["client_secret"],
    )
