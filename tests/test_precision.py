"""Mixed precision: autocast on the worker's device, the fp16 loss scaler, clipping."""

from __future__ import annotations

import torch
from torch import nn

from sgdjob.precision import LossScaler, Precision, clip_grad_norm_


def test_bf16_autocast_runs_matmuls_in_bf16_and_float32_does_not() -> None:
    lin = nn.Linear(4, 4)
    with Precision("bf16", torch.device("cpu")).autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    with Precision("float32", torch.device("cpu")).autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.float32
    assert Precision("fp16", torch.device("cpu")).scaler is not None
    assert Precision("bf16", torch.device("cpu")).scaler is None


def test_the_loss_scaler_unscales_and_backs_off_on_overflow() -> None:
    s = LossScaler(init_scale=8.0, growth_interval=2)
    g = torch.tensor([8.0, 16.0])
    assert s.unscale_(g) and g.tolist() == [1.0, 2.0]
    bad = torch.tensor([1.0, float("inf")])
    assert not s.unscale_(bad) and bad.tolist() == [0.0, 0.0] and s.scale == 4.0
    s.unscale_(torch.ones(1))
    s.unscale_(torch.ones(1))
    assert s.scale == 8.0  # grown again after growth_interval finite steps


def test_clipping_matches_torchs_clip_grad_norm() -> None:
    ps = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))]
    grads = torch.tensor([3.0, 4.0, 0.0, 12.0, 0.0])
    ps[0].grad, ps[1].grad = grads[:3].clone(), grads[3:].clone()
    nn.utils.clip_grad_norm_(ps, 2.0)
    flat = grads.clone()
    assert clip_grad_norm_(flat, 2.0) == 13.0
    torch.testing.assert_close(flat, torch.cat([ps[0].grad, ps[1].grad]))
