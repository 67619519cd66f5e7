"""Whole jobs through `sgdjob run`'s executor: real processes, real sockets, real digits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from sgdjob.api.validation import parse_job
from sgdjob.data import eval_batches, load_data, partition_for
from sgdjob.models import build_model
from sgdjob.tasks import CLASSIFICATION, evaluate
from tests.conftest import job_doc

STEPS = 80


def single_process_model(doc: dict[str, Any]) -> tuple[nn.Module, float]:
    """Plain torch SGD on one process over exactly the union of the workers' batches."""
    spec = parse_job(doc).spec
    t = spec.training
    ds = load_data(spec.data, seed=t.seed)
    model = build_model(
        spec.model, input_shape=ds.input_shape, num_classes=ds.num_classes, seed=t.seed
    )
    n = spec.workers.replicas
    parts = [
        partition_for(ds.n_train, workers=n, index=i, batch_size=t.batch_size, seed=t.seed)
        for i in range(n)
    ]
    opt = torch.optim.SGD(
        model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay
    )
    for step in range(t.max_steps or 0):
        idx = torch.from_numpy(np.concatenate([p.batch(step) for p in parts]))
        opt.zero_grad()
        x, y = ds.train.take(idx)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    batches = eval_batches(ds.test, limit=None, batch=512)
    return model, evaluate(model, CLASSIFICATION, batches, device=torch.device("cpu")).metric


# make test runs three shapes (one worker over two shards, two workers on one shard, three
# workers over two shards); the other six of the 3 x 3 grid run in make test-slow.
FAST_SHAPES = {(1, 2), (2, 1), (3, 2)}


@pytest.mark.parametrize(
    ("workers", "shards"),
    [
        pytest.param(w, s, marks=() if (w, s) in FAST_SHAPES else pytest.mark.slow)
        for w in (1, 2, 3)
        for s in (1, 2, 3)
    ],
)
def test_sync_training_matches_single_process_sgd_on_the_same_samples(
    run_job: Any, shards: int, workers: int
) -> None:
    doc = job_doc(
        f"s{shards}w{workers}",
        parameterServers={"shards": shards},
        workers={"replicas": workers},
        training={"maxSteps": STEPS},
    )
    summary, out = run_job(doc)
    model, baseline = single_process_model(doc)
    assert summary["version"] == STEPS
    # The same parameters, not just a similar accuracy: averaging the workers' mean gradients
    # is the mean over the union batch; only float rounding (summation order) differs.
    trained = torch.load(out / "model.pt")
    reference = model.state_dict()
    assert trained.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert abs(summary["finalAccuracy"] - baseline) <= 0.01
    assert baseline > 0.8  # the comparison means something only if training worked


def test_a_two_worker_sync_run_with_fixed_seeds_is_bit_for_bit_reproducible(
    run_job: Any,
) -> None:
    doc = job_doc(
        "repro",
        parameterServers={"shards": 2},
        workers={"replicas": 2},
        training={"maxSteps": 40, "weightDecay": 0.001},
    )
    _, out1 = run_job(doc, subdir="a")
    _, out2 = run_job(doc, subdir="b")
    m1, m2 = torch.load(out1 / "model.pt"), torch.load(out2 / "model.pt")
    assert m1.keys() == m2.keys()
    for k in m1:
        assert torch.equal(m1[k], m2[k]), k


def test_a_run_writes_model_metrics_and_summary(run_job: Any) -> None:
    summary, out = run_job(job_doc("files", training={"maxSteps": 30, "evalInterval": 10}))
    assert (out / "model.pt").exists()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "eval"][:3] == [0, 10, 20]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["samples"] == 30 * 32
    assert 0.0 <= summary["finalAccuracy"] <= 1.0


def test_a_failing_replica_is_named_and_every_child_is_stopped(tmp_path: Path) -> None:
    from sgdjob.launcher import LaunchError, LocalJob

    # A user data entry point that does not exist makes every worker exit at start-up.
    doc = job_doc(
        "bad-entry",
        data={"builtin": None, "entryPoint": "no_such_module:make"},
        workers={"replicas": 2},
    )
    lj = LocalJob(parse_job(doc), output=tmp_path, progress=False)
    with pytest.raises(LaunchError, match=r"(ps-0|worker-\d) failed"):
        try:
            lj.start()
            lj.wait()
        finally:
            lj.stop()
    assert all(r.proc is None or r.proc.poll() is not None for r in lj.shards + lj.workers)
