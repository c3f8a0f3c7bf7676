"""Solvers checked against the exact noising path z_t = sqrt(ab(t)) u + sqrt(1 - ab(t)) eps.

With a denoiser that returns the true u (an oracle), that path is what every sampler should
reproduce: exactly for DDIM, in law for the posterior sampler, and as the solution of the
probability-flow ODE for Euler and Heun. float64 keeps the stiff end near t = 1 honest.
"""

from __future__ import annotations

import pytest
import torch

from noprop_exp.diffusion import probability_flow
from noprop_exp.schedules import CosineSchedule, LearnedSchedule, LinearSchedule, NoiseSchedule
from noprop_exp.solvers import DDIMSolver, Dynamics, EulerSolver, HeunSolver, PosteriorSolver, solve

F64 = torch.float64
torch.manual_seed(0)
SCHEDULES: dict[str, NoiseSchedule] = {
    "linear": LinearSchedule(alpha_min=1e-3, alpha_max=0.99),
    "learned": LearnedSchedule(),
    "cosine": CosineSchedule(),
}


class Oracle:
    """A fixed u and eps, the exact path through them, and a denoiser that returns u."""

    def __init__(self, schedule: NoiseSchedule, shape=(8, 5), dtype=F64, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.schedule = schedule
        self.u = torch.randn(shape, generator=generator, dtype=dtype)
        self.eps = torch.randn(shape, generator=generator, dtype=dtype)

    def path(self, t: torch.Tensor | float) -> torch.Tensor:
        ab = self.schedule.alpha_bar(torch.as_tensor(t, dtype=self.u.dtype)).detach()
        return ab.sqrt() * self.u + (1 - ab).sqrt() * self.eps

    def denoise(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.u.expand_as(z)

    def dynamics(self) -> Dynamics:
        """NoProp-CT's dynamics for the oracle: its denoiser and PF-ODE velocity."""
        return Dynamics(
            velocity=probability_flow(self.denoise, self.schedule),
            denoise=self.denoise,
            alpha_bar=self.schedule.alpha_bar,
        )

    def max_path_error(self, solver, num_steps: int) -> float:
        """Largest distance to the exact path over all grid points of one solve."""
        errors = []

        def record(k: int, t: torch.Tensor, z: torch.Tensor) -> None:
            errors.append((z - self.path(t)).abs().max())

        with torch.no_grad():
            solve(solver, self.dynamics(), self.path(0.0), num_steps, on_step=record)
        assert len(errors) == num_steps
        return torch.stack(errors).max().item()


def test_euler_and_heun_converge_at_their_orders():
    oracle = Oracle(SCHEDULES["learned"])  # smooth in t, so both are in their asymptotic regime
    euler = [oracle.max_path_error(EulerSolver(), n) for n in (100, 200)]
    heun = [oracle.max_path_error(HeunSolver(), n) for n in (100, 200)]
    assert heun[0] < euler[0] / 20
    # Halving the step halves Euler's error (first order) and quarters Heun's (second order).
    assert 1.8 < euler[0] / euler[1] < 2.2
    assert 3.6 < heun[0] / heun[1] < 4.4


@pytest.mark.parametrize("name", ["linear", "cosine"])  # learned: see the test above
def test_euler_and_heun_track_the_path_with_many_steps(name):
    # linear is the stiffest (rate ~50 at t = 1, and sqrt(ab) ~ sqrt(t) near t = 0); cosine has
    # its clamp's kink near t = 0.006: Heun's lead over Euler is smaller there, but still clear.
    oracle = Oracle(SCHEDULES[name])
    euler = oracle.max_path_error(EulerSolver(), 1000)
    heun = oracle.max_path_error(HeunSolver(), 1000)
    assert euler < 0.05
    assert heun < 3e-3
    assert heun < euler / 4


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("num_steps", [1, 3, 10])
def test_ddim_with_the_true_label_is_exact_at_any_step_count(name, num_steps):
    assert Oracle(SCHEDULES[name]).max_path_error(DDIMSolver(), num_steps) < 1e-10


def test_posterior_samples_have_q_marginals_and_end_at_the_label():
    schedule = SCHEDULES["cosine"]
    samples, dim = 20000, 3
    u = torch.tensor([1.0, -0.5, 0.0], dtype=F64)
    generator = torch.Generator().manual_seed(1)
    ab = schedule.alpha_bar(torch.linspace(0, 1, 11, dtype=F64))
    z0 = ab[0].sqrt() * u + (1 - ab[0]).sqrt() * torch.randn(
        samples, dim, generator=generator, dtype=F64
    )
    dynamics = Dynamics(denoise=lambda z, t: u.expand_as(z), alpha_bar=schedule.alpha_bar)
    moments = {}

    def record(k: int, t: torch.Tensor, z: torch.Tensor) -> None:
        moments[k] = (z.mean(0), z.var(0))

    z1 = solve(PosteriorSolver(), dynamics, z0, 10, generator, record)
    for k, (mean, var) in moments.items():
        # Standard errors are ~0.007 (mean) and ~0.01 (variance) with 20000 samples.
        torch.testing.assert_close(mean, ab[k].sqrt() * u, rtol=0, atol=0.03)
        torch.testing.assert_close(var, (1 - ab[k]).expand(dim), rtol=0, atol=0.04)
    assert (z1 - u).abs().mean() < 0.02  # alpha_bar(1) = 0.99984: noise std ~0.013


def test_deterministic_posterior_uses_no_noise_and_ends_at_the_label():
    oracle = Oracle(SCHEDULES["learned"])
    dynamics = oracle.dynamics()
    z0 = oracle.path(0.0)
    runs = [
        solve(
            PosteriorSolver(deterministic=True), dynamics, z0, 20, torch.Generator().manual_seed(s)
        )
        for s in (0, 1)
    ]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    # Its last step leaves b * z_{N-1} with b ~ 0.03 here: close to sqrt(ab(1)) u, not exact.
    assert (runs[0] - oracle.u).abs().max() < 0.1


def test_stochastic_posterior_is_reproducible_from_its_generator():
    oracle = Oracle(SCHEDULES["cosine"])
    dynamics = oracle.dynamics()

    def run(seed: int) -> torch.Tensor:
        return solve(
            PosteriorSolver(), dynamics, oracle.path(0.0), 5, torch.Generator().manual_seed(seed)
        )

    torch.testing.assert_close(run(3), run(3), rtol=0, atol=0)
    assert not torch.equal(run(3), run(4))


@pytest.mark.parametrize("solver", [PosteriorSolver(), DDIMSolver(), EulerSolver(), HeunSolver()])
def test_image_shaped_latents_in_float32_under_no_grad(solver):
    oracle = Oracle(SCHEDULES["learned"], shape=(2, 1, 4, 4), dtype=torch.float32)
    with torch.no_grad():
        z1 = solve(solver, oracle.dynamics(), oracle.path(0.0), 50)
    assert z1.shape == (2, 1, 4, 4)
    assert z1.dtype == torch.float32
    assert not z1.requires_grad
    assert (z1 - oracle.path(1.0)).abs().max() < 0.2


def test_on_step_sees_every_grid_point():
    seen = []
    z0 = torch.zeros(2, 3)
    dynamics = Dynamics(velocity=lambda z, t: torch.ones_like(z))
    z1 = solve(EulerSolver(), dynamics, z0, 4, on_step=lambda k, t, z: seen.append((k, t.item())))
    assert seen == [(1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)]
    torch.testing.assert_close(z1, torch.ones(2, 3))  # dz/dt = 1 for a unit of time


def test_missing_dynamics_name_what_is_needed_and_what_fits():
    velocity_only = Dynamics(velocity=lambda z, t: z, source="variant fm")
    with pytest.raises(ValueError) as error:
        solve(PosteriorSolver(), velocity_only, torch.zeros(2, 3), 5)
    assert str(error.value) == (
        "solver 'posterior' needs a denoiser and a noise schedule; variant fm offers only a "
        "velocity: use solver=euler or solver=heun"
    )
    denoiser_only = Dynamics(denoise=lambda z, t: z, alpha_bar=SCHEDULES["cosine"].alpha_bar)
    expected = (
        r"^solver 'heun' needs a velocity; .*: use solver=posterior or solver=ddim or solver=dpm$"
    )
    with pytest.raises(ValueError, match=expected):
        solve(HeunSolver(), denoiser_only, torch.zeros(2, 3), 5)
    with pytest.raises(ValueError, match="offers nothing"):
        solve(DDIMSolver(), Dynamics(), torch.zeros(2, 3), 5)


def test_solve_rejects_a_bad_step_count():
    dynamics = Dynamics(velocity=lambda z, t: z)
    with pytest.raises(ValueError, match="integer >= 1"):
        solve(EulerSolver(), dynamics, torch.zeros(2, 3), 0)
