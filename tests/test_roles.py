"""What a trainer process derives from its contract: how long it waits, which run it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sgdjob.api.validation import parse_job
from sgdjob.checkpoint import Checkpointer, ShardState
from sgdjob.contract import ProcessContract
from sgdjob.roles import peer_timeout_s, run_identity
from tests.conftest import job_doc


def test_peers_are_awaited_for_the_jobs_active_deadline_not_a_fixed_time() -> None:
    with_deadline = parse_job(job_doc(supervision={"activeDeadlineSeconds": 7200})).spec
    assert peer_timeout_s(with_deadline, env={}) == 7200.0
    # No deadline: wait as long as the executor keeps the process (it restarts or fails it).
    assert peer_timeout_s(parse_job(job_doc()).spec, env={}) is None
    assert peer_timeout_s(with_deadline, env={"SGDJOB_COMM_TIMEOUT": "3"}) == 3.0


def contract(run_id: str = "", token: str = "tok") -> ProcessContract:
    return ProcessContract(
        role="ps",
        index=0,
        job_name="j",
        spec_path="s",
        token=token,
        output_dir="o",
        bind="tcp://127.0.0.1:0",
        run_id=run_id,
    )


def test_a_process_belongs_to_its_run_id_or_without_one_to_its_jobs_token() -> None:
    assert run_identity(contract("uid-1")) == "uid-1"
    # An operator older than run ids: the job's token (a fresh Secret per job) stands in.
    assert run_identity(contract(token="a")) == run_identity(contract(token="a"))
    assert run_identity(contract(token="a")) != run_identity(contract(token="b"))


def test_under_an_executor_without_run_ids_an_older_jobs_checkpoints_are_not_restored(
    tmp_path: Path,
) -> None:
    state = ShardState(
        shard=0,
        offset=0,
        count=4,
        version=300,
        total_steps=300,
        arrays={"params": np.ones(4, np.float32), "momentum": np.zeros(4, np.float32)},
    )
    # What a trainer before run ids wrote into a shared output directory: ckpt-<v>.sgdckpt.
    Checkpointer(tmp_path, shard=0, offset=0, count=4, keep=2).save(state)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000000300.sgdckpt"]
    mine = Checkpointer(
        tmp_path, shard=0, offset=0, count=4, keep=2, run_id=run_identity(contract(token="new"))
    )
    assert mine.load_latest() is None
