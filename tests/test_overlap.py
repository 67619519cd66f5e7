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
from sgdjob.overlap import MIB, OverlapPusher, Unit, build_buckets, fallback_reason, plan_units
from sgdjob.precision import Precision
from sgdjob.slicing import Slice, partition
from sgdjob.tasks import load_task
from sgdjob.worker import compute_gradient
from tests.conftest import job_doc


class FakeClient:
    """Records each pushed range and what backward had computed when it went out."""

    def __init__(self, flat: FlatModel, watch: torch.Tensor, shards: int = 1) -> None:
        self.flat, self.watch = flat, watch
        self.slices = partition(flat.size, shards)
        self.pushes: list[tuple[int, int, bool]] = []
        self.shards: list[int] = []

    def push_part(
        self, grads: Any, shard: int, start: int, end: int, *, version: int, step: int
    ) -> None:
        assert version == 3 and step == 5
        assert grads is not None
        self.shards.append(shard)
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


def step(
    model: nn.Module, *, cap_bytes: int = 300, shards: int = 1, align: int | None = None
) -> tuple[FlatModel, FakeClient, OverlapPusher]:
    flat = FlatModel(model, torch.device("cpu"))
    first = flat.trainable_params[0]  # the first layer: backward reaches it last
    client = FakeClient(flat, first, shards)
    pusher = OverlapPusher(
        flat,
        client,  # type: ignore[arg-type]
        host_grads=flat.grads,
        bucket_mb=cap_bytes / MIB,
        align=align,
    )
    pusher.arm(versions=[3] * shards, step=5)
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


def test_units_are_the_buckets_cut_where_the_shards_slices_meet() -> None:
    buckets = [(15, 20, [2]), (5, 15, [1]), (0, 5, [0])]
    slices = [Slice(0, 0, 12), Slice(1, 12, 10)]  # 20 trainable elements, then 2 buffers
    got = plan_units(buckets, slices, trainable=20, align=None)
    assert got == [
        Unit(0, 0, 5, (2,)),
        Unit(0, 5, 12, (1,)),
        Unit(1, 12, 15, (1,)),
        Unit(1, 15, 20, (0,)),
        Unit(1, 20, 22, ()),  # the buffers: no bucket to wait for
    ]


def test_one_bit_units_start_at_multiples_of_the_codec_bucket_from_their_slice() -> None:
    buckets = [(15, 20, [2]), (5, 15, [1]), (0, 5, [0])]
    slices = [Slice(0, 0, 12), Slice(1, 12, 10)]
    got = plan_units(buckets, slices, trainable=20, align=4)
    # Cuts 5 and 15 move up to 8 (slice 0: 0 + 2 x 4) and 16 (slice 1: 12 + 4); a unit
    # waits for every bucket it touches, and the slice's last unit ends where it ends.
    assert got == [
        Unit(0, 0, 8, (1, 2)),
        Unit(0, 8, 12, (1,)),
        Unit(1, 12, 16, (0, 1)),
        Unit(1, 16, 20, (0,)),
        Unit(1, 20, 22, ()),
    ]


@pytest.mark.parametrize("align", [None, 8, 40])
def test_every_unit_goes_out_once_after_all_its_buckets_cover_the_vector_exactly(
    align: int | None,
) -> None:
    flat, client, pusher = step(net(bn=True), cap_bytes=200, shards=3, align=align)
    assert len(client.pushes) == len(pusher.units)
    covered = np.zeros(flat.size, int)
    for shard, (a, b, _) in zip(client.shards, client.pushes, strict=True):
        s = client.slices[shard]
        assert s.offset <= a < b <= s.end
        if align is not None and a < flat.trainable:
            assert (a - s.offset) % align == 0
        covered[a:b] += 1
    assert (covered == 1).all()
    # A unit went out only once the parameters under it had their gradient, so the first
    # layer's gradient (watched) was there for every unit that reaches into it.
    first_end = flat.trainable_params[0].numel()
    for a, _, done in client.pushes:
        if a < first_end:
            assert done


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
        ({}, {"kind": "onebit", "send": "updates"}, "send: updates"),
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


ONEBIT = {"kind": "onebit", "bucketSize": 64, "errorFeedback": True, "serverToWorker": True}


@pytest.mark.parametrize("mode", ["sync", pytest.param("async", marks=pytest.mark.slow)])
def test_a_one_bit_run_with_overlap_ends_bit_for_bit_on_the_parameters_of_one_without(
    run_job: Any, mode: str
) -> None:
    # Parts encoded in the hooks, each with its range of the residual, carry the bits and
    # scales of one whole-slice encode, so sync ends on the very same model (async: one
    # worker, so its pushes apply in the same order too).
    def doc(name: str, bucket_mb: float) -> dict[str, Any]:
        d = sync_doc(name, bucket_mb, mode=mode)
        d["spec"]["compression"] = ONEBIT
        if mode == "async":
            d["spec"]["workers"]["replicas"] = 1
        return d

    _, plain = run_job(doc("plain1", 0), subdir="a")
    summary, over = run_job(doc("over1", 0.002), subdir="b")
    assert summary["version"] == 30
    assert "gradient buckets during backward" in (over / "logs" / "worker-0.log").read_text()
    assert "during backward" not in (plain / "logs" / "worker-0.log").read_text()
    m1, m2 = torch.load(plain / "model.pt"), torch.load(over / "model.pt")
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
