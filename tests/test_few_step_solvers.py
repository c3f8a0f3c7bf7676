"""Few-step solvers against the exact probability-flow path of an exact denoiser, so that any
error is the integrator's (noprop_exp/bench/solver_error.py builds both)."""

from __future__ import annotations

import math

import pytest
import torch

from noprop_exp.bench.solver_error import (
    exact_dynamics,
    initial_points,
    reference_end_point,
    schedules,
)
from noprop_exp.diffusion import log_snr_grid
from noprop_exp.schedules import CosineSchedule
from noprop_exp.solvers import DDIMSolver, DPMSolver, Dynamics, EulerSolver, HeunSolver, solve

# Fine enough for the cosine (rate ~125 near t = 1) and learned (~7) schedules: h * rate <= 0.13.
FAST_REFERENCE_STEPS = 1000


@pytest.fixture(scope="module")
def cases() -> dict[str, tuple[Dynamics, torch.Tensor, torch.Tensor]]:
    z0 = initial_points(32, 10)
    found = {}
    for name in ("cosine", "learned (init)"):
        dyn = exact_dynamics(schedules()[name], 10)
        found[name] = (dyn, z0, reference_end_point(dyn, z0, FAST_REFERENCE_STEPS))
    return found


def error(solver, case, steps: int) -> float:
    dyn, z0, reference = case
    return (solve(solver, dyn, z0, steps) - reference).abs().max().item()


def test_dpm_is_second_order_where_ddim_is_first(cases) -> None:
    case = cases["learned (init)"]
    dpm = [error(DPMSolver(), case, n) for n in (10, 20)]
    ddim = [error(DDIMSolver(), case, n) for n in (10, 20)]
    assert dpm[1] < 0.03, dpm
    assert dpm[0] < ddim[0] / 3, (dpm, ddim)


def test_exponential_integrators_stay_bounded_where_heun_blows_up(cases) -> None:
    # z_1 of the exact path lies near a one-hot row: an error above ~1.5 is a blow-up, not a
    # wrong class.
    case = cases["cosine"]
    for steps in (2, 5):
        assert error(DPMSolver(), case, steps) < 1.5
        assert error(DDIMSolver(), case, steps) < 1.5
    assert error(HeunSolver(), case, 2) > 5


def test_fresh_forgets_the_previous_solve(cases) -> None:
    dyn, z0, _ = cases["learned (init)"]
    solver = DPMSolver()
    first = solve(solver, dyn, z0, 5)
    assert torch.equal(first, solve(solver, dyn, z0, 5))


def cosine_log_snr(t: torch.Tensor) -> torch.Tensor:
    """log SNR of the spec's cosine schedule, written out: cos^2 of the mirrored angle, clamped
    to [1e-4, 0.9999]."""
    angle = (1 - t + 0.008) / 1.008 * (math.pi / 2)
    ab = torch.cos(angle).square().clamp(1e-4, 0.9999)
    return torch.log(ab / (1 - ab))


def test_the_log_snr_grid_steps_evenly_in_log_snr_from_noise_to_label():
    steps, t_min = 8, 1e-2
    grid = log_snr_grid(CosineSchedule().double().alpha_bar, steps, t_min, dtype=torch.float64)
    assert grid[0] == 0 and grid[-1] == 1 and (grid.diff() > 0).all()
    # The inner points t_1 .. t_{N-1} at k/N of [log SNR(t_min), log SNR(1 - t_min)].
    low, high = cosine_log_snr(torch.tensor([t_min, 1 - t_min], dtype=torch.float64))
    expected = low + torch.arange(1, steps, dtype=torch.float64) / steps * (high - low)
    torch.testing.assert_close(cosine_log_snr(grid[1:-1]), expected, rtol=0, atol=1e-5)


def test_on_the_log_snr_grid_dpm_is_accurate_where_uniform_t_misleads_it(cases) -> None:
    case = cases["cosine"]
    on_log_snr, on_time = (error(DPMSolver(grid=g), case, 10) for g in ("logsnr", "time"))
    assert on_log_snr < 0.05 and on_time > 10 * on_log_snr, (on_log_snr, on_time)
    assert error(DPMSolver(grid="logsnr"), case, 5) < error(DDIMSolver(), case, 5)


def test_a_log_snr_grid_without_a_noise_schedule_is_refused():
    velocity_only = Dynamics(velocity=lambda z, t: z, source="variant fm")
    with pytest.raises(ValueError, match="needs a noise schedule; variant fm has none"):
        solve(EulerSolver(grid="logsnr"), velocity_only, torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match=r"solver\.grid must be one of"):
        DPMSolver(grid="uniform")
