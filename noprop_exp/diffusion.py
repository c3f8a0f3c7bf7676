"""The label diffusion: q(z_t | y) and everything derived from it (docs/NOPROP_SPEC.md §1-3).

Time runs from noise (t = 0) to the label (t = 1); z_t ~ q(z_t | y) = N(sqrt(ab(t)) u_y,
(1 - ab(t)) I), with ab = alpha_bar the noise schedule's (`schedules.py` holds the schedules:
alpha_bar(t), the learned one's gamma(t), and their time derivatives). Here: the time grid and
time sampling, q's draws, the KL to the prior, SNR and SNR', the posterior step of NoProp-DT and
the probability-flow velocity of NoProp-CT. Solvers (`solvers.py`) only integrate what this
module gives them; the methods (`variants/`) build their losses from it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from noprop_exp.schedules import LearnedSchedule, NoiseSchedule, time_derivative

Field = Callable[[Tensor, Tensor], Tensor]


def time_grid(
    num_steps: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """t_k = k / num_steps for k = 0..num_steps: the grid shared by DT blocks and all solvers."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"the number of steps must be an integer >= 1, got {num_steps!r}")
    return torch.arange(num_steps + 1, device=device, dtype=dtype or torch.float32) / num_steps


def log_snr(alpha_bar: Tensor) -> Tensor:
    """log SNR = log(alpha_bar / (1 - alpha_bar)), from alpha_bar (any schedule)."""
    return torch.log(alpha_bar) - torch.log1p(-alpha_bar)


# Points on which an increasing function of t is inverted (linear interpolation between them).
_INVERSION_POINTS = 4097


def invert_increasing(fine_t: Tensor, values: Tensor, targets: Tensor) -> Tensor:
    """t at which a non-decreasing function, known as `values` at `fine_t`, takes each target
    value (within its range), by linear interpolation; on the device, without a host sync."""
    right = torch.searchsorted(values, targets.contiguous()).clamp(1, len(values) - 1)
    left = right - 1
    span = values[right] - values[left]  # 0 where a clamped schedule is flat
    weight = torch.where(span > 0, (targets - values[left]) / span, 0.0).clamp(0, 1)
    return fine_t[left] + weight * (fine_t[right] - fine_t[left])


