"""One NoProp-DT block (paper Figure 6): u_hat_t(z_{t-1}, x) -> class logits."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from noprop_exp.models.backbones import label_stem


class DTBlock(nn.Module):
    """Image branch + residual label branch, joined by an MLP head with batch norm.

    The block has its own image branch: blocks share no parameters, which is what lets each one
    learn from its own loss alone.
    """

    def __init__(
        self,
        backbone: Callable[..., nn.Module],
        image_shape: tuple[int, int, int],
        z_shape: tuple[int, ...],
        num_classes: int,
        width: int = 256,
    ) -> None:
        super().__init__()
        self.image_branch = backbone(image_shape=image_shape, final="batchnorm")
        self.label_stem = label_stem(z_shape, backbone, width, batchnorm=True)
        self.label_residual = nn.Sequential(
            nn.Linear(width, width),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.BatchNorm1d(width),
        )
        self.head = nn.Sequential(
            nn.Linear(2 * width, width),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Linear(width, 128),
            nn.BatchNorm1d(128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def image_features(self, x: Tensor) -> Tensor:
        """The image branch alone: it does not depend on z, so inference computes it once per
        block and the per-block checks reuse it."""
        return self.image_branch(x)

    def from_features(self, z: Tensor, features: Tensor) -> Tensor:
        """Logits given precomputed image features."""
        h = self.label_stem(z)
        h = h + self.label_residual(h)
        return self.head(torch.cat([features, h], dim=1))

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.from_features(z, self.image_features(x))
