"""Image branches: the paper's CNN (Figure 6) and torchvision ResNets adapted to 28/32-pixel inputs.

Every backbone maps images (B, C, H, W) to a feature vector (B, out_features). Configs select one
with `_target_` and `_partial_`, so the models can build as many independent copies as they need
(NoProp-DT gives every block its own image branch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F


class MaxPool2x2(nn.MaxPool2d):
    """nn.MaxPool2d(2), with a faster path for CPU inference.

    The CPU's max-pool always computes the argmax indices its backward needs (int64, four times
    the bytes of a bf16 output). Where no graph is recorded, two elementwise maxima over strided
    views (rows, then columns) give the same values exactly, 1.7-2.4x faster on the 2-core CPU
    (bf16, channels-last, 1,000 images of either pooled map). Under autograd, and on other
    devices (not measured there), it is the ordinary max-pool.
    """

    def __init__(self) -> None:
        super().__init__(kernel_size=2)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
            return F.max_pool2d(x, 2)
        height, width = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2  # floor mode drops odd edges
        rows = torch.maximum(x[..., 0:height:2, :width], x[..., 1:height:2, :width])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


DROPOUT_MASKS = ("bits", "bernoulli")


class BitsDropout(nn.Dropout):
    """nn.Dropout(p), its CPU masks drawn from 32-bit integers rather than by `bernoulli_`.

    PyTorch's CPU dropout draws one uniform float per element through `bernoulli_`, a serial
    loop: on the 2-core CPU it was a quarter of a CT training step at two threads, the largest
    single cost after the convolutions' backward. Here each element keeps its value iff a uniform
    32-bit integer, two of them per 64-bit draw of the same generator, is at least round(p 2^32):
    Bernoulli(1 - p) to within 2^-33, in the layout of the input, at about half the cost. The
    draws differ from `nn.Dropout`'s, the distribution does not (tests/test_architecture.py).
    Elsewhere (a GPU draws in parallel), in evaluation, and in place, it is nn.Dropout.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or x.device.type != "cpu" or self.inplace or not 0 < self.p < 1:
            return super().forward(x)
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        count = x.numel()
        words = torch.empty((count + 1) // 2, dtype=torch.int64, device=x.device)
        words.random_(-(2**63), 2**63 - 1)  # the whole int64 range: 64 uniform bits each
        uniform = words.view(torch.int32)[:count]  # two uniform 32-bit integers per draw
        keep = uniform >= -(2**31) + round(self.p * 2**32)
        # the flat mask laid out as x is (x is dense, so its strides cover 0..count-1 once)
        keep = keep.as_strided(x.shape, x.stride())
        return x.mul(keep).mul_(1 / (1 - self.p))


def make_dropout(p: float, masks: str) -> nn.Dropout:
    """Dropout with masks drawn by `masks`: `bits` (BitsDropout) or `bernoulli` (nn.Dropout)."""
    if masks not in DROPOUT_MASKS:
        raise ValueError(
            f"backbone.dropout_masks must be one of {list(DROPOUT_MASKS)}, got {masks!r}"
        )
    return BitsDropout(p) if masks == "bits" else nn.Dropout(p)


class PaperCNN(nn.Module):
    """conv32-pool-conv64-conv128-pool-FC, ReLU and dropout 0.2 in between (paper Figure 6).

    The 256-d output is followed by BatchNorm in DT blocks and by ReLU in CT/FM networks, so the
    final activation belongs to the caller (`final`).
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        out_features: int = 256,
        dropout: float = 0.2,
        final: str = "batchnorm",
        dropout_masks: str = "bits",
        inference_chunk: int = 128,
    ) -> None:
        super().__init__()
        if inference_chunk < 0:
            raise ValueError(
                f"backbone.inference_chunk must be >= 0 (0: off), got {inference_chunk}"
            )
        self.inference_chunk = inference_chunk
        channels, height, width = image_shape
        # Figure 6 has conv-ReLU-pool; here each pool runs before its ReLU: max and ReLU commute
        # (ReLU is monotone), so values and gradients are the same (tests/test_architecture.py),
        # and the ReLU reads a quarter of the map. The ReLUs are in place: neither a convolution's
        # nor a max-pool's backward needs its output. Together they made DT inference on the
        # 2-core CPU 1.5x faster (1,000 images through 10 blocks, bf16: 3.15 s -> 2.04 s).
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            MaxPool2x2(),
            nn.ReLU(inplace=True),
            make_dropout(dropout, dropout_masks),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            make_dropout(dropout, dropout_masks),
            nn.Conv2d(64, 128, 3, padding=1),
            MaxPool2x2(),
            nn.ReLU(inplace=True),
            make_dropout(dropout, dropout_masks),
            nn.Flatten(),
        )
        flat = 128 * (height // 2 // 2) * (width // 2 // 2)
        self.fc = nn.Linear(flat, out_features)
        self.final = _final_layer(final, out_features)

    def forward(self, x: Tensor) -> Tensor:
        """Features of x. In CPU inference (evaluation mode, no graph), `inference_chunk` images
        at a time: the first convolution's map of a 1,000-image evaluation batch (50 MB in bf16)
        outgrows the cache, and its max-pool then reads it back from memory; in chunks of 128,
        DT inference ran 1.4x faster on the 2-core CPU, with the same values (per-image layers
        only: batch norm in evaluation mode uses its running statistics)."""
        chunk = self.inference_chunk
        in_cpu_inference = x.device.type == "cpu" and not (self.training or torch.is_grad_enabled())
        if chunk and len(x) > chunk and in_cpu_inference:
            return torch.cat([self.forward(part) for part in x.split(chunk)])  # one pass each
        return self.final(self.fc(self.features(x)))


STEMS = ("small", "imagenet")


class ResNet(nn.Module):
    """A torchvision ResNet (random init). `stem: small` (the default): 3x3 conv, stride 1, no
    max-pool. `stem: imagenet`: torchvision's own 7x7 stride-2 conv and max-pool, which shrink a
    28-pixel image to 7 pixels before the first residual stage (why CIFAR-style ResNets replace
    it), but are what implementations built on torchvision's ResNet train (e.g. the seed's), at
    about a sixteenth of the work per image.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        depth: int = 18,
        out_features: int = 256,
        final: str = "batchnorm",
        stem: str = "small",
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"backbone.stem={stem!r} is not one of {list(STEMS)}")
        builders = {
            18: torchvision.models.resnet18,
            50: torchvision.models.resnet50,
            152: torchvision.models.resnet152,
        }
        if depth not in builders:
            raise ValueError(
                f"backbone.depth={depth} is not supported; choose one of {sorted(builders)}"
            )
        net = builders[depth](weights=None)
        if stem == "small":
            net.conv1 = nn.Conv2d(image_shape[0], 64, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        else:  # torchvision's stem, for the image's channels (1 for MNIST)
            net.conv1 = nn.Conv2d(image_shape[0], 64, 7, stride=2, padding=3, bias=False)
        net.fc = nn.Linear(net.fc.in_features, out_features)
        self.net = net
        self.final = _final_layer(final, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.final(self.net(x))


def _final_layer(final: str, features: int) -> nn.Module:
    layers = {"batchnorm": lambda: nn.BatchNorm1d(features), "relu": nn.ReLU, "none": nn.Identity}
    if final not in layers:
        raise ValueError(f"final={final!r} is not one of {sorted(layers)}")
    return layers[final]()


def label_stem(
    z_shape: tuple[int, ...],
    backbone: Callable[..., nn.Module],
    width: int = 256,
    batchnorm: bool = True,
) -> nn.Module:
    """First layer of a label branch: FC for vector z, a conv stem like the image's for image z.

    Prototype embeddings make z image-shaped (docs/NOPROP_SPEC.md §5), so z then goes through a
    copy of the image backbone instead of a fully connected layer.
    """
    norm = "batchnorm" if batchnorm else "none"
    if len(z_shape) == 3:
        return nn.Sequential(backbone(image_shape=z_shape, final=norm), nn.ReLU())
    layers = [nn.Linear(z_shape[0], width)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(width))
    return nn.Sequential(*layers, nn.ReLU())
