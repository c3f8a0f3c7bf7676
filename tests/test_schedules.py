"""Noise schedules alpha_bar(t) (and the learned gamma(t)), checked against independent
computations; what the label diffusion derives from them is tested in test_diffusion.py."""

from __future__ import annotations

import math

import pytest
import torch

from noprop_exp.schedules import (
    CosineSchedule,
    LearnedSchedule,
    LinearSchedule,
    NoiseSchedule,
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


@pytest.mark.parametrize("name", SCHEDULES)
def test_direction_and_range(name):
    schedule = SCHEDULES[name]
    with torch.no_grad():
        fine = schedule.alpha_bar(torch.linspace(0, 1, 1001))
    assert ((fine > 0) & (fine < 1)).all()
    assert (fine[1:] >= fine[:-1]).all()  # non-decreasing (cosine is clamped near t = 0)


@pytest.mark.parametrize("name", SCHEDULES)
def test_alpha_bar_prime_matches_finite_differences(name):
    schedule = SCHEDULES[name]
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)  # away from cosine's clamp at t<0.01
    h = 1e-6
    with torch.no_grad():
        fd_ab = (schedule.alpha_bar(t + h) - schedule.alpha_bar(t - h)) / (2 * h)
        ab_prime = schedule.alpha_bar_prime(t)
    torch.testing.assert_close(ab_prime, fd_ab, rtol=1e-6, atol=1e-8)


def test_derivative_keeps_shape():
    for schedule in SCHEDULES.values():
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
    assert (gamma[1:] < gamma[:-1]).all()
    torch.testing.assert_close(gamma[0], schedule.gamma_1.detach().double())
    torch.testing.assert_close(gamma[-1], schedule.gamma_0.detach().double())


def test_learned_initial_endpoints_and_links():
    schedule = LearnedSchedule(gamma_0=-5.0, gamma_1=6.0)
    t = torch.linspace(0, 1, 11)
    with torch.no_grad():
        gamma = schedule.gamma(t)
        ab = schedule.alpha_bar(t)
    assert gamma[0].item() == pytest.approx(6.0, abs=1e-5)
    assert gamma[-1].item() == pytest.approx(-5.0, abs=1e-5)
    torch.testing.assert_close(ab, 1 / (1 + torch.exp(gamma)))


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


def test_the_learned_schedule_keeps_full_precision_under_bf16_autocast():
    from noprop_exp.diffusion import snr_prime

    schedule = randomised_learned(3)
    t = torch.rand(257)
    expected = snr_prime(schedule, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = snr_prime(schedule, t)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, expected, rtol=1e-6, atol=0)
