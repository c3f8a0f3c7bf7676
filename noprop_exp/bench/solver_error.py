"""How far each solver's z_1 lands from the exact probability-flow path when the denoiser is
exact, so that any error is the integrator's (issue: euler/heun blow up at few steps).

The labels are the m one-hot rows with equal weights; their denoiser is closed-form,
E[u | z_t] = sum_k softmax_k(-||z - sqrt(ab) u_k||^2 / (2 (1 - ab))) u_k. The reference end point
is Heun's method in float64 with `REFERENCE_STEPS` steps, fine enough for the stiffest schedule
here (the linear one's rate near t = 1 is ~5,000; h = 5e-5 keeps h * rate < 1).

    python -m noprop_exp.bench.solver_error     # prints the table
"""

from __future__ import annotations

import torch
from torch import Tensor

from noprop_exp.diffusion import probability_flow
from noprop_exp.schedules import CosineSchedule, LearnedSchedule, LinearSchedule, NoiseSchedule
from noprop_exp.solvers import (
    GRIDS,
    DDIMSolver,
    DPMSolver,
    Dynamics,
    EulerSolver,
    HeunSolver,
    PosteriorSolver,
    Solver,
    solve,
)

REFERENCE_STEPS = 20_000
STEP_COUNTS = (2, 5, 10, 20)


def schedules() -> dict[str, NoiseSchedule]:
    """The three schedules, the learned one at its initialisation (seeded, without touching
    the caller's global random state), in float64."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        learned = LearnedSchedule().double()
    return {
        "cosine": CosineSchedule().double(),
        "linear": LinearSchedule().double(),
        "learned (init)": learned,
    }


def reference_end_point(dyn: Dynamics, z0: Tensor, steps: int = REFERENCE_STEPS) -> Tensor:
    """z_1 of the exact path, within float64 rounding for `steps` fine enough."""
    return solve(HeunSolver(), dyn, z0, steps)


def initial_points(samples: int, classes: int) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(samples, classes, dtype=torch.float64, generator=generator)


def solvers() -> dict[str, Solver]:
    """Each solver on each grid: t evenly spaced (`time`) and log-SNR evenly spaced."""
    kinds = {
        "dpm": DPMSolver,
        "ddim": DDIMSolver,
        "posterior mean": lambda grid: PosteriorSolver(deterministic=True, grid=grid),
        "euler": EulerSolver,
        "heun": HeunSolver,
    }
    return {f"{name}, {grid}": make(grid=grid) for name, make in kinds.items() for grid in GRIDS}


def exact_dynamics(schedule: NoiseSchedule, classes: int) -> Dynamics:
    """Dynamics of the exact denoiser for labels uniform over the one-hot rows."""
    rows = torch.eye(classes, dtype=torch.float64)

    def denoise(z: Tensor, t: Tensor) -> Tensor:
        ab = schedule.alpha_bar(t)
        distances = torch.cdist(z, ab.sqrt() * rows).pow(2)
        return torch.softmax(-distances / (2 * (1 - ab)), dim=1) @ rows

    return Dynamics(
        velocity=probability_flow(denoise, schedule),
        denoise=denoise,
        alpha_bar=schedule.alpha_bar,
        source="the exact denoiser",
    )


@torch.no_grad()
def end_point_errors(
    step_counts: tuple[int, ...] = STEP_COUNTS, classes: int = 10, samples: int = 64
) -> dict[tuple[str, str], dict[int, float]]:
    """(schedule, solver) -> steps -> the largest |z_1 - z_1 exact| over the samples."""
    z0 = initial_points(samples, classes)
    errors = {}
    for schedule_name, schedule in schedules().items():
        dyn = exact_dynamics(schedule, classes)
        reference = reference_end_point(dyn, z0)
        for solver_name, solver in solvers().items():
            errors[schedule_name, solver_name] = {
                n: (solve(solver, dyn, z0, n) - reference).abs().max().item() for n in step_counts
            }
    return errors


def main() -> None:
    errors = end_point_errors()
    header = "| schedule | solver | " + " | ".join(f"N={n}" for n in STEP_COUNTS) + " |"
    print(header)
    print("|" + "---|" * (2 + len(STEP_COUNTS)))
    for (schedule, solver), by_steps in errors.items():
        cells = " | ".join(f"{by_steps[n]:.3g}" for n in STEP_COUNTS)
        print(f"| {schedule} | {solver} | {cells} |")


if __name__ == "__main__":
    main()
