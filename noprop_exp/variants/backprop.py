"""The back-propagation baseline (docs/NOPROP_SPEC.md §7): NoProp-DT's architecture trained
end to end.

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
from noprop_exp.models.head import LinearHead
from noprop_exp.solvers import Solver
from noprop_exp.variants.base import Diagnostics, Method, Parts, check_start, initial_latent


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
        self.head = LinearHead(self.embedding.dim, parts.num_classes)

    def default_steps(self) -> int:
        return self.num_blocks

    def mixing(self) -> Tensor:
        """a_t = tanh(w_t), t = 1..T: how far block t moves z towards its own prediction."""
        return torch.tanh(self.mix_logits)

    def initial_z(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return initial_latent(self.z0, x.shape[0], self.embedding.z_shape, x, generator)

    def chain(self, x: Tensor, z: Tensor) -> list[Tensor]:
        """z_0 = z .. z_T for images x; every z_t keeps its graph to all earlier blocks."""
        states = [z]
        for block, a in zip(self.blocks, self.mixing(), strict=True):
            u_hat = self.embedding.mix(F.softmax(block(z, x), dim=1))
            z = (1 - a) * z + a * u_hat
            states.append(z)
        return states

    def update_losses(self, x: Tensor, y: Tensor) -> Iterator[tuple[Tensor, Diagnostics]]:
        x, y, z = self.own(x, y, self.initial_z(x))
        yield F.cross_entropy(self.readout(self.chain(x, z)[-1]), y), {}

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
        return torch.stack([self.readout(z) for z in self.chain(x, self.initial_z(x, generator))])

    def diagnostics(self) -> dict[str, float]:
        return {f"mixing/a_{t}": a.item() for t, a in enumerate(self.mixing(), 1)}
