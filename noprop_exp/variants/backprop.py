"""The back-propagation baseline (spec section 7): NoProp-DT's architecture trained end to end.

z_t = (1 - a_t) z_{t-1} + a_t u_hat_t(z_{t-1}, x), a_t = tanh(w_t) with w_t learned, and one
cross-entropy on the linear head of z_T trains every block, W and the head through one backward.
There is no noise schedule and no solver: the chain is the network.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noprop_exp.models.dt_block import DTBlock
from noprop_exp.solvers import Solver
from noprop_exp.variants.base import Diagnostics, Method, Parts

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


class Backprop(Method):
    """T DT blocks chained by learned convex mixing, trained by back-propagation end to end."""

    name = "backprop"

    def __init__(
        self, parts: Parts, num_blocks: int = 10, initial_mix: float = 0.5, z0: str = "noise"
    ) -> None:
        super().__init__()
        if not 0 < initial_mix < 1:
            raise ValueError(
                f"variant.method.initial_mix is a_t = tanh(w_t) at the start and must lie in "
                f"(0, 1), got {initial_mix}"
            )
        check_start(z0)
        self.num_blocks = num_blocks
        self.z0 = z0
        self.embedding = parts.embedding
        self.blocks = nn.ModuleList(
            DTBlock(parts.backbone, parts.image_shape, self.embedding.z_shape, parts.num_classes)
            for _ in range(num_blocks)
        )
        self.mix_logits = nn.Parameter(torch.full((num_blocks,), math.atanh(initial_mix)))
        self.head = nn.Linear(self.embedding.dim, parts.num_classes)

    def default_steps(self) -> int:
        return self.num_blocks

    def mixing(self) -> Tensor:
        """a_t = tanh(w_t), t = 1..T: how far block t moves z towards its own prediction."""
        return torch.tanh(self.mix_logits)

    def readout(self, z: Tensor) -> Tensor:
        return self.head(z.flatten(1))

    def chain(self, x: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """z_0 .. z_T for images x; every z_t keeps its graph to all earlier blocks."""
        z = initial_latent(self.z0, x.shape[0], self.embedding.z_shape, x, generator)
        states = [z]
        for block, a in zip(self.blocks, self.mixing(), strict=True):
            u_hat = self.embedding.mix(F.softmax(block(z, x), dim=1))
            z = (1 - a) * z + a * u_hat
            states.append(z)
        return states

    def update_losses(self, x: Tensor, y: Tensor) -> Iterator[tuple[Tensor, Diagnostics]]:
        yield F.cross_entropy(self.readout(self.chain(x)[-1]), y), {}

    @torch.no_grad()
    def trajectory(
        self, x: Tensor, steps: int, solver: Solver, generator: torch.Generator | None = None
    ) -> Tensor:
        """The head's scores on z_0 .. z_T; `solver` is unused (the chain is the network)."""
        if steps != self.num_blocks:
            raise ValueError(
                f"variant=backprop infers with its {self.num_blocks} blocks: set eval.steps=null "
                f"or {self.num_blocks} (got {steps})"
            )
        return torch.stack([self.readout(z) for z in self.chain(x, generator)])

    def diagnostics(self) -> dict[str, float]:
        return {f"mix_{t}": a.item() for t, a in enumerate(self.mixing(), 1)}
