"""The label diffusion (noprop_exp/diffusion.py) checked against independent computations:
the posterior step by Gaussian conditioning, SNR and SNR' by finite differences, the
probability-flow velocity as the derivative of the exact noising path, time sampling in law."""

from __future__ import annotations

import math

import pytest
import torch

from noprop_exp.diffusion import (
    discrete_alpha_bars,
    posterior_coefficients,
    probability_flow,
    sample_times,
    snr,
    snr_prime,
    time_grid,
)
from noprop_exp.schedules import LearnedSchedule
from tests.test_schedules import SCHEDULES, randomised_learned
from tests.test_solvers import SCHEDULES as SOLVER_SCHEDULES
from tests.test_solvers import Oracle

F64 = torch.float64


def gaussian_conditional(mean: torch.Tensor, cov: torch.Tensor, observed: torch.Tensor):
    """Mean and covariance of x_2 given x_1 = observed for a joint Gaussian over (x_1, x_2)
    with x_1 the first entry: the textbook Sigma_21 Sigma_11^-1 formulas."""
    s11, s12, s21, s22 = cov[:1, :1], cov[:1, 1:], cov[1:, :1], cov[1:, 1:]
    gain = s21 @ torch.linalg.inv(s11)
    return mean[1:] + gain @ (observed - mean[:1]), s22 - gain @ s12


def posterior_by_conditioning(ab_prev: torch.Tensor, ab_next: torch.Tensor) -> torch.Tensor:
    """(a, b, c) from the forward relation of docs/NOPROP_SPEC.md §2, per dimension:
    z_t ~ q(z_t | y) and z_{t-1} = sqrt(alpha) z_t + sqrt(1 - alpha) e, conditioned on z_{t-1}."""
    alpha = ab_prev / ab_next
    var_t = 1 - ab_next
    cov = torch.stack(
        [
            torch.stack([alpha * var_t + 1 - alpha, alpha.sqrt() * var_t]),
            torch.stack([alpha.sqrt() * var_t, var_t]),
        ]
    )
    # The forward relation must reproduce q's marginal at t-1, else the comparison is moot.
    torch.testing.assert_close(cov[0, 0], 1 - ab_prev)

    def conditional(u: float, z_prev: float) -> tuple[torch.Tensor, torch.Tensor]:
        mean_t = ab_next.sqrt() * u
        mean = torch.stack([alpha.sqrt() * mean_t, mean_t])
        return gaussian_conditional(mean, cov, torch.tensor([z_prev], dtype=torch.float64))

    # The conditional mean is linear in (u, z_prev): read a and b off unit inputs.
    a = conditional(1.0, 0.0)[0][0]
    b = conditional(0.0, 1.0)[0][0]
    c = conditional(0.0, 0.0)[1][0, 0]
    return torch.stack([a, b, c])


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("num_steps", [3, 10, 100])
def test_posterior_coefficients_match_gaussian_conditioning(name, num_steps):
    alpha_bars = discrete_alpha_bars(SCHEDULES[name], num_steps).detach().double()
    assert (alpha_bars[1:] > alpha_bars[:-1]).all()  # every step moves, so each is checked
    for k in range(1, num_steps + 1):
        ab_prev, ab_next = alpha_bars[k - 1], alpha_bars[k]
        got = torch.stack(posterior_coefficients(ab_prev, ab_next))
        torch.testing.assert_close(got, posterior_by_conditioning(ab_prev, ab_next))


def test_posterior_coefficients_by_hand():
    # alpha_bar 0.2 -> 0.5: alpha = 0.4, 1 - alpha_bar_prev = 0.8.
    a, b, c = posterior_coefficients(torch.tensor(0.2).double(), torch.tensor(0.5).double())
    expected = [math.sqrt(0.5) * 0.6 / 0.8, math.sqrt(0.4) * 0.5 / 0.8, 0.5 * 0.6 / 0.8]
    torch.testing.assert_close(torch.stack([a, b, c]), torch.tensor(expected).double())


def test_posterior_coefficients_identity_where_alpha_bar_is_flat():
    ab = torch.tensor([1e-4, 0.9999])
    a, b, c = posterior_coefficients(ab, ab)
    torch.testing.assert_close((a, b, c), (torch.zeros(2), torch.ones(2), torch.zeros(2)))


