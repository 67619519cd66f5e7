"""The staleness-aware learning-rate rules on exact numbers."""

import numpy as np
import pytest

from sgdjob.staleness import OdenaState, StalenessRule, zhang_factor
from sgdjob.update import MomentumSGD


@pytest.mark.parametrize(("tau", "factor"), [(0, 1.0), (1, 1.0), (2, 0.5), (4, 0.25), (10, 0.1)])
def test_zhangs_rule_divides_the_learning_rate_by_the_staleness(tau: int, factor: float) -> None:
    assert zhang_factor(tau) == factor
    assert StalenessRule("zhang", count=1, odena_scale=1.0).factor(np.ones(1), tau=tau) == factor


def test_odenas_rule_scales_by_the_running_mean_of_gradient_magnitudes() -> None:
    state = OdenaState(2, c=2.0)
    g1 = np.array([1.0, -3.0], np.float32)
    f1 = state.factor(g1, tau=0)
    # m = 0.1 * |g| = [0.1, 0.3]; factor = 1 / (c * (tau + 1) * (m + 1e-3))
    np.testing.assert_allclose(f1, [1 / (2 * 1 * 0.101), 1 / (2 * 1 * 0.301)], rtol=1e-6)
    g2 = np.array([2.0, 0.0], np.float32)
    f2 = state.factor(g2, tau=3)
    m2 = np.array([0.9 * 0.1 + 0.1 * 2.0, 0.9 * 0.3 + 0.0])
    np.testing.assert_allclose(f2, 1 / (2 * 4 * (m2 + 1e-3)), rtol=1e-6)


def test_odenas_step_is_alpha_g_over_c_tau_plus_one_m_plus_eps() -> None:
    rule = StalenessRule("odena", count=3, odena_scale=1.5)
    opt = MomentumSGD(3, momentum=0.0, weight_decay=0.0)
    p = np.zeros(3, np.float32)
    g = np.array([0.5, -0.2, 0.0], np.float32)
    opt.apply(p, g, lr=0.1, scale=rule.factor(g, tau=2))
    m = 0.1 * np.abs(g)
    np.testing.assert_allclose(p, -0.1 * g / (1.5 * 3 * (m + 1e-3)), rtol=1e-6)


def test_the_none_rule_keeps_the_plain_learning_rate() -> None:
    assert StalenessRule("none", count=1, odena_scale=1.0).factor(np.ones(1), tau=9) == 1.0


def test_momentum_sgd_matches_torch_sgd() -> None:
    import torch

    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(50).astype(np.float32)
    grads = [rng.standard_normal(50).astype(np.float32) for _ in range(5)]
    p = p0.copy()
    opt = MomentumSGD(50, momentum=0.9, weight_decay=0.01)
    for g in grads:
        opt.apply(p, g, lr=0.1)
    t = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    topt = torch.optim.SGD([t], lr=0.1, momentum=0.9, weight_decay=0.01)
    for g in grads:
        t.grad = torch.from_numpy(g)
        topt.step()
    np.testing.assert_allclose(p, t.detach().numpy(), rtol=1e-5, atol=1e-6)
