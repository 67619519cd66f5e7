"""Bucketed pushes during backward: bucket layout, hook order, unused parameters, fallbacks,
and a real sync run that ends bit for bit where pushing after backward ends."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from sgdjob.api.validation import parse_job
from sgdjob.models import FlatModel
from sgdjob.overlap import MIB, OverlapPusher, build_buckets, fallback_reason
from sgdjob.precision import Precision
from sgdjob.tasks import load_task
from sgdjob.worker import compute_gradient
from tests.conftest import job_doc


class FakeClient:
    """Records each pushed range and what backward had computed when it went out."""

    def __init__(self, flat: FlatModel, watch: torch.Tensor) -> None:
        self.flat, self.watch = flat, watch
        self.pushes: list[tuple[int, int, bool]] = []

    def push_range(
        self, grads: np.ndarray, start: int, end: int, *, versions: list[int], step: int
    ) -> None:
        assert versions == [3] and step == 5
        assert grads is not None
        self.pushes.append((start, end, bool(self.watch.grad.abs().sum() > 0)))  # type: ignore[union-attr]


def net(*, bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, 16), nn.ReLU()]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)]
    return nn.Sequential(*layers)


class Spare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = net()
        self.spare = nn.Linear(4, 4)  # registered, never called in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def step(model: nn.Module, *, cap_bytes: int = 300) -> tuple[FlatModel, FakeClient, OverlapPusher]:
    flat = FlatModel(model, torch.device("cpu"))
    first = flat.trainable_params[0]  # the first layer: backward reaches it last
    client = FakeClient(flat, first)
    pusher = OverlapPusher(flat, client, host_grads=flat.grads, bucket_mb=cap_bytes / MIB)  # type: ignore[arg-type]
    pusher.arm(versions=[3], step=5)
    task = load_task(parse_job(job_doc()).spec.training)
    x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
    compute_gradient(
        flat, task, Precision("float32", torch.device("cpu")), x, y, clip=None, overlap=pusher
    )
    return flat, client, pusher


def test_buckets_run_backwards_over_whole_parameters_and_a_big_one_stands_alone() -> None:
    got = build_buckets([3, 2, 10, 1, 1], cap_bytes=4 * 4)
    # 4 elements a bucket: the last two parameters share one, the 10-element one stands alone,
    # and the first two (2 + 3 elements) do not fit together.
    assert got == [(15, 17, [4, 3]), (5, 15, [2]), (3, 5, [1]), (0, 3, [0])]
    assert build_buckets([5, 5], cap_bytes=1 << 20) == [(0, 10, [1, 0])]


def test_the_first_bucket_is_pushed_before_backward_reaches_the_first_layer() -> None:
    _, client, pusher = step(net())
    assert len(pusher.buckets) > 2
    first_start, _, first_done = client.pushes[0]
    assert first_start > 0 and not first_done  # the last layer's bucket left first
    assert client.pushes[-1][0] == 0 and client.pushes[-1][2]
    assert pusher.sent == list(range(len(pusher.buckets)))  # in reverse parameter order


def test_the_pushed_ranges_cover_the_gradient_once_buffers_first() -> None:
    flat, client, _ = step(net(bn=True))
    assert flat.size > flat.trainable
    assert client.pushes[0][:2] == (flat.trainable, flat.size)  # right after forward
    covered = np.zeros(flat.size, int)
    for a, b, _ in client.pushes:
        covered[a:b] += 1
    assert (covered == 1).all()


def test_a_parameter_without_a_gradient_does_not_hold_its_bucket_back() -> None:
    flat, client, pusher = step(Spare(), cap_bytes=1 << 20)
    assert len(pusher.buckets) == 1
    assert [(a, b) for a, b, _ in client.pushes] == [(0, flat.trainable)]
    assert pusher.versions is None  # disarmed: a stray hook does nothing


@pytest.mark.parametrize(
    ("training", "compression", "why"),
    [
        ({"bucketMB": 0}, {}, "bucketMB is 0"),
        ({"gradClipNorm": 1.0}, {}, "gradClipNorm"),
        ({"mode": "downpour"}, {}, "downpour"),
        ({}, {"kind": "onebit"}, "1-bit"),
    ],
)
def test_jobs_whose_buckets_are_not_final_in_the_hook_push_after_backward(
    training: dict[str, Any], compression: dict[str, Any], why: str
) -> None:
    spec = parse_job(job_doc(training=training, compression=compression)).spec
    reason = fallback_reason(spec, Precision("float32", torch.device("cpu")))
    assert reason is not None and why in reason
    assert (
        fallback_reason(parse_job(job_doc()).spec, Precision("float32", torch.device("cpu")))
        is None
    )


def test_fp16_loss_scaling_pushes_after_backward() -> None:
    p = Precision("fp16", torch.device("cpu"))
    if p.scaler is None:
        pytest.skip("no fp16 loss scaler on this device")
    assert "fp16" in (fallback_reason(parse_job(job_doc()).spec, p) or "")


def sync_doc(name: str, bucket_mb: float, **training: Any) -> dict[str, Any]:
    return job_doc(
        name,
        model={"builtin": "mlp", "hidden": [32, 32, 16]},
        parameterServers={"shards": 2},
        workers={"replicas": 2},
        training={"maxSteps": 30, "bucketMB": bucket_mb, **training},
    )


def test_a_sync_run_with_overlap_ends_bit_for_bit_on_the_parameters_of_one_without(
    run_job: Any,
) -> None:
    # 0.002 MiB buckets: several per shard slice, the first layer's weight a bucket of its own.
    _, plain = run_job(sync_doc("plain", 0), subdir="a")
    summary, over = run_job(sync_doc("over", 0.002), subdir="b")
    assert summary["version"] == 30
    m1, m2 = torch.load(plain / "model.pt"), torch.load(over / "model.pt")
    assert m1.keys() == m2.keys()
    for k in m1:
        assert torch.equal(m1[k], m2[k]), k


def test_a_clipped_run_falls_back_to_pushing_after_backward_and_ends_on_the_same_model(
    run_job: Any,
) -> None:
    # Clipping needs the whole gradient's norm, so bucketMB 25 must behave as bucketMB 0.
    _, plain = run_job(sync_doc("clip0", 0, gradClipNorm=1.0, maxSteps=20), subdir="a")
    summary, over = run_job(sync_doc("clip25", 25, gradClipNorm=1.0, maxSteps=20), subdir="b")
    assert summary["version"] == 20
    m1, m2 = torch.load(plain / "model.pt"), torch.load(over / "model.pt")
    for k in m1:
        assert torch.equal(m1[k], m2[k]), k
