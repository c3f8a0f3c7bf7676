"""Few-step solvers against the exact probability-flow path of an exact denoiser, so that any
error is the integrator's (noprop_exp/bench/solver_error.py builds both)."""

from __future__ import annotations

import pytest
import torch

from noprop_exp.bench.solver_error import (
    exact_dynamics,
    initial_points,
    reference_end_point,
    schedules,
)
from noprop_exp.solvers import DDIMSolver, DPMSolver, Dynamics, HeunSolver, solve

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