@pytest.mark.parametrize("name", SCHEDULES)
def test_grid_and_snr_increase(name):
    schedule = SCHEDULES[name]
    with torch.no_grad():
        grid = discrete_alpha_bars(schedule, 10)
        snrs = snr(schedule, time_grid(10))
    assert (grid[1:] > grid[:-1]).all()
    assert (snrs[1:] - snrs[:-1] > 0).all(), "every DT block weight SNR(t) - SNR(t-1) must be > 0"
    torch.testing.assert_close(snrs, grid / (1 - grid), rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", SCHEDULES)
def test_snr_prime_matches_finite_differences(name):
    schedule = SCHEDULES[name]
    t = torch.linspace(0.05, 0.95, 19, dtype=F64)  # away from cosine's clamp at t<0.01
    h = 1e-6
    with torch.no_grad():
        fd_snr = (snr(schedule, t + h) - snr(schedule, t - h)) / (2 * h)
        got = snr_prime(schedule, t)
    assert got.dtype == F64
    torch.testing.assert_close(got, fd_snr, rtol=1e-6, atol=1e-8)


def test_snr_prime_keeps_shape():
    t = torch.rand(4, 3)
    for schedule in SCHEDULES.values():
        assert snr_prime(schedule, t).shape == (4, 3)


def test_learned_snr_is_exp_minus_gamma_and_the_alpha_bar_odds():
    schedule = LearnedSchedule(gamma_0=-5.0, gamma_1=6.0)
    t = torch.linspace(0, 1, 11)
    with torch.no_grad():
        gamma, ab, snrs = schedule.gamma(t), schedule.alpha_bar(t), snr(schedule, t)
    torch.testing.assert_close(snrs, torch.exp(-gamma))
    torch.testing.assert_close(snrs, ab / (1 - ab), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_learned_snr_prime_is_non_negative_for_random_parameters(seed):
    schedule = randomised_learned(seed)
    with torch.no_grad():
        assert (snr_prime(schedule, torch.linspace(0, 1, 501, dtype=F64)) >= 0).all()


def test_learned_snr_prime_trains_every_parameter():
    schedule = randomised_learned(7)
    snr_prime(schedule, torch.rand(32)).sum().backward()
    for name, param in schedule.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert torch.isfinite(param.grad).all(), name


def test_snr_prime_holds_no_graph_under_no_grad():
    with torch.no_grad():
        assert not snr_prime(SCHEDULES["learned"], torch.rand(8)).requires_grad


def test_discrete_alpha_bars_is_alpha_bar_on_the_grid():
    schedule = SCHEDULES["cosine"]
    got = discrete_alpha_bars(schedule, 4)
    expected = schedule.alpha_bar(torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="integer >= 1"):
        discrete_alpha_bars(schedule, 0)


@pytest.mark.parametrize("name", SOLVER_SCHEDULES)
def test_probability_flow_velocity_is_the_path_derivative(name):
    oracle = Oracle(SOLVER_SCHEDULES[name])
    velocity = oracle.dynamics().velocity
    h = 1e-6
    for t in (0.1, 0.5, 0.9, 0.99):
        z = oracle.path(t)
        finite_difference = (oracle.path(t + h) - oracle.path(t - h)) / (2 * h)
        got = velocity(z, torch.tensor(t, dtype=F64))
        torch.testing.assert_close(got, finite_difference, rtol=1e-5, atol=1e-6)
        # The popular shortcut dz/dt = (u - z)/(1 - ab) is a different ODE: it leaves the path.
        ab = oracle.schedule.alpha_bar(torch.tensor(t, dtype=F64)).detach()
        shortcut = (oracle.u - z) / (1 - ab)
        assert (shortcut - finite_difference).abs().max() > 0.1


@pytest.mark.parametrize("mode", ["uniform", "stratified"])
def test_each_sampled_time_is_uniform(mode):
    torch.manual_seed(0)
    draws = torch.stack([sample_times(8, mode, torch.device("cpu")) for _ in range(4000)])
    assert draws.min() >= 0 and draws.max() < 1
    for column in draws.T:  # every example's t, on its own, is U[0, 1]: mean 1/2, var 1/12
        assert abs(column.mean() - 0.5) < 0.02 and abs(column.var() - 1 / 12) < 0.006


def test_the_flow_velocity_stays_finite_at_t_1_when_alpha_bar_rounds_to_one() -> None:
    """gamma_0 = -20: alpha_bar(1) = sigmoid(20) is 1.0 in float32, 1 - alpha_bar is 0."""
    schedule = LearnedSchedule(gamma_0=-20.0, gamma_1=7.0)
    t = torch.tensor(1.0)
    assert schedule.alpha_bar(t).item() == 1.0  # the case this test is about
    u = torch.tensor([[1.0, 0.0, 0.0]])
    z = torch.tensor([[0.5, -0.2, 0.1]])
    velocity = probability_flow(lambda _z, _t: u, schedule)(z, t)
    # Independent float64 value: rate = -gamma'(1) sigmoid(-gamma(1)) / 2.
    t64 = t.double().requires_grad_(True)
    gamma = schedule.gamma(t64)
    (gamma_prime,) = torch.autograd.grad(gamma, t64)
    ab = torch.sigmoid(-gamma.detach())
    expected = -gamma_prime * ab / 2 * (u.double() / ab.sqrt() - z.double())
    assert torch.isfinite(velocity).all()
    torch.testing.assert_close(velocity.double(), expected, rtol=1e-4, atol=1e-6)
