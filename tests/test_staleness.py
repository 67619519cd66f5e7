"""The staleness-aware learning-rate rules on exact numbers."""

import numpy as np
import pytest

from sgdjob.api.types import TrainingSpec
from sgdjob.optim import SliceOptimizer
from sgdjob.staleness import OdenaState, StalenessRule, zhang_factor


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
    p = np.zeros(3, np.float32)
    opt = SliceOptimizer(p, trainable=3, spec=TrainingSpec(momentum=0.0, max_steps=1))
    g = np.array([0.5, -0.2, 0.0], np.float32)
    opt.step(g, lr=0.1, scale=rule.factor(g, tau=2))
    m = 0.1 * np.abs(g)
    np.testing.assert_allclose(p, -0.1 * g / (1.5 * 3 * (m + 1e-3)), rtol=1e-6)


def test_the_none_rule_keeps_the_plain_learning_rate() -> None:
    assert StalenessRule("none", count=1, odena_scale=1.0).factor(np.ones(1), tau=9) == 1.0
