"""The shards' update rules and schedules against torch.optim and torch's schedulers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from sgdjob.api.types import TrainingSpec
from sgdjob.api.workloads import ScheduleSpec
from sgdjob.checkpoint import ShardState, decode, encode
from sgdjob.optim import AppliedUpdates, LocalUpdate, SliceOptimizer
from sgdjob.schedule import Schedule, equivalent_step

# The shards step with torch's fused kernels (sgdjob.optim.torch_optimizer): the references
# are the same optimizers, fused (equal bits), and the single-tensor ones (float rounding).
CASES: list[tuple[dict[str, Any], Any]] = [
    (  # plain SGD runs the single-tensor kernel (the faster one there); the same bits
        {"optimizer": "sgd", "momentum": 0.0},
        lambda p, **k: torch.optim.SGD(p, lr=0.1, **k),
    ),
    (
        {"optimizer": "sgd", "momentum": 0.9, "weightDecay": 0.01},
        lambda p, **k: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01, **k),
    ),
    (
        {"optimizer": "sgd", "momentum": 0.8, "nesterov": True, "weightDecay": 0.001},
        lambda p, **k: torch.optim.SGD(
            p, lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.001, **k
        ),
    ),
    (
        {"optimizer": "adam", "beta1": 0.8, "beta2": 0.99, "weightDecay": 0.01},
        lambda p, **k: torch.optim.Adam(p, lr=0.1, betas=(0.8, 0.99), weight_decay=0.01, **k),
    ),
    (
        {"optimizer": "adamw", "weightDecay": 0.1, "eps": 1e-6},
        lambda p, **k: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1, eps=1e-6, **k),
    ),
]


def spec(**kw: Any) -> TrainingSpec:
    return TrainingSpec.model_validate({"maxSteps": 10, "lr": 0.1, **kw})


@pytest.mark.parametrize(("kw", "make"), CASES, ids=lambda c: str(c)[:40])
def test_a_slice_steps_exactly_like_torch_optim_and_buffers_just_add_up(
    kw: dict[str, Any], make: Any
) -> None:
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(40).astype(np.float32)
    p = p0.copy()
    opt = SliceOptimizer(p, trainable=30, spec=spec(**kw))
    ref = torch.nn.Parameter(torch.from_numpy(p0[:30].copy()))
    single = torch.nn.Parameter(torch.from_numpy(p0[:30].copy()))
    topt, sopt = make([ref], fused=True), make([single], foreach=False)
    for _ in range(6):
        g = rng.standard_normal(40).astype(np.float32)
        opt.step(g, lr=0.1)
        for param, o in ((ref, topt), (single, sopt)):
            param.grad = torch.from_numpy(g[:30].copy())
            o.step()
        p0[30:] += g[30:]
    np.testing.assert_array_equal(p[:30], ref.detach().numpy())
    np.testing.assert_allclose(p[:30], single.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(p[30:], p0[30:])


def test_the_staleness_factor_scales_adams_rate_not_its_gradient() -> None:
    p = np.zeros(4, np.float32)
    opt = SliceOptimizer(p, trainable=4, spec=spec(optimizer="adam"))
    opt.step(np.full(4, 3.0, np.float32), lr=0.1, scale=0.25)
    # Adam's first step moves every element by lr (its normalised gradient is 1).
    np.testing.assert_allclose(p, -0.025, rtol=1e-5)
    with pytest.raises(ValueError, match="scalar"):
        opt.step(np.ones(4, np.float32), lr=0.1, scale=np.ones(4, np.float32))


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_optimizer_state_survives_a_checkpoint_and_the_run_continues_identically(
    kind: str,
) -> None:
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(20).astype(np.float32) for _ in range(8)]
    s = spec(optimizer=kind)
    p = np.zeros(20, np.float32)
    opt = SliceOptimizer(p, trainable=16, spec=s)
    for g in grads[:4]:
        opt.step(g, lr=0.1)
    state = ShardState(
        shard=0,
        offset=0,
        count=20,
        version=4,
        total_steps=8,
        arrays={"params": p, **opt.state_arrays()},
        extra=opt.state_extra(),
    )
    back = decode(encode(state), shard=0, offset=0, count=20)
    q = back.arrays["params"].copy()
    restored = SliceOptimizer(q, trainable=16, spec=s)
    restored.load_state(back.arrays, back.extra)
    for g in grads[4:]:
        opt.step(g, lr=0.1)
        restored.step(g, lr=0.1)
    np.testing.assert_array_equal(p, q)
    assert restored.steps == opt.steps


@pytest.mark.parametrize(("kw", "make"), CASES, ids=lambda c: str(c)[:40])
def test_a_workers_local_update_is_the_step_torch_optim_takes_from_its_parameters(
    kw: dict[str, Any], make: Any
) -> None:
    # compression.send: updates: the worker pushes params - params' and the shard subtracts
    # it, so one worker's run follows torch.optim on the whole vector (weight decay included).
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(40).astype(np.float32)
    worker = torch.from_numpy(p0.copy())
    shard = p0.copy()
    local = LocalUpdate(trainable=30, spec=spec(**kw))
    applied = AppliedUpdates(shard, trainable=30)
    ref = torch.nn.Parameter(torch.from_numpy(p0[:30].copy()))
    topt = make([ref])
    for _ in range(6):
        g = rng.standard_normal(40).astype(np.float32)
        grads = torch.from_numpy(g.copy())
        local.apply(worker, grads, lr=0.1)
        np.testing.assert_array_equal(grads.numpy()[30:], g[30:])  # buffers travel as they are
        applied.step(grads.numpy(), lr=123.0)  # the workers applied the rate already
        worker.copy_(torch.from_numpy(shard))  # the pull
        ref.grad = torch.from_numpy(g[:30].copy())
        topt.step()
        p0[30:] += g[30:]
    np.testing.assert_allclose(shard[:30], ref.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(shard[30:], p0[30:])


def test_applied_updates_refuse_a_staleness_factor_and_another_optimizers_checkpoint() -> None:
    applied = AppliedUpdates(np.zeros(4, np.float32), trainable=4)
    with pytest.raises(ValueError, match="staleness"):
        applied.step(np.ones(4, np.float32), lr=0.1, scale=0.5)
    adam = SliceOptimizer(np.zeros(4, np.float32), trainable=4, spec=spec(optimizer="adam"))
    with pytest.raises(ValueError, match="adam state, the job sends the workers' updates"):
        applied.load_state(adam.state_arrays(), adam.state_extra())
    with pytest.raises(ValueError, match="workers state"):
        adam.load_state(applied.state_arrays(), applied.state_extra())
    applied.load_state(applied.state_arrays(), applied.state_extra())  # its own: fine


def test_a_checkpoint_of_another_optimizer_is_refused() -> None:
    sgd = SliceOptimizer(np.zeros(4, np.float32), trainable=4, spec=spec())
    adam = SliceOptimizer(np.zeros(4, np.float32), trainable=4, spec=spec(optimizer="adam"))
    with pytest.raises(ValueError, match="sgd state"):
        adam.load_state(sgd.state_arrays(), sgd.state_extra())


def torch_lrs(make: Any, steps: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_follows_torchs_linear_then_cosine_annealing() -> None:
    from torch.optim import lr_scheduler as ls

    total, warm = 50, 8
    ours = Schedule(
        0.1, ScheduleSpec(kind="cosine", warmup_steps=warm, warmup_start_factor=0.2, min_lr=0.01)
    )
    ref = torch_lrs(
        lambda o: ls.SequentialLR(
            o,
            [
                ls.LinearLR(o, start_factor=0.2, total_iters=warm),
                ls.CosineAnnealingLR(o, T_max=total - warm, eta_min=0.01),
            ],
            milestones=[warm],
        ),
        total,
    )
    np.testing.assert_allclose([ours.lr_at(t, total_steps=total) for t in range(total)], ref)


def test_the_step_schedule_follows_torchs_step_lr() -> None:
    from torch.optim import lr_scheduler as ls

    ours = Schedule(0.1, ScheduleSpec(kind="step", step_size=7, gamma=0.5))
    ref = torch_lrs(lambda o: ls.StepLR(o, step_size=7, gamma=0.5), 30)
    np.testing.assert_allclose([ours.lr_at(t, total_steps=30) for t in range(30)], ref)


def test_an_async_shard_maps_its_version_onto_worker_steps() -> None:
    kw = {"total_steps": 100, "workers": 4, "push_every": 1}
    assert equivalent_step(37, mode="sync", **kw) == 37
    assert equivalent_step(200, mode="async", **kw) == 50
    assert equivalent_step(50, mode="downpour", total_steps=100, workers=4, push_every=2) == 25
