"""The continuous-time network of NoProp-CT and -FM (paper Figure 6): f(z_t, x, t) -> logits.

Also the vector field of the adjoint baseline. No batch norm: the same network is evaluated at
every t, and batch statistics would mix noise levels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from noprop_exp.models.backbones import label_stem


def sinusoidal_embedding(t: Tensor, dim: int = 64, scale: float = 1000.0) -> Tensor:
    """Transformer-style features of t in [0, 1] (B,) -> (B, dim); `scale` spreads t like the
    integer timesteps of diffusion models, so the low frequencies still vary across [0, 1]."""
    half = dim // 2
    frequencies = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    angles = scale * t.float()[:, None] * frequencies[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class CTNetwork(nn.Module):
    """Image branch, label branch and time branch, joined by an MLP head."""

    def __init__(
        self,
        backbone: Callable[..., nn.Module],
        image_shape: tuple[int, int, int],
        z_shape: tuple[int, ...],
        num_classes: int,
        width: int = 256,
        time_dim: int = 64,
    ) -> None:
        super().__init__()
        self.time_dim = time_dim
        self.image_branch = backbone(image_shape=image_shape, final="relu")
        self.label_branch = label_stem(z_shape, backbone, width, batchnorm=False)
        self.time_branch = nn.Sequential(nn.Linear(time_dim, width), nn.ReLU())
        self.head = nn.Sequential(
            nn.Linear(3 * width, width),
            nn.ReLU(),
            nn.Linear(width, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def image_features(self, x: Tensor) -> Tensor:
        """The image branch alone: it does not depend on z or t, so a solver computes it once."""
        return self.image_branch(x)

    def from_features(self, z: Tensor, features: Tensor, t: Tensor) -> Tensor:
        """Logits given precomputed image features; t is (B,) or 0-dim."""
        t = t.expand(z.shape[0]) if t.dim() == 0 else t
        time = self.time_branch(sinusoidal_embedding(t, self.time_dim).to(features.dtype))
        return self.head(torch.cat([features, self.label_branch(z), time], dim=1))

    def forward(self, z: Tensor, x: Tensor, t: Tensor) -> Tensor:
        return self.from_features(z, self.image_features(x), t)
