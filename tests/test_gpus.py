"""GPU assignment for local workers: one each, in turn, or a clear error before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from sgdjob.api.validation import parse_job
from sgdjob.gpus import GPUError, assign_gpus, visible_gpus
from sgdjob.launcher import LaunchError, LocalJob
from tests.conftest import job_doc


def test_each_worker_gets_its_own_gpu_in_turn() -> None:
    assert assign_gpus(workers=3, gpus_per_worker=1, available=["0", "1", "2", "3"]) == [
        "0",
        "1",
        "2",
    ]
    assert assign_gpus(workers=2, gpus_per_worker=0, available=[]) == [None, None]


def test_fewer_gpus_than_workers_is_an_error_naming_both_counts() -> None:
    with pytest.raises(GPUError, match=r"asks for 3 GPU\(s\).*has 2"):
        assign_gpus(workers=3, gpus_per_worker=1, available=["0", "1"])


def test_cuda_visible_devices_bounds_what_can_be_handed_out() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,5"}) == ["2", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_a_local_job_short_of_gpus_starts_no_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    job = parse_job(job_doc("gpu", workers={"replicas": 2, "gpus": 1}))
    local = LocalJob(job, output=tmp_path / "out", progress=False)
    with pytest.raises(LaunchError, match=r"spec\.workers\.gpus: .*2 GPU"):
        local.start()
    assert not local.shards and not local.workers
    assert not (tmp_path / "out" / "logs").exists()


def test_more_than_one_gpu_per_worker_is_rejected_by_the_spec() -> None:
    from sgdjob.api.validation import SpecError

    with pytest.raises(SpecError, match=r"spec\.workers\.gpus"):
        parse_job(job_doc("g", workers={"gpus": 2}))


def test_a_gpu_worker_without_cuda_stops_with_an_error_and_a_cpu_worker_uses_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from sgdjob.worker import choose_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device(parse_job(job_doc("c")).spec).type == "cpu"
    with pytest.raises(GPUError, match="no CUDA device"):
        choose_device(parse_job(job_doc("g", workers={"gpus": 1})).spec)