def log_snr_grid(
    alpha_bar: Callable[[Tensor], Tensor],
    num_steps: int,
    t_min: float,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """A grid t_0 = 0 < t_1 < ... < t_N = 1 whose inner points are evenly spaced in log-SNR over
    [log SNR(t_min), log SNR(1 - t_min)] (t_k at the fraction k/N of that range).

    What exponential integrators step in: with t evenly spaced, a cosine or linear schedule
    crams most of its log-SNR range into the first and last steps. The ends are left out of the
    range because log-SNR is infinite where alpha_bar is 0 or 1 (cosine at both ends); the grid
    still starts at the noise (t = 0) and ends at the label (t = 1). log SNR(t) is evaluated on
    a fine grid and inverted by interpolation, on the device, without a host sync.
    """
    time_grid(num_steps)  # the same check of num_steps
    dtype = dtype or torch.float32
    fine = torch.linspace(t_min, 1 - t_min, _INVERSION_POINTS, device=device, dtype=dtype)
    values = log_snr(alpha_bar(fine).to(dtype))
    fractions = torch.arange(num_steps + 1, device=device, dtype=dtype) / num_steps
    grid = invert_increasing(fine, values, values[0] + fractions * (values[-1] - values[0]))
    ends = torch.zeros_like(grid)
    ends[-1] = 1.0
    inner = (fractions > 0) & (fractions < 1)
    return torch.where(inner, grid, ends)


def discrete_alpha_bars(schedule: NoiseSchedule, num_steps: int) -> Tensor:
    """alpha_bar at t_k = k/num_steps, k = 0..num_steps (length num_steps+1), on the device of
    the schedule's parameters (CPU for the fixed schedules, which have none)."""
    param = next(schedule.parameters(), None)
    return schedule.alpha_bar(time_grid(num_steps, None if param is None else param.device))


def broadcast_time(t: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-example (B,) tensor so it broadcasts against z of any shape."""
    return t.view(-1, *([1] * (like.dim() - 1)))


TIME_SAMPLINGS = ("uniform", "stratified", "importance")


def sample_times(
    batch: int, mode: str, device: torch.device, schedule: NoiseSchedule | None = None
) -> Tensor:
    """Training times t in [0, 1), one per example (continuous-time variants,
    docs/NOPROP_SPEC.md §3-4).

    `uniform`: i.i.d. U[0, 1], as in the paper. `stratified`: the low-discrepancy sampler of
    Variational Diffusion Models, t_i = (u + i / B) mod 1 with one u ~ U[0, 1]: each t_i is still
    U[0, 1], so the loss stays unbiased, but a minibatch covers [0, 1] evenly, which lowers the
    variance of its loss when the weight (SNR'(t) in CT) varies by orders of magnitude.
    `importance`: t drawn with density SNR'(t) / (SNR(1) - SNR(0)) (VDM's importance sampling of
    the SNR'-weighted loss), which needs the `schedule`; a loss then divides by that density.
    """
    if mode == "uniform":
        return torch.rand(batch, device=device)
    if mode == "stratified":
        offsets = torch.arange(batch, device=device) / batch
        return (torch.rand(1, device=device) + offsets) % 1
    if mode == "importance":
        if schedule is None:
            raise ValueError("variant.method.t_sampling=importance needs a noise schedule")
        with torch.no_grad():  # where t lies is drawn, not trained
            fine = torch.linspace(0, 1, _INVERSION_POINTS, device=device)
            snrs = snr(schedule, fine).float()
            u = torch.rand(batch, device=device)
            return invert_increasing(fine, snrs, snrs[0] + u * (snrs[-1] - snrs[0]))
    raise ValueError(f"variant.method.t_sampling must be one of {TIME_SAMPLINGS}, got {mode!r}")


def snr_range(schedule: NoiseSchedule, device: torch.device) -> Tensor:
    """SNR(1) - SNR(0): the integral of SNR' over [0, 1], the normaliser of `importance` t."""
    ends = snr(schedule, torch.tensor([0.0, 1.0], device=device))
    return ends[1] - ends[0]


def sample_q(
    u_y: Tensor,
    alpha_bar: Tensor,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """z ~ q(z | y) = N(sqrt(alpha_bar) u_y, (1 - alpha_bar) I); alpha_bar broadcasts over z.
    `noise`: the standard normal draw, when the caller has drawn it already."""
    if noise is None:
        noise = torch.randn(u_y.shape, device=u_y.device, dtype=u_y.dtype, generator=generator)
    return alpha_bar.sqrt() * u_y + (1 - alpha_bar).sqrt() * noise


def kl_to_prior(u_y: Tensor, alpha_bar_0: Tensor) -> Tensor:
    """KL(q(z_0 | y) || N(0, I)) per example (docs/NOPROP_SPEC.md §2); constant for one-hot
    embeddings."""
    dim = u_y[0].numel()
    sq_norm = u_y.flatten(1).pow(2).sum(1)
    return 0.5 * (alpha_bar_0 * sq_norm - dim * alpha_bar_0 - dim * torch.log1p(-alpha_bar_0))


def snr(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """SNR(t) = alpha_bar / (1 - alpha_bar), increasing in t; elementwise in t of any shape."""
    if isinstance(schedule, LearnedSchedule):
        # exp(-gamma) is exact where 1 - alpha_bar would round to 0 (gamma_0 = -7 and below).
        return torch.exp(-schedule.gamma(t))
    ab = schedule.alpha_bar(t)
    return ab / (1 - ab)


def snr_prime(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """d SNR/dt. Keeps the graph to the schedule's parameters when grad is enabled, so a
    learned schedule is trained through the CT loss weight SNR'(t)."""
    return time_derivative(lambda s: snr(schedule, s), t)


def posterior_coefficients(
    alpha_bar_prev: Tensor, alpha_bar_next: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(a, b, c) of q(z_t | z_{t-1}, y) = N(a u_y + b z_{t-1}, c I), docs/NOPROP_SPEC.md §2, with
    alpha_{t-1} = alpha_bar_{t-1}/alpha_bar_t. Elementwise, so whole grids work at once.

    Needs alpha_bar_prev <= alpha_bar_next < 1; where they are equal (e.g. in a clamped end of
    the cosine schedule) the step is the identity: a = 0, b = 1, c = 0.
    """
    alpha = alpha_bar_prev / alpha_bar_next
    denominator = 1 - alpha_bar_prev
    a = alpha_bar_next.sqrt() * (1 - alpha) / denominator
    b = alpha.sqrt() * (1 - alpha_bar_next) / denominator
    c = (1 - alpha_bar_next) * (1 - alpha) / denominator
    return a, b, c


def probability_flow(denoise: Field, schedule: NoiseSchedule) -> Field:
    """The velocity of NoProp-CT's PF-ODE (docs/NOPROP_SPEC.md §3), given a denoiser u_hat(z, t):
    dz/dt = ab'(t)/(2(1-ab(t))) * (u_hat/sqrt(ab) - z), with ab'/(1-ab) = SNR'/(1+SNR).

    Why this ODE: for a known u the path z_t = sqrt(ab) u + sqrt(1-ab) eps has
    dz/dt = ab'/(2 sqrt(ab)) u - ab'/(2 sqrt(1-ab)) eps; eliminating eps with the path itself
    gives the formula, which is linear in u, so u_hat = E[u | z_t] gives the marginal flow.
    """

    def velocity(z: Tensor, t: Tensor) -> Tensor:
        ab = schedule.alpha_bar(t)
        # ab' / (2 (1 - ab)) written as SNR' / (2 (1 + SNR)): the same rate, but 1 - ab rounds
        # to 0 near t = 1 (fp32, a learned gamma_0 below ~-16.6) where SNR stays exact.
        ratio = snr(schedule, t)
        rate = snr_prime(schedule, t) / (2 * (1 + ratio))
        return rate * (denoise(z, t) / ab.sqrt() - z)

    return velocity
