"""Label embeddings W (m x d), u_y = W[y] (docs/NOPROP_SPEC.md §5): one-hot, learned, prototype.

The same object serves every method: `forward` gives the targets u_y, `mix` turns class
probabilities (or FM's unrestricted logits) into a point in z-space. For `prototype`, z is
image-shaped so that it can go through a conv stem like x.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from noprop_exp.data import DataSplits


class LabelEmbedding(nn.Module):
    """W: (num_classes, dim) label embedding; u_y = W[y].

    `weight` is an `nn.Parameter` when `trainable`, else a buffer (moves with the module, is saved
    in its state dict, but no optimizer sees it).
    """

    weight: Tensor

    def __init__(self, weight: Tensor, z_shape: tuple[int, ...], trainable: bool) -> None:
        super().__init__()
        if weight.ndim != 2 or weight.shape[1] != math.prod(z_shape):
            raise ValueError(
                f"weight must be (num_classes, prod(z_shape)) = (m, {math.prod(z_shape)}), "
                f"got {tuple(weight.shape)}."
            )
        weight = weight.detach().to(torch.float32).clone()
        if trainable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)
        self.num_classes = weight.shape[0]
        self.z_shape = tuple(z_shape)
        self.trainable = trainable

    @property
    def dim(self) -> int:
        """d = prod(z_shape), the length of one flattened z."""
        return self.weight.shape[1]

    def forward(self, y: Tensor) -> Tensor:
        """u_y for labels y (B,) -> (B, *z_shape)."""
        return self.weight[y].view(-1, *self.z_shape)

    def mix(self, probs: Tensor) -> Tensor:
        """probs (B, m) @ W, reshaped to (B, *z_shape); probs may be any real weights."""
        if probs.shape[-1] != self.num_classes:
            raise ValueError(
                f"mix expects (B, {self.num_classes}) class weights, got {tuple(probs.shape)}."
            )
        return (probs.to(self.weight.dtype) @ self.weight).view(-1, *self.z_shape)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, z_shape={self.z_shape}, trainable={self.trainable}"


class OneHotEmbedding(LabelEmbedding):
    """W = I (d = m), fixed."""

    def __init__(self, num_classes: int, device: str | torch.device | None = None) -> None:
        super().__init__(torch.eye(num_classes, device=device), (num_classes,), trainable=False)

    @classmethod
    def from_data(cls, data: DataSplits) -> OneHotEmbedding:
        return cls(data.num_classes, device=data.train_x.device)


class LearnedEmbedding(LabelEmbedding):
    """Trainable W (m x dim): orthonormal rows when dim >= m; otherwise random unit-norm rows
    (the norm an orthonormal row or a one-hot row has, so the noise scale means the same)."""

    def __init__(
        self,
        num_classes: int,
        dim: int = 20,
        device: str | torch.device | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if dim < 1:
            raise ValueError(f"embedding dim must be >= 1, got {dim}.")
        if dim >= num_classes:
            weight = nn.init.orthogonal_(torch.empty(num_classes, dim), generator=generator)
        else:
            weight = nn.functional.normalize(torch.randn(num_classes, dim, generator=generator))
        super().__init__(weight.to(device), (dim,), trainable=True)

    @classmethod
    def from_data(cls, data: DataSplits, dim: int = 20) -> LearnedEmbedding:
        """Initialised from torch's global RNG, so the run's seed fixes it."""
        return cls(data.num_classes, dim, device=data.train_x.device)


class PrototypeEmbedding(LabelEmbedding):
    """Trainable image-shaped W: row c starts as the medoid training image of class c."""

    def __init__(self, prototypes: Tensor) -> None:
        super().__init__(prototypes.flatten(1), tuple(prototypes.shape[1:]), trainable=True)

    @classmethod
    def from_data(
        cls, data: DataSplits, per_class: int | None = 256, seed: int = 0
    ) -> PrototypeEmbedding:
        """Medoids over a `per_class` random subsample of each class (drawn with `seed`; None for
        the whole class)."""
        generator = torch.Generator().manual_seed(seed)
        images = data.train_images(data.train_x)
        index = medoid_indices(images, data.train_y, data.num_classes, per_class, generator)
        return cls(images[index])


def medoid_indices(
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    per_class: int | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Per class c, the index into `images` of the class-c image with the smallest median
    Euclidean distance to the other class-c images.

    With `per_class`, both the candidates and the images they are compared with are a random
    subsample of that many class-c images (drawn on the CPU `generator`), which keeps the cost at
    per_class^2 distances per class. Even counts use the lower median (torch.median). Ties go to
    the earlier candidate. Returns (num_classes,) int64 on the images' device.
    """
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be >= 1 or None, got {per_class}.")
    flat = images.flatten(1)
    result = []
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        if len(members) == 0:
            raise ValueError(f"class {c} has no training images: a prototype needs at least one.")
        if per_class is not None and len(members) > per_class:
            pick = torch.randperm(len(members), generator=generator)[:per_class]
            members = members[pick.to(members.device)]
        k = len(members)
        if k == 1:
            result.append(members[0])
            continue
        points = flat[members]
        dist = torch.cdist(points, points, compute_mode="donot_use_mm_for_euclid_dist")
        off_diagonal = ~torch.eye(k, dtype=torch.bool, device=dist.device)
        median = dist[off_diagonal].view(k, k - 1).median(dim=1).values
        result.append(members[median.argmin()])
    return torch.stack(result)
