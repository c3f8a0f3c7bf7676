"""The interface every method offers to the training loop, the evaluation and the reports.

The loop asks a method for the losses of a minibatch and steps the optimiser on each; it knows
nothing of blocks, schedules or solvers. `predict` and `trajectory` take no labels, so inference
cannot read them. Also here: loss helpers shared by the methods and the baselines' choice of z_0;
the label diffusion's maths is in `noprop_exp/diffusion.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from noprop_exp.embeddings import LabelEmbedding
from noprop_exp.models.head import LinearHead
from noprop_exp.schedules import NoiseSchedule
from noprop_exp.solvers import Dynamics, Solver, solve

Diagnostics = dict[str, Tensor]
# What one optimiser step minimises: a loss, or the terms of a sum, computed one by one as the
# loop asks for them, so that each term's graph is freed by its backward before the next one is
# built (NoProp-DT's backward per block: memory that does not grow with T).
Loss = Tensor | Iterator[Tensor]


@dataclass
class Parts:
    """What the config groups other than `variant` provide to build a method."""

    backbone: Callable[..., nn.Module]  # backbone(image_shape=..., final=...) -> image branch
    schedule: NoiseSchedule
    embedding: LabelEmbedding
    image_shape: tuple[int, int, int]
    num_classes: int


class Method(nn.Module):
    """Base class of the five methods; subclasses set `name` and implement the four methods."""

    name: str = "method"
    # What one inference step is called in pictures: DT's steps are its blocks.
    step_unit: str = "step"
    # Every method classifies through a label embedding W (the baselines' targets included).
    embedding: LabelEmbedding
    # The linear head p(y | z) that `readout` uses; annotated only, since a class-level value
    # would shadow the submodule nn.Module registers.
    head: LinearHead
    # The examples of each minibatch this process computes: all of them, unless data-parallel
    # training (distributed.py) gives each process a share. A method draws its random numbers
    # for the whole minibatch, then keeps these (`own`), so that N processes draw what one
    # process would.
    examples: slice = slice(None)

    def own(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """The examples of this process (`examples`) of each minibatch-sized tensor."""
        return tuple(tensor[self.examples] for tensor in tensors)

    def update_losses(self, x: Tensor, y: Tensor) -> Iterator[tuple[Loss, Diagnostics]]:
        """Losses for one minibatch, each minimised by its own optimiser step, in order.

        Most methods yield one loss. NoProp-DT yields extra head-only losses to keep the paper's
        ratio of head to block updates (docs/NOPROP_SPEC.md §2).
        """
        raise NotImplementedError

    def optimizer_steps_per_minibatch(self) -> int:
        """How many losses `update_losses` yields per minibatch."""
        return 1

    def default_steps(self) -> int:
        """Inference steps used when `eval.steps` is null (T blocks for DT, 1000 for CT/FM)."""
        raise NotImplementedError

    def readout(self, z: Tensor) -> Tensor:
        """Class scores (B, m) of latents z (B, *z_shape); argmax is the prediction. The linear
        head's, unless a method reads classes off z otherwise (FM: the nearest row of W)."""
        return self.head(z)

    @torch.no_grad()
    def predict(
        self, x: Tensor, steps: int, solver: Solver, generator: torch.Generator | None = None
    ) -> Tensor:
        """Class scores (B, m) for images x; argmax is the prediction."""
        return self.trajectory(x, steps, solver, generator)[-1]

    @torch.no_grad()
    def trajectory(
        self, x: Tensor, steps: int, solver: Solver, generator: torch.Generator | None = None
    ) -> Tensor:
        """Class scores read out at every step of inference: (steps + 1, B, m), noise first."""
        raise NotImplementedError

    @torch.no_grad()
    def inference_diagnostics(
        self,
        x: Tensor,
        y: Tensor,
        steps: int,
        solver: Solver,
        generator: torch.Generator | None = None,
        check_generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The trajectory `trajectory(x, ...)` gives (inference itself never sees y), and the
        method's own checks of it against the labels: name -> (K, B) bool, whether each of K
        internal predictors gets each example right. Random draws of the checks come from
        `check_generator`, so the trajectory is the one `trajectory` draws with `generator`.
        Methods without internal predictors have no checks."""
        return self.trajectory(x, steps, solver, generator), {}

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Optimiser parameter groups; a method may exempt some parameters from weight decay."""
        return [{"params": list(self.parameters()), "weight_decay": weight_decay}]

    def diagnostics(self) -> dict[str, float]:
        """Scalars worth logging once per evaluation (e.g. a learned schedule's endpoints)."""
        return {}


class ContinuousTimeMethod(Method):
    """Inference shared by NoProp-CT and -FM: z_0 ~ N(0, I) at t = 0 carried to t = 1 by a solver
    over the model's `dynamics(x)`, classes read off z by `readout(z)`.

    Subclasses set `z_shape` and implement `dynamics`, which should compute the image branch
    once, so each of the (paper: 1000) steps costs only the z and t branches.
    """

    z_shape: tuple[int, ...]

    def default_steps(self) -> int:
        return 1000  # the paper's T for CT and FM

    def dynamics(self, x: Tensor) -> Dynamics:
        raise NotImplementedError

    def initial_z(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.randn((len(x), *self.z_shape), device=x.device, generator=generator)

    @torch.no_grad()
    def predict(
        self, x: Tensor, steps: int, solver: Solver, generator: torch.Generator | None = None
    ) -> Tensor:
        z0 = self.initial_z(x, generator)
        return self.readout(solve(solver, self.dynamics(x), z0, steps, generator))

    @torch.no_grad()
    def trajectory(
        self, x: Tensor, steps: int, solver: Solver, generator: torch.Generator | None = None
    ) -> Tensor:
        z0 = self.initial_z(x, generator)
        scores = [self.readout(z0)]

        def record(_step: int, _t: Tensor, z: Tensor) -> None:
            scores.append(self.readout(z))

        solve(solver, self.dynamics(x), z0, steps, generator, on_step=record)
        return torch.stack(scores)


def per_example_sq_error(prediction: Tensor, target: Tensor) -> Tensor:
    """||prediction - target||^2 summed over all but the batch dimension."""
    return (prediction - target).flatten(1).pow(2).sum(1)


def loss_by_time_bin(t: Tensor, per_example: Tensor, bins: int) -> Diagnostics:
    """`loss/tbin_k` for k = 0..bins-1: the loss of the examples with t in [k/bins, (k+1)/bins).

    Each value is bins * sum(loss over the bin's examples) / B, an unbiased estimate of
    E[loss | t in bin k] for t ~ U[0, 1] that stays defined when a minibatch has no example in
    the bin, so the loop's per-epoch average of it is the bin's mean loss; the bins' average is
    the minibatch's mean loss.
    """
    index = (t.detach() * bins).long().clamp(0, bins - 1)
    totals = torch.zeros(bins, device=t.device, dtype=per_example.dtype)
    totals.index_add_(0, index, per_example.detach())
    per_bin = totals * (bins / len(t))
    return {f"loss/tbin_{k}": per_bin[k] for k in range(bins)}


# How the baselines choose z_0 (config value `z0`); the paper does not say.
STARTS = ("noise", "zeros")


def check_start(z0: str) -> None:
    if z0 not in STARTS:
        raise ValueError(f"variant.method.z0 must be one of {list(STARTS)}, got {z0!r}")


def initial_latent(
    z0: str,
    batch: int,
    z_shape: tuple[int, ...],
    like: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """z_0 for a batch: N(0, I) (NoProp's own start, so inference is stochastic) or zeros
    (deterministic); on the device and in the dtype of `like`."""
    shape = (batch, *z_shape)
    if z0 == "zeros":
        return like.new_zeros(shape)
    return torch.randn(shape, device=like.device, dtype=like.dtype, generator=generator)
