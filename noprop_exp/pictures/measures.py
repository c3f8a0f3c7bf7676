"""The numbers behind the pictures: test accuracy at every step of inference, with the method's
own checks (`Method.inference_diagnostics`), and which steps and images are drawn."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from noprop_exp.solvers import Solver
from noprop_exp.variants.base import Method

MAX_SHOWN_STEPS = 21  # more steps than this (CT/FM's 1000) are shown at 11 evenly spaced ones


@dataclass
class StepAccuracy:
    """Test accuracy (%) at every step of inference; the block fields are None for methods
    without per-block checks (all but DT, docs/NOPROP_SPEC.md §2).

    readout[k]: argmax of the trajectory scores at step k = 0..S (k = 0 is pure noise).
    block_chain[t-1]: block t's own argmax given z_{t-1} from the inference chain, t = 1..T.
    block_q[t-1]: block t's own argmax given z_{t-1} ~ q(z_{t-1} | y), as in training.
    last_block_noise: block T's argmax given z ~ N(0, I) (is it a plain classifier of x?).
    """

    readout: list[float]
    predictions: Tensor  # (N,) final predicted class of every test image
    checked_images: int = 0  # how many of the N the method's own checks (block_*) ran on
    block_chain: list[float] | None = None
    block_q: list[float] | None = None
    last_block_noise: float | None = None

    @property
    def has_block_checks(self) -> bool:
        return self.block_chain is not None

    def metrics(self, shown: Sequence[int]) -> dict[str, float]:
        """MLflow metrics: the readout at the shown steps (not all of CT's 1001), DT's blocks."""
        out = {f"readout/acc_step_{k}": self.readout[k] for k in shown}
        for name, values in (
            ("blocks/acc_chain", self.block_chain),
            ("blocks/acc_q", self.block_q),
        ):
            out |= {f"{name}_{t}": v for t, v in enumerate(values or [], 1)}
        if self.last_block_noise is not None:
            out["blocks/last_on_noise_acc"] = self.last_block_noise
        return out


def shown_steps(steps: int) -> list[int]:
    """Steps drawn in the trajectory pictures: all of a short chain, else 11 evenly spaced."""
    if steps + 1 <= MAX_SHOWN_STEPS:
        return list(range(steps + 1))
    return sorted({round(i * steps / 10) for i in range(11)})


@torch.no_grad()
def step_accuracy(
    method: Method,
    images: Tensor,
    labels: Tensor,
    steps: int,
    solver: Solver,
    batch_size: int,
    seed: int,
    check_images: int | None = None,
) -> StepAccuracy:
    """One pass of inference over (images, labels), read out at every step, with the method's
    own checks (`Method.inference_diagnostics`; DT's per-block read-outs) on the batches that
    hold the first `check_images` images (None: all), since the checks cost inference of their
    own (DT: T more block calls per image).

    Inference draws its noise as `evaluation.accuracy` does with the same seed and batch size,
    so the last read-out is the run's `test_acc`; the checks draw theirs from a second
    generator, so checking a batch or not leaves its trajectory alone.
    """
    method.eval()
    generator = torch.Generator(device=images.device).manual_seed(seed)
    check_generator = torch.Generator(device=images.device).manual_seed(seed + 1)
    readout_hits = torch.zeros(steps + 1, device=images.device)
    check_hits: dict[str, Tensor] = {}
    predictions, checked = [], 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
        if check_images is None or checked < check_images:
            scores, checks = method.inference_diagnostics(
                x, y, steps, solver, generator, check_generator
            )
            checked += len(y)
        else:
            scores, checks = method.trajectory(x, steps, solver, generator), {}
        readout_hits += (scores.argmax(-1) == y).sum(1)
        predictions.append(scores[-1].argmax(-1))
        for name, correct in checks.items():
            check_hits[name] = check_hits.get(name, 0) + correct.sum(1)

    def percent(hits: Tensor, count: int) -> list[float]:
        return (100.0 * hits / count).tolist()

    result = StepAccuracy(percent(readout_hits, len(labels)), torch.cat(predictions), checked)
    if check_hits:
        result.block_chain = percent(check_hits["block_acc_chain"], checked)
        result.block_q = percent(check_hits["block_acc_q"], checked)
        (result.last_block_noise,) = percent(check_hits["last_block_noise_acc"], checked)
    return result


def pick(count: int, total: int, seed: int) -> Tensor:
    """`count` distinct random indices out of `total` (all of them if fewer), fixed by `seed`."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count]
