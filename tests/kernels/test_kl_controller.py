"""KL controllers (Ziegler et al. 2019): closed-form updates, e clipped at ±0.2, fixed controller, state round trip."""
import math

import pytest
import torch

from fastrlhf.kernels import AdaptiveKLController, FixedKLController, adaptive_kl_coef


def test_closed_form_update():
    """β = 0.2, target 6, horizon 10000: KL 6.6 → e = 0.1; n_steps 512 → β · (1 + 0.1 · 512/10000) = 0.2 · 1.00512."""
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert ctl.value == 0.2
    new = ctl.update(6.6, 512)
    assert math.isclose(new, 0.2 * 1.00512, rel_tol=1e-12) and ctl.value == new
    new2 = ctl.update(5.4, 1000)                                   # e = −0.1 → × (1 − 0.01)
    assert math.isclose(new2, 0.2 * 1.00512 * 0.99, rel_tol=1e-12)


def test_at_target_no_change():
    ctl = AdaptiveKLController(0.05, target=3.0, horizon=100)
    assert ctl.update(3.0, 50) == 0.05


@pytest.mark.parametrize("kl, e", [(100.0, 0.2), (0.0, -0.2), (1.3, 0.2), (0.7, -0.2), (1.19, 0.19)])
def test_error_clipped_at_0_2(kl, e):
    """e = clip(KL/target − 1, −0.2, 0.2) with target 1, n_steps = horizon → β · (1 + e)."""
    assert math.isclose(adaptive_kl_coef(0.1, kl, 1.0, 64, 64), 0.1 * (1.0 + e), rel_tol=1e-12)


def test_random_against_formula():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for _ in range(50):
        beta, kl, target = (torch.rand(3, generator=g) * torch.tensor([1.0, 10.0, 5.0]) + 1e-3).tolist()
        horizon, n = float(torch.randint(1, 10000, (), generator=g)), int(torch.randint(0, 20000, (), generator=g))
        e = min(max(kl / target - 1.0, -0.2), 0.2)
        want = beta * (1.0 + e * n / horizon)
        assert math.isclose(adaptive_kl_coef(beta, kl, target, horizon, n), want, rel_tol=1e-12)


def test_tensor_kl_accepted():
    assert math.isclose(adaptive_kl_coef(0.1, torch.tensor(2.0), 1.0, 10, 10), 0.12, rel_tol=1e-7)


def test_fixed_controller_constant():
    ctl = FixedKLController(0.05)
    for kl in (0.0, 1.0, 1e3):
        assert ctl.update(kl, 128) == 0.05 and ctl.value == 0.05


def test_state_round_trip():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(10.0, 4096)
    other = AdaptiveKLController(1.0, target=1.0, horizon=1)
    other.load_state_dict(ctl.state_dict())
    assert (other.value, other.target, other.horizon) == (ctl.value, ctl.target, ctl.horizon)
    assert other.update(3.0, 100) == ctl.update(3.0, 100)
    fixed = FixedKLController(0.3)
    fixed2 = FixedKLController(0.0)
    fixed2.load_state_dict(fixed.state_dict())
    assert fixed2.value == 0.3
    with pytest.raises(ValueError):
        fixed2.load_state_dict(ctl.state_dict())                   # an adaptive state into a fixed controller


def test_validation():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, target=1.0, horizon=-5)
    with pytest.raises(ValueError, match="init_kl_coef"):
        AdaptiveKLController(-0.1, target=1.0, horizon=10)
    with pytest.raises(ValueError, match="current_kl"):
        adaptive_kl_coef(0.1, float("nan"), 1.0, 10, 1)
    with pytest.raises(ValueError, match="n_steps"):
        adaptive_kl_coef(0.1, 1.0, 1.0, 10, -1)
    with pytest.raises(ValueError, match="target"):
        adaptive_kl_coef(0.1, 1.0, -1.0, 10, 1)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, 1.0, 1).load_state_dict({"value": 0.1, "target": 1.0, "horizon": 0})
