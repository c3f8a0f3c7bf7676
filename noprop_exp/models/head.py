"""The linear head p(y | z) that reads class scores off a latent (DT, CT and both baselines)."""

from __future__ import annotations

from torch import Tensor, nn


class LinearHead(nn.Linear):
    """A linear layer on z flattened to (B, d): z may be a vector or image-shaped (prototype W).

    A subclass rather than a wrapper, so the parameters stay `head.weight` and `head.bias` in a
    method's state dict and runs saved before it existed still load.
    """

    def forward(self, z: Tensor) -> Tensor:
        return super().forward(z.flatten(1))
