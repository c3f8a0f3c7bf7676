"""The T blocks of NoProp-DT as one module: one forward computes every block's logits.

The blocks share no parameters and, in training, differ only in the z they are given
(z_{t-1} ~ q(z_{t-1} | y), a different draw per block), so each of their layers batches cleanly:

- convolutions become one grouped convolution over the blocks' channels, laid out (B, T*C, H, W).
  The first image convolution sees the same x for every block, so it is an ordinary convolution
  with T*C_out output channels; an image-shaped z (prototype embedding) differs per block and
  uses groups=T from its first convolution on;
- linear layers become one batched matmul over a leading T dimension, vectors laid out (B, T, F);
- batch norm runs over (B, T*F) channels, which is per-block batch norm exactly (statistics are per
  channel over the batch), running statistics included;
- ReLU, max-pooling and dropout act per element or per channel: unchanged (dropout draws its masks
  for all blocks at once, so they differ from T separate draws, with the same distribution).

Why not `torch.func.stack_module_state` + `vmap`: vmap cannot update BatchNorm's running
statistics in place (https://pytorch.org/docs/stable/func.batch_norm.html), and DT blocks need
them at inference. vmap would also lower the convolutions to the same grouped convolutions.

Every tensor of the stack is `torch.stack` of the T blocks' tensors of the same name: the
stack's `<name>[t]` is block t's `<name>`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noprop_exp.models.backbones import PaperCNN
from noprop_exp.models.dt_block import DTBlock

# Layers that act per element or per channel: a (B, T*C, H, W) or (B, T, F) stack passes through
# them exactly as T separate inputs would.
_PER_CHANNEL = (nn.ReLU, nn.MaxPool2d, nn.Dropout, nn.Identity)


class StackedConv2d(nn.Module):
    """T Conv2d layers (same shape) as one convolution; weight (T, out, in, k, k)."""

    def __init__(self, convs: Sequence[nn.Conv2d]) -> None:
        super().__init__()
        first = convs[0]
        if first.groups != 1 or first.padding_mode != "zeros":
            raise ValueError("stacking supports plain convolutions (groups=1, zero padding) only")
        self.in_channels = first.in_channels
        self.stride, self.padding, self.dilation = first.stride, first.padding, first.dilation
        self.weight = nn.Parameter(_stack(c.weight for c in convs))
        self.bias = None if first.bias is None else nn.Parameter(_stack(c.bias for c in convs))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W), the same input for every block, or (B, T*C, H, W), one per block."""
        blocks = self.weight.shape[0]
        if x.shape[1] == self.in_channels:
            groups = 1  # shared input: T*out output channels from the same C inputs
        elif x.shape[1] == blocks * self.in_channels:
            groups = blocks
        else:
            raise ValueError(
                f"stacked conv expects {self.in_channels} or {blocks}*{self.in_channels} input "
                f"channels, got {x.shape[1]}"
            )
        bias = None if self.bias is None else self.bias.flatten()
        weight = self.weight.flatten(0, 1)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def apply_block(self, index: int, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias[index]
        return F.conv2d(x, self.weight[index], bias, self.stride, self.padding, self.dilation)


class StackedLinear(nn.Module):
    """T Linear layers as one batched matmul on (B, T, in) -> (B, T, out); weight (T, out, in)."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        super().__init__()
        if linears[0].bias is None:
            raise ValueError("stacking supports Linear layers with a bias only")
        self.weight = nn.Parameter(_stack(layer.weight for layer in linears))
        self.bias = nn.Parameter(_stack(layer.bias for layer in linears))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.baddbmm(self.bias.unsqueeze(1), x.transpose(0, 1), self.weight.transpose(1, 2))
        return out.transpose(0, 1)

    def apply_block(self, index: int, x: Tensor) -> Tensor:
        return F.linear(x, self.weight[index], self.bias[index])


class StackedBatchNorm1d(nn.Module):
    """T BatchNorm1d layers as one batch norm over (B, T*F) channels; tensors (T, F)."""

    def __init__(self, norms: Sequence[nn.BatchNorm1d]) -> None:
        super().__init__()
        first = norms[0]
        if not (first.affine and first.track_running_stats) or first.momentum is None:
            raise ValueError(
                "stacking supports BatchNorm1d with affine weights, running stats and a momentum"
            )
        self.eps, self.momentum = first.eps, first.momentum
        self.weight = nn.Parameter(_stack(n.weight for n in norms))
        self.bias = nn.Parameter(_stack(n.bias for n in norms))
        self.register_buffer("running_mean", _stack(n.running_mean for n in norms))
        self.register_buffer("running_var", _stack(n.running_var for n in norms))
        self.register_buffer("num_batches_tracked", _stack(n.num_batches_tracked for n in norms))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        # The views share the buffers' storage, so batch_norm updates the running stats in place.
        out = F.batch_norm(
            x.reshape(x.shape[0], -1),
            self.running_mean.view(-1),
            self.running_var.view(-1),
            self.weight.flatten(),
            self.bias.flatten(),
            self.training,
            self.momentum,
            self.eps,
        )
        return out.view(x.shape)

    def apply_block(self, index: int, x: Tensor) -> Tensor:
        if self.training:
            self.num_batches_tracked[index].add_(1)
        return F.batch_norm(
            x,
            self.running_mean[index],
            self.running_var[index],
            self.weight[index],
            self.bias[index],
            self.training,
            self.momentum,
            self.eps,
        )


class StackedFlatten(nn.Module):
    """(B, T*C, H, W) -> (B, T, C*H*W): each block's features flattened as nn.Flatten would."""

    def __init__(self, num_blocks: int) -> None:
        super().__init__()
        self.num_blocks = num_blocks

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], self.num_blocks, -1)

    def apply_block(self, index: int, x: Tensor) -> Tensor:
        return x.flatten(1)


