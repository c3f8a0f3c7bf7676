"""Noise schedules alpha_bar(t) on t in [0, 1] (docs/NOPROP_SPEC.md §2-3).

Time runs from noise (t = 0) to label (t = 1), so alpha_bar and SNR *increase* with t; every
schedule here is built so that holds (for the learned one, for any parameter values). Subclasses
define only alpha_bar (the learned schedule also gamma, for an exact SNR); derivatives come from
autograd (`time_derivative`), so there is one place where SNR'(t) and alpha_bar'(t) are computed.
What the schedule implies for the label diffusion (SNR, q's draws, the posterior step, the
probability flow) lives in `noprop_exp/diffusion.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _as_time(t: Tensor | float) -> Tensor:
    """t as a floating tensor (python numbers and integer tensors are accepted for convenience)."""
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def time_derivative(fn: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
    """d fn/dt for an elementwise function of time, by autograd. Keeps the graph to fn's
    parameters when grad is enabled (so a learned schedule trains through it), none under
    no_grad."""
    # Read before enable_grad: at inference (no_grad) the result must not hold a graph.
    create_graph = torch.is_grad_enabled()
    t = _as_time(t)
    # Outside autocast: its backward would run the schedule's matmuls in bf16 (SNR', the CT
    # loss weight, was 0.2% off in the bf16 test); schedules are tiny, so fp32 costs nothing.
    with torch.enable_grad(), torch.autocast(t.device.type, enabled=False):
        # t is treated as a constant input; fn is elementwise, so the gradient of the sum
        # is the elementwise derivative.
        t = t.detach().requires_grad_(True)
        (derivative,) = torch.autograd.grad(fn(t).sum(), t, create_graph=create_graph)
    return derivative


class NoiseSchedule(nn.Module):
    """alpha_bar(t) for continuous t in [0,1]; time runs from noise (t=0) to label (t=1), so
    alpha_bar and SNR increase with t. All methods are elementwise and accept t of any shape."""

    def alpha_bar(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def alpha_bar_prime(self, t: Tensor) -> Tensor:
        """d alpha_bar/dt (the probability-flow ODE's rate)."""
        return time_derivative(self.alpha_bar, t)


def _check_alpha_range(alpha_min: float, alpha_max: float) -> None:
    if not 0 < alpha_min < alpha_max < 1:
        raise ValueError(
            f"noise_schedule needs 0 < alpha_min < alpha_max < 1, got alpha_min={alpha_min}, "
            f"alpha_max={alpha_max}"
        )


class CosineSchedule(NoiseSchedule):
    """Nichol & Dhariwal's cosine schedule mirrored so t=0 is noise
    (docs/NOPROP_SPEC.md §2):
    alpha_bar(t) = cos^2((1 - t + delta) / (1 + delta) * pi/2), clamped to [alpha_min, alpha_max]
    (unclamped it is exactly 0 at t=0, where SNR and the PF-ODE are undefined)."""

    def __init__(self, delta: float = 0.008, alpha_min: float = 1e-4, alpha_max: float = 0.9999):
        super().__init__()
        if delta < 0:
            raise ValueError(f"noise_schedule.delta must be >= 0, got {delta}")
        _check_alpha_range(alpha_min, alpha_max)
        self.delta, self.alpha_min, self.alpha_max = delta, alpha_min, alpha_max

    def alpha_bar(self, t: Tensor) -> Tensor:
        angle = (1 - _as_time(t) + self.delta) / (1 + self.delta) * (math.pi / 2)
        return torch.cos(angle).square().clamp(self.alpha_min, self.alpha_max)

    def extra_repr(self) -> str:
        return f"delta={self.delta}, alpha_min={self.alpha_min}, alpha_max={self.alpha_max}"


class LinearSchedule(NoiseSchedule):
    """alpha_bar linear in t, from alpha_min at t=0 to alpha_max at t=1 (a cheap ablation)."""

    def __init__(self, alpha_min: float = 1e-4, alpha_max: float = 0.9999):
        super().__init__()
        _check_alpha_range(alpha_min, alpha_max)
        self.alpha_min, self.alpha_max = alpha_min, alpha_max

    def alpha_bar(self, t: Tensor) -> Tensor:
        return self.alpha_min + (self.alpha_max - self.alpha_min) * _as_time(t)

    def extra_repr(self) -> str:
        return f"alpha_min={self.alpha_min}, alpha_max={self.alpha_max}"


def _inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class LearnedSchedule(NoiseSchedule):
    """The learned schedule of Variational Diffusion Models, in this project's direction
    (docs/NOPROP_SPEC.md §3).

    gamma_tilde(t) = softplus(s) t + softplus(W2) sigmoid(softplus(W1) t + b1) / hidden is a
    two-layer net with positive weights plus VDM's linear skip (which keeps
    gamma_tilde(1) - gamma_tilde(0) > 0, so the normalisation below never divides by ~0);
    gamma_bar = (gamma_tilde(t) - gamma_tilde(0)) / (gamma_tilde(1) - gamma_tilde(0)) in [0, 1];
    gamma(t) = gamma_0 + (gamma_1 - gamma_0) (1 - gamma_bar(t)), alpha_bar = sigmoid(-gamma),
    SNR = exp(-gamma).

    (ours) gamma_1 is stored as gamma_0 + softplus(raw gap), so gamma_1 > gamma_0 for every
    parameter value: gamma then decreases in t and SNR'(t) >= 0, which the CT loss weight needs
    (a negative weight would turn its descent into ascent). Both endpoints stay trainable; read
    them as `schedule.gamma_0` and `schedule.gamma_1`. At initialisation gamma is close to
    linear in t (log-SNR from -gamma_1 to -gamma_0).
    """

    def __init__(self, gamma_0: float = -7.0, gamma_1: float = 7.0, hidden: int = 64):
        super().__init__()
        if not gamma_0 < gamma_1:
            raise ValueError(
                "noise_schedule needs gamma_0 < gamma_1 (gamma(1) = gamma_0 is the low-noise end "
                f"at the label), got gamma_0={gamma_0}, gamma_1={gamma_1}"
            )
        if hidden < 1:
            raise ValueError(f"noise_schedule.hidden must be >= 1, got {hidden}")
        self.gamma_0 = nn.Parameter(torch.tensor(float(gamma_0)))
        self.gap_raw = nn.Parameter(torch.tensor(_inverse_softplus(gamma_1 - gamma_0)))
        self.skip_raw = nn.Parameter(torch.zeros(()))
        # Raw weights pass through softplus; nn.Linear's uniform(-1, 1) init for fan-in 1.
        self.w1_raw = nn.Parameter(torch.empty(hidden, 1).uniform_(-1, 1))
        self.b1 = nn.Parameter(torch.empty(hidden).uniform_(-1, 1))
        self.w2_raw = nn.Parameter(torch.empty(1, hidden).uniform_(-1, 1))

    @property
    def gamma_1(self) -> Tensor:
        return self.gamma_0 + F.softplus(self.gap_raw)

    def _gamma_tilde(self, t: Tensor) -> Tensor:
        """The monotone net on a column (n, 1) of times -> (n,), in t's dtype."""
        w1, b1, w2, skip = (
            p.to(t.dtype) for p in (self.w1_raw, self.b1, self.w2_raw, self.skip_raw)
        )
        hidden = torch.sigmoid(F.linear(t, F.softplus(w1), b1))
        nonlinear = F.linear(hidden, F.softplus(w2)) / w2.shape[1]
        return (F.softplus(skip) * t + nonlinear).squeeze(-1)

    def gamma(self, t: Tensor) -> Tensor:
        """gamma(t), decreasing from gamma_1 at t=0 to gamma_0 at t=1; SNR = exp(-gamma)."""
        t = _as_time(t)
        # float64 t (tests, stiff solves) computes in float64, otherwise in the params' dtype.
        dtype = torch.promote_types(t.dtype, self.gamma_0.dtype)
        device = self.gamma_0.device
        times = t.to(device=device, dtype=dtype).reshape(-1, 1)
        ends = torch.arange(2, device=device, dtype=dtype).reshape(-1, 1)  # t = 0 and t = 1
        with torch.autocast(device.type, enabled=False):  # see time_derivative
            tilde = self._gamma_tilde(torch.cat([times, ends]))
        gamma_bar = (tilde[:-2] - tilde[-2]) / (tilde[-1] - tilde[-2])
        gap = F.softplus(self.gap_raw.to(dtype))  # gamma_1 - gamma_0
        return (self.gamma_0.to(dtype) + gap * (1 - gamma_bar)).reshape(t.shape)

    def alpha_bar(self, t: Tensor) -> Tensor:
        return torch.sigmoid(-self.gamma(t))
