"""KL coefficient controllers for the KL penalty in the reward (docs/kernels.md, "Adaptive KL controller").

Adaptive (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2):
    e = clip(KL_observed / KL_target − 1, −0.2, 0.2);   β ← β · (1 + e · n_steps / horizon)
Host-side scalars (a tensor KL is read with ``float()``, once per PPO iteration).
"""
from __future__ import annotations

import math

_E_CLIP = 0.2  # |e| ≤ 0.2: β moves by at most 20% per ``horizon`` steps


def _finite(name: str, x, where: str) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{where}: {name} must be a real number or 1-element tensor, got {type(x).__name__}") from None
    if not math.isfinite(x):
        raise ValueError(f"{where}: {name} must be finite, got {x}")
    return x


def _check_schedule(target, horizon, where: str):
    target = _finite("target", target, where)
    horizon = _finite("horizon", horizon, where)
    if target <= 0:
        raise ValueError(f"{where}: target must be > 0, got {target}")
    if horizon <= 0:
        raise ValueError(f"{where}: horizon must be > 0, got {horizon}")
    return target, horizon


def adaptive_kl_coef(kl_coef: float, current_kl, target: float, horizon: float, n_steps: int) -> float:
    """β after one adaptive update (pure function).

    kl_coef: current β ≥ 0; current_kl: observed KL (float or 1-element tensor); target: KL_target > 0;
    horizon: > 0 (in the same unit as n_steps, e.g. samples); n_steps ≥ 0 (samples / steps since the last update).
    """
    where = "adaptive_kl_coef"
    kl_coef = _finite("kl_coef", kl_coef, where)
    if kl_coef < 0:
        raise ValueError(f"{where}: kl_coef must be >= 0, got {kl_coef}")
    target, horizon = _check_schedule(target, horizon, where)
    current_kl = _finite("current_kl", current_kl, where)
    n_steps = _finite("n_steps", n_steps, where)
    if n_steps < 0:
        raise ValueError(f"{where}: n_steps must be >= 0, got {n_steps}")
    e = min(max(current_kl / target - 1.0, -_E_CLIP), _E_CLIP)        # e = clip(KL / target − 1, −0.2, 0.2)
    return kl_coef * (1.0 + e * n_steps / horizon)                     # β ← β (1 + e n_steps / horizon)


class AdaptiveKLController:
    """Adaptive β (Ziegler et al. 2019). ``.value`` is β; ``.update(current_kl, n_steps)`` moves it to the target."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        where = "AdaptiveKLController"
        init_kl_coef = _finite("init_kl_coef", init_kl_coef, where)
        if init_kl_coef < 0:
            raise ValueError(f"{where}: init_kl_coef must be >= 0, got {init_kl_coef}")
        self.target, self.horizon = _check_schedule(target, horizon, where)
        self.value = init_kl_coef

    def update(self, current_kl, n_steps: int) -> float:
        """β ← β (1 + clip(KL / target − 1, ±0.2) · n_steps / horizon). Returns the new β."""
        self.value = adaptive_kl_coef(self.value, current_kl, self.target, self.horizon, n_steps)
        return self.value

    def state_dict(self) -> dict:
        return {"kind": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        where = "AdaptiveKLController.load_state_dict"
        missing = {"value", "target", "horizon"} - set(state)
        if missing or state.get("kind", "adaptive") != "adaptive":
            raise ValueError(f"{where}: expected an adaptive controller state with value/target/horizon, got {state!r}")
        self.target, self.horizon = _check_schedule(state["target"], state["horizon"], where)
        value = _finite("value", state["value"], where)
        if value < 0:
            raise ValueError(f"{where}: value must be >= 0, got {value}")
        self.value = value

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value:g}, target={self.target:g}, horizon={self.horizon:g})"


class FixedKLController:
    """Constant β with the controller interface (``update`` leaves it unchanged)."""

    def __init__(self, kl_coef: float):
        kl_coef = _finite("kl_coef", kl_coef, "FixedKLController")
        if kl_coef < 0:
            raise ValueError(f"FixedKLController: kl_coef must be >= 0, got {kl_coef}")
        self.value = kl_coef

    def update(self, current_kl, n_steps: int) -> float:
        """No change (arguments checked for the same errors as the adaptive controller). Returns β."""
        _finite("current_kl", current_kl, "FixedKLController.update")
        if _finite("n_steps", n_steps, "FixedKLController.update") < 0:
            raise ValueError(f"FixedKLController.update: n_steps must be >= 0, got {n_steps}")
        return self.value

    def state_dict(self) -> dict:
        return {"kind": "fixed", "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        if "value" not in state or state.get("kind", "fixed") != "fixed":
            raise ValueError(f"FixedKLController.load_state_dict: expected a fixed controller state, got {state!r}")
        value = _finite("value", state["value"], "FixedKLController.load_state_dict")
        if value < 0:
            raise ValueError(f"FixedKLController.load_state_dict: value must be >= 0, got {value}")
        self.value = value

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value:g})"
