"""Noise schedules and the posterior step, checked against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from noprop_exp.schedules import (
    CosineSchedule,
    LearnedSchedule,
    LinearSchedule,
    NoiseSchedule,
    discrete_alpha_bars,
    posterior_coefficients,
    time_grid,
)


def make_schedules() -> dict[str, NoiseSchedule]:
    torch.manual_seed(0)
    return {
        "cosine": CosineSchedule(),
        "linear": LinearSchedule(),
        "linear_mild": LinearSchedule(alpha_min=1e-3, alpha_max=0.99),
        "learned": LearnedSchedule(),
    }


SCHEDULES = make_schedules()


def randomised_learned(seed: int) -> LearnedSchedule:
    """A learned schedule with every parameter drawn from N(0, 1)."""
    torch.manual_seed(seed)
    schedule = LearnedSchedule(hidden=16)
    with torch.no_grad():
        for param in schedule.parameters():
            param.copy_(torch.randn_like(param))
    return schedule


def gaussian_conditional(mean: torch.Tensor, cov: torch.Tensor, observed: torch.Tensor):
    """Mean and covariance of x_2 given x_1 = observed for a joint Gaussian over (x_1, x_2)
    with x_1 the first entry: the textbook Sigma_21 Sigma_11^-1 formulas."""
    s11, s12, s21, s22 = cov[:1, :1], cov[:1, 1:], cov[1:, :1], cov[1:, 1:]
    gain = s21 @ torch.linalg.inv(s11)
    return mean[1:] + gain @ (observed - mean[:1]), s22 - gain @ s12


def posterior_by_conditioning(ab_prev: torch.Tensor, ab_next: torch.Tensor) -> torch.Tensor:
    """(a, b, c) from the forward relation of spec §2, per dimension:
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
def test_direction_and_range(name):
    schedule = SCHEDULES[name]
    with torch.no_grad():
        fine = schedule.alpha_bar(torch.linspace(0, 1, 1001))
        grid = discrete_alpha_bars(schedule, 10)
        snr = schedule.snr(time_grid(10))
    assert ((fine > 0) & (fine < 1)).all()
    assert (fine[1:] >= fine[:-1]).all()  # non-decreasing (cosine is clamped near t = 0)
    assert (grid[1:] > grid[:-1]).all()
    assert (snr[1:] - snr[:-1] > 0).all(), "every DT block weight SNR(t) - SNR(t-1) must be > 0"
    torch.testing.assert_close(snr, grid / (1 - grid), rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", SCHEDULES)
def test_derivatives_match_finite_differences(name):
    schedule = SCHEDULES[name]
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)  # away from cosine's clamp at t<0.01
    h = 1e-6
    with torch.no_grad():
        fd_snr = (schedule.snr(t + h) - schedule.snr(t - h)) / (2 * h)
        fd_ab = (schedule.alpha_bar(t + h) - schedule.alpha_bar(t - h)) / (2 * h)
        snr_prime, ab_prime = schedule.snr_prime(t), schedule.alpha_bar_prime(t)
    assert snr_prime.dtype == torch.float64
    torch.testing.assert_close(snr_prime, fd_snr, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ab_prime, fd_ab, rtol=1e-6, atol=1e-8)


def test_derivative_keeps_shape():
    t = torch.rand(4, 3)
    for schedule in SCHEDULES.values():
        assert schedule.snr_prime(t).shape == (4, 3)
        assert schedule.alpha_bar_prime(torch.tensor(0.5)).shape == ()


def test_cosine_matches_spec_formula():
    delta, alpha_min, alpha_max = 0.008, 1e-4, 0.9999
    schedule = CosineSchedule(delta, alpha_min, alpha_max)
    times = [0.0, 0.003, 0.1, 0.37, 0.5, 0.9, 0.999, 1.0]
    got = schedule.alpha_bar(torch.tensor(times, dtype=torch.float64))
    for t, value in zip(times, got.tolist(), strict=True):
        raw = math.cos((1 - t + delta) / (1 + delta) * math.pi / 2) ** 2
        assert value == pytest.approx(min(max(raw, alpha_min), alpha_max), rel=1e-12)
    assert got[0] == alpha_min  # t = 0 is pure noise, held off 0 by the clamp


def test_linear_matches_formula_and_fixed_schedules_have_no_parameters():
    schedule = LinearSchedule(alpha_min=0.01, alpha_max=0.91)
    got = schedule.alpha_bar(torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([0.01, 0.235, 0.91], dtype=torch.float64))
    assert list(schedule.parameters()) == []
    assert list(CosineSchedule().parameters()) == []


@pytest.mark.parametrize("seed", range(5))
def test_learned_is_monotone_for_random_parameters(seed):
    schedule = randomised_learned(seed)
    t = torch.linspace(0, 1, 501, dtype=torch.float64)
    with torch.no_grad():
        gamma = schedule.gamma(t)
        snr_prime = schedule.snr_prime(t)
    assert (gamma[1:] < gamma[:-1]).all()
    assert (snr_prime >= 0).all()
    torch.testing.assert_close(gamma[0], schedule.gamma_1.detach().double())
    torch.testing.assert_close(gamma[-1], schedule.gamma_0.detach().double())


def test_learned_initial_endpoints_and_links():
    schedule = LearnedSchedule(gamma_0=-5.0, gamma_1=6.0)
    t = torch.linspace(0, 1, 11)
    with torch.no_grad():
        gamma = schedule.gamma(t)
        ab = schedule.alpha_bar(t)
        snr = schedule.snr(t)
    assert gamma[0].item() == pytest.approx(6.0, abs=1e-5)
    assert gamma[-1].item() == pytest.approx(-5.0, abs=1e-5)
    torch.testing.assert_close(ab, 1 / (1 + torch.exp(gamma)))
    torch.testing.assert_close(snr, ab / (1 - ab), rtol=1e-4, atol=1e-6)


def test_learned_snr_prime_trains_every_parameter():
    schedule = randomised_learned(7)
    schedule.snr_prime(torch.rand(32)).sum().backward()
    for name, param in schedule.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert torch.isfinite(param.grad).all(), name


def test_snr_prime_holds_no_graph_under_no_grad():
    with torch.no_grad():
        assert not SCHEDULES["learned"].snr_prime(torch.rand(8)).requires_grad


def test_discrete_alpha_bars_is_alpha_bar_on_the_grid():
    schedule = SCHEDULES["cosine"]
    got = discrete_alpha_bars(schedule, 4)
    expected = schedule.alpha_bar(torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="integer >= 1"):
        discrete_alpha_bars(schedule, 0)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: CosineSchedule(alpha_min=0.5, alpha_max=0.4), "alpha_min < alpha_max"),
        (lambda: LinearSchedule(alpha_max=1.0), "alpha_max < 1"),
        (lambda: CosineSchedule(delta=-0.1), "delta"),
        (lambda: LearnedSchedule(gamma_0=7.0, gamma_1=-7.0), "gamma_0 < gamma_1"),
        (lambda: LearnedSchedule(hidden=0), "hidden"),
    ],
)
def test_bad_settings_raise(build, message):
    with pytest.raises(ValueError, match=message):
        build()