class StackedCNN(nn.Module):
    """T copies of the paper's CNN (`PaperCNN`), same child names, stacked layers."""

    def __init__(self, cnns: Sequence[PaperCNN]) -> None:
        super().__init__()
        self.features = stack_modules([c.features for c in cnns])
        self.fc = StackedLinear([c.fc for c in cnns])
        self.final = stack_modules([c.final for c in cnns])

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) shared or (B, T*C, H, W) per block -> features (B, T, out_features)."""
        return self.final(self.fc(self.features(x)))

    def apply_block(self, index: int, x: Tensor) -> Tensor:
        features = run_block(self.features, index, x)
        return run_block(self.final, index, self.fc.apply_block(index, features))


def stack_modules(modules: Sequence[nn.Module]) -> nn.Module:
    """One module computing all of `modules` (identical architecture) at once, weights copied.

    Child names are kept, so the stack's state dict has the blocks' names (see module docstring).
    """
    first = modules[0]
    if isinstance(first, PaperCNN):
        return StackedCNN(modules)
    if isinstance(first, nn.Sequential):
        return nn.Sequential(*(stack_modules(layers) for layers in zip(*modules, strict=True)))
    if isinstance(first, nn.Conv2d):
        return StackedConv2d(modules)
    if isinstance(first, nn.Linear):
        return StackedLinear(modules)
    if isinstance(first, nn.BatchNorm1d):
        return StackedBatchNorm1d(modules)
    if isinstance(first, nn.Flatten) and (first.start_dim, first.end_dim) == (1, -1):
        return StackedFlatten(len(modules))
    if isinstance(first, _PER_CHANNEL):
        return copy.deepcopy(first)
    raise ValueError(
        f"variant.method.fused=true cannot stack a {type(first).__name__} layer: it supports the "
        f"paper's CNN (backbone=cnn) only; use variant.method.fused=false for other backbones"
    )


def run_block(module: nn.Module, index: int, x: Tensor) -> Tensor:
    """Block `index` (0-based) of a stacked module alone, on that block's unstacked input."""
    if isinstance(module, nn.Sequential):
        for layer in module:
            x = run_block(layer, index, x)
        return x
    if isinstance(module, _PER_CHANNEL):
        return module(x)
    return module.apply_block(index, x)


class DTStack(nn.Module):
    """T `DTBlock`s stacked: `forward` gives all blocks' logits for one minibatch at once, the
    per-block views (`BlockView`) one block's alone (what inference, which goes block by block,
    needs).

    Built from T blocks, whose weights it copies; the blocks themselves are not kept. Indexing,
    `len` and iteration give per-block views (`BlockView`), so code written for a list of
    DTBlocks (`blocks[t](z, x)`, forward hooks on `blocks[t]`) works on the stack unchanged.
    """

    def __init__(self, blocks: Sequence[DTBlock]) -> None:
        super().__init__()
        if not all(isinstance(b.image_branch, PaperCNN) for b in blocks):
            name = type(blocks[0].image_branch).__name__
            raise ValueError(
                f"variant.method.fused=true needs backbone=cnn (the paper's CNN), got {name}: "
                f"use variant.method.fused=false with other backbones"
            )
        self.num_blocks = len(blocks)
        self.image_branch = stack_modules([b.image_branch for b in blocks])
        self.label_stem = stack_modules([b.label_stem for b in blocks])
        self.label_residual = stack_modules([b.label_residual for b in blocks])
        self.head = stack_modules([b.head for b in blocks])
        # A plain list: views are not submodules (they hold no weights, and would make a cycle).
        self._views = [BlockView(self, t) for t in range(self.num_blocks)]

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index: int) -> BlockView:
        return self._views[index]

    def __iter__(self) -> Iterator[BlockView]:
        return iter(self._views)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        """z: (T, B, *z_shape), block t's input at z[t]; x: (B, C, H, W) -> logits (T, B, m).

        Computes what `DTBlock.forward` does, for all T blocks at once.
        """
        if z.shape[0] != self.num_blocks:
            raise ValueError(f"expected z for {self.num_blocks} blocks first, got {tuple(z.shape)}")
        per_block = z.transpose(0, 1)  # (B, T, ...)
        if z.dim() == 5:  # image-shaped z: channels of all blocks side by side, (B, T*C, H, W)
            per_block = per_block.flatten(1, 2)
        h = self.label_stem(per_block)
        h = h + self.label_residual(h)
        return self.head(torch.cat([self.image_branch(x), h], dim=2)).transpose(0, 1)


class BlockView(nn.Module):
    """Block `index` of a `DTStack`, used like a DTBlock: (z, x) -> logits, `image_features`,
    `from_features`. Holds no weights."""

    def __init__(self, stack: DTStack, index: int) -> None:
        super().__init__()
        self.index = index
        self._stack = (stack,)  # a tuple, so that nn.Module does not register it as a child

    def image_features(self, x: Tensor) -> Tensor:
        return run_block(self._stack[0].image_branch, self.index, x)

    def from_features(self, z: Tensor, features: Tensor) -> Tensor:
        stack = self._stack[0]
        h = run_block(stack.label_stem, self.index, z)
        h = h + run_block(stack.label_residual, self.index, h)
        return run_block(stack.head, self.index, torch.cat([features, h], dim=1))

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.from_features(z, self.image_features(x))

    def extra_repr(self) -> str:
        return f"index={self.index}"


def _stack(tensors: Iterable[Tensor]) -> Tensor:
    """A new tensor holding copies of the blocks' tensors, block index first."""
    return torch.stack([t.detach() for t in tensors])
