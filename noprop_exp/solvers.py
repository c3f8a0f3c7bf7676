"""Samplers that carry z from noise (t = 0) to the label end (t = 1) on a grid of N steps:
t_k = k/N (`grid: time`), or evenly spaced in log-SNR (`grid: logsnr`, dpm's default; models
with a noise schedule only). NoProp-DT's chain keeps its blocks' own t_k = k/T whatever the
solver's grid.

A model hands a solver its `Dynamics`: a denoiser u_hat(z, t) with the schedule's alpha_bar
(DT, CT) and/or a velocity v(z, t) (FM, or CT through `diffusion.probability_flow`). Solvers only
integrate: the label diffusion's maths (the posterior step's coefficients, the time grid) comes
from `noprop_exp/diffusion.py`. Steps are written for a 0-dim t and z of any shape, and avoid
host syncs so long solves stay on the device.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from noprop_exp.diffusion import (
    Field,
    log_snr,
    log_snr_grid,
    posterior_coefficients,
    time_grid,
)

# How each Dynamics field is named in error messages.
_OFFERINGS = {"velocity": "a velocity", "denoise": "a denoiser", "alpha_bar": "a noise schedule"}


@dataclass
class Dynamics:
    """What a model offers to a solver. Posterior/DDIM need denoise + alpha_bar; Euler/Heun need
    velocity. `source` names the offering model in error messages (e.g. "variant fm")."""

    velocity: Field | None = None  # v(z, t) with t a 0-dim tensor
    denoise: Field | None = None  # u_hat(z, t): predicted clean embedding
    alpha_bar: Callable[[Tensor], Tensor] | None = None  # schedule's alpha_bar(t)
    source: str = "the model"

    def has(self, fields: tuple[str, ...]) -> bool:
        return all(getattr(self, field) is not None for field in fields)


GRIDS = ("time", "logsnr")


class Solver:
    """One step from t to t_next; `requires` lists the Dynamics fields the step uses.

    `grid` spaces a solve's N steps: `time`, t_k = k/N, or `logsnr`, evenly in log-SNR over
    [log SNR(grid_t_min), log SNR(1 - grid_t_min)] (`diffusion.log_snr_grid`; t_min is ours)."""

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]]

    def __init__(self, grid: str = "time", grid_t_min: float = 1e-4) -> None:
        if grid not in GRIDS:
            raise ValueError(f"solver.grid must be one of {list(GRIDS)}, got {grid!r}")
        if not 0 < grid_t_min < 0.5:
            raise ValueError(f"solver.grid_t_min must lie in (0, 0.5), got {grid_t_min}")
        self.grid, self.grid_t_min = grid, grid_t_min

    def time_grid(
        self, dyn: Dynamics, num_steps: int, device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        """t_0 = 0, ..., t_N = 1 of a solve of `num_steps` steps."""
        if self.grid == "time":
            return time_grid(num_steps, device, dtype)
        if dyn.alpha_bar is None:
            raise ValueError(
                f"solver.grid=logsnr spaces steps in log-SNR and needs a noise schedule; "
                f"{dyn.source} has none: use solver.grid=time"
            )
        return log_snr_grid(dyn.alpha_bar, num_steps, self.grid_t_min, device, dtype)

    def step(
        self,
        dyn: Dynamics,
        z: Tensor,
        t: Tensor,
        t_next: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        raise NotImplementedError

    def fresh(self) -> Solver:
        """The solver to use for one new solve from t = 0. Single-step solvers keep no state
        and return themselves; a multistep one returns a copy with an empty history."""
        return self

    def check(self, dyn: Dynamics) -> None:
        """Raise a ValueError naming what this solver needs and which solvers would fit."""
        if dyn.has(self.requires):
            return
        needs = " and ".join(_OFFERINGS[field] for field in self.requires)
        offered = [text for field, text in _OFFERINGS.items() if getattr(dyn, field) is not None]
        fitting = [cls.name for cls in SOLVERS if dyn.has(cls.requires)]
        offer = f"offers only {' and '.join(offered)}" if offered else "offers nothing"
        advice = (
            "use " + " or ".join(f"solver={name}" for name in fitting)
            if fitting
            else "give it a velocity, or a denoiser and a noise schedule"
        )
        raise ValueError(f"solver '{self.name}' needs {needs}; {dyn.source} {offer}: {advice}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(grid={self.grid!r})"


class PosteriorSolver(Solver):
    """z' = a u_hat + b z + sqrt(c) eps: a draw from q(z_t' | z_t, y = u_hat),
    docs/NOPROP_SPEC.md §2.
    With `deterministic`, eps = 0 (the posterior mean)."""

    name = "posterior"
    requires = ("denoise", "alpha_bar")

    def __init__(self, deterministic: bool = False, **grid: object) -> None:
        super().__init__(**grid)
        self.deterministic = deterministic

    def step(
        self,
        dyn: Dynamics,
        z: Tensor,
        t: Tensor,
        t_next: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        self.check(dyn)
        a, b, c = posterior_coefficients(dyn.alpha_bar(t), dyn.alpha_bar(t_next))
        z_next = a * dyn.denoise(z, t) + b * z
        if self.deterministic:
            return z_next
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        # clamp: rounding can make c a hair below 0 where alpha_bar barely moves.
        return z_next + c.clamp_min(0).sqrt() * noise

    def __repr__(self) -> str:
        return f"PosteriorSolver(deterministic={self.deterministic}, grid={self.grid!r})"


class DDIMSolver(Solver):
    """Deterministic DDIM (docs/NOPROP_SPEC.md §3): keep the implied noise eps_hat, move to
    alpha_bar(t')."""

    name = "ddim"
    requires = ("denoise", "alpha_bar")

    def step(
        self,
        dyn: Dynamics,
        z: Tensor,
        t: Tensor,
        t_next: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        self.check(dyn)
        ab, ab_next = dyn.alpha_bar(t), dyn.alpha_bar(t_next)
        u_hat = dyn.denoise(z, t)
        eps_hat = (z - ab.sqrt() * u_hat) / (1 - ab).sqrt()
        return ab_next.sqrt() * u_hat + (1 - ab_next).sqrt() * eps_hat


def _half_log_snr(alpha_bar: Tensor) -> Tensor:
    """lambda = log(alpha / sigma) with alpha = sqrt(ab), sigma = sqrt(1 - ab)."""
    return 0.5 * log_snr(alpha_bar)


class DPMSolver(Solver):
    """DPM-Solver++(2M) (Lu et al., 2022): the exponential integrator of the probability-flow
    ODE in lambda = log(alpha/sigma) for the denoiser (data-prediction) form.

    With h = lambda' - lambda, one step is z' = (sigma'/sigma) z - alpha' expm1(-h) D: the
    linear part is solved exactly, so a stiff end near t = 1 cannot make it blow up as Euler and
    Heun on the velocity do. D = u_hat on the first step (that is DDIM); later steps extrapolate
    with the previous step's prediction, D = (1 + 1/(2r)) u_hat - 1/(2r) u_hat_prev with
    r = h_prev / h (second order). One denoiser call per step. NoProp-DT's chain uses it too:
    block t is the denoiser of its own interval, so the previous block's prediction is the
    history. Multistep: `fresh()` gives each solve its own history.
    """

    name = "dpm"
    requires = ("denoise", "alpha_bar")

    def __init__(self, grid: str = "logsnr", grid_t_min: float = 1e-4) -> None:
        super().__init__(grid, grid_t_min)
        self._previous: tuple[Tensor, Tensor] | None = None  # (h, u_hat) of the last step

    def fresh(self) -> DPMSolver:
        solver = copy.copy(self)
        solver._previous = None
        return solver

    def step(
        self,
        dyn: Dynamics,
        z: Tensor,
        t: Tensor,
        t_next: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        self.check(dyn)
        ab, ab_next = dyn.alpha_bar(t), dyn.alpha_bar(t_next)
        h = _half_log_snr(ab_next) - _half_log_snr(ab)
        u_hat = dyn.denoise(z, t)
        estimate = u_hat
        if self._previous is not None:
            h_prev, u_hat_prev = self._previous
            half_over_r = h / (2 * h_prev)
            estimate = (1 + half_over_r) * u_hat - half_over_r * u_hat_prev
        self._previous = (h, u_hat)
        sigma_ratio = ((1 - ab_next) / (1 - ab)).sqrt()
        return sigma_ratio * z - ab_next.sqrt() * torch.expm1(-h) * estimate


class EulerSolver(Solver):
    """Forward Euler on dz/dt = v(z, t): first order, one velocity call per step."""

    name = "euler"
    requires = ("velocity",)

    def step(
        self,
        dyn: Dynamics,
        z: Tensor,
        t: Tensor,
        t_next: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        self.check(dyn)
        return z + (t_next - t) * dyn.velocity(z, t)


class HeunSolver(Solver):
    """Heun's method (explicit trapezoid): second order, two velocity calls per step."""

    name = "heun"
    requires = ("velocity",)

    def step(
        self,
        dyn: Dynamics,
        z: Tensor,
        t: Tensor,
        t_next: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        self.check(dyn)
        h = t_next - t
        v = dyn.velocity(z, t)
        v_next = dyn.velocity(z + h * v, t_next)
        return z + h / 2 * (v + v_next)


SOLVERS: tuple[type[Solver], ...] = (
    PosteriorSolver,
    DDIMSolver,
    DPMSolver,
    EulerSolver,
    HeunSolver,
)


def solve(
    solver: Solver,
    dyn: Dynamics,
    z0: Tensor,
    num_steps: int,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Integrate from z0 at t=0 to t=1 in num_steps steps; on_step(k, t_k, z_k) is called after
    each step (k=1..N) so callers can record trajectories."""
    # The grid is built once on z's device (indexing it needs no host sync); at least float32
    # so that k/N stays exact enough for N = 1000 even when z is half precision.
    dtype = torch.promote_types(z0.dtype, torch.float32)
    grid = solver.time_grid(dyn, num_steps, z0.device, dtype)
    solver = solver.fresh()
    z = z0
    for k in range(1, num_steps + 1):
        z = solver.step(dyn, z, grid[k - 1], grid[k], generator)
        if on_step is not None:
            on_step(k, grid[k], z)
    return z
