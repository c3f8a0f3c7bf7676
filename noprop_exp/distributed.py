"""Training on several processes with torch.distributed: block-parallel NoProp-DT, data-parallel
CT, FM and the baselines. README: "Beyond one process".

`torchrun --nproc-per-node N noprop-train ...` starts N copies of the same command (so does a
submitit job of N tasks: `hydra.launcher.tasks_per_node=N`); `join` reads the world they describe
(WORLD_SIZE, RANK, LOCAL_RANK) and opens the process group: nccl on CUDA (one GPU per process),
gloo on the CPU. Every process loads the data, seeds torch alike and
shuffles alike, so all see the same minibatches in the same order.

- **dt, block-parallel** (`BlockParallel`): rank r trains its own share of the T blocks, on the
  same minibatch as every other rank; no block's forward or backward runs twice. The head and W
  are shared: each rank adds 1/N of the head loss to its blocks' terms and their gradients are
  summed over the ranks (one all-reduce of a few hundred numbers per optimiser step), so every
  rank holds the same head and W. Before an evaluation or a checkpoint each block's owner
  broadcasts it, and rank 0 evaluates the whole chain.
- **ct, fm, backprop, adjoint, data-parallel** (`DataParallel`): every rank draws the random
  numbers of the whole minibatch, as one process would, computes its share of the examples
  (`Method.examples`) and scales its loss by that share; all gradients are summed over the ranks.
  Not torch's DistributedDataParallel wrapper: the methods call their networks directly rather
  than through one `forward`, and take several optimiser steps per minibatch. The all-reduce is
  one flat tensor per step, after the backward pass (no overlap with it).

Either way, one training step on N processes gives the parameters of one process, up to floating
point: `tests/test_distributed.py` checks it on 2 CPU processes. Two things differ by design:
dropout masks are drawn by each process for what it computes (the same distribution, other
draws), and batch norm (DT blocks, so dt and backprop) normalises over what a process computes:
for dt that is the whole minibatch, as in one process; for backprop, each rank's share
(SyncBatchNorm would pool them, but it needs a GPU). Rank 0 alone talks to MLflow.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from noprop_exp.variants.base import Method

WORLD_SIZE_PARAM = "distributed.world_size"  # the MLflow param of a run's process count


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: a world of one by default."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> range:
        """This rank's contiguous share of n items; the first n % size ranks take one more."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def owner(self, n: int, index: int) -> int:
        """The rank whose `share(n)` holds `index`."""
        return next(r for r in range(self.size) if index in World(r, self.size).share(n))

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank (every rank must ask)."""
        if self.size == 1:
            return flag
        value = torch.tensor([float(flag)], device=_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (any picklable object)."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if self.size == 1:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values


ONE_PROCESS = World()


def _device() -> torch.device:
    """Where collectives' tensors live: nccl needs them on this process's GPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def export_submitit_world() -> None:
    """In a submitit job of several tasks (`hydra/launcher=slurm` or `slurm_local` with
    `hydra.launcher.tasks_per_node=N`), each task is one process of the world: set the variables
    torchrun would have set, from Slurm's (or the local executor's)."""
    if "WORLD_SIZE" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    import submitit  # the launchers extra; only a submitit job gets here

    if submitit.JobEnvironment().num_tasks > 1:
        # Every GPU stays visible: `join` gives the process GPU LOCAL_RANK itself.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def join(device: torch.device) -> tuple[World, torch.device]:
    """The world this process was started in and the device it trains on: with torchrun (or as
    a task of a submitit job of several), its process group is opened and a CUDA process takes
    GPU LOCAL_RANK; otherwise a world of one."""
    export_submitit_world()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size()), device


def leave(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def sum_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Replace each gradient by its sum over the ranks, in one all-reduce. Every rank passes
    the same parameters, with gradients on the same ones."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for grad, summed in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(summed.view_as(grad))


def summed_over_ranks(world: World, sums: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each name's sum over the ranks that logged it (a DT block's terms: its owner only)."""
    every = world.gather({k: v.cpu() for k, v in sums.items()})
    device = next(iter(sums.values())).device
    names = dict.fromkeys(k for ranks_sums in every for k in ranks_sums)
    return {k: sum(r[k] for r in every if k in r).to(device) for k in names}


class SingleProcess:
    """One process: nothing to split, share or gather."""

    mode = "none"

    def __init__(self, world: World, method: Method) -> None:
        self.world, self.method = world, method

    def begin_minibatch(self, batch_size: int) -> None:
        pass

    def scale(self, loss: Tensor) -> Tensor:
        return loss

    def after_backward(self) -> None:
        pass

    def gather_model(self) -> None:
        pass

    def epoch_sums(self, sums: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return dict(sums)


class DataParallel(SingleProcess):
    """Each rank computes its share of every minibatch's examples; gradients summed."""

    mode = "data"

    def begin_minibatch(self, batch_size: int) -> None:
        share = self.world.share(batch_size)
        self.method.examples = slice(share.start, share.stop)
        self.fraction = len(share) / batch_size

    def scale(self, loss: Tensor) -> Tensor:
        # A rank's loss is the mean over its share: weighted by the share, the ranks' losses
        # (and gradients) sum to the minibatch's mean.
        return loss * self.fraction

    def after_backward(self) -> None:
        sum_gradients(self.method.parameters())

    def epoch_sums(self, sums: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The ranks' mean: each rank's sums are of means over its share of each minibatch."""
        return {k: v / self.world.size for k, v in summed_over_ranks(self.world, sums).items()}


class BlockParallel(SingleProcess):
    """NoProp-DT: each rank trains its share of the T blocks; head and W shared."""

    mode = "block"

    def __init__(self, world: World, method: Method) -> None:
        super().__init__(world, method)
        if getattr(method, "fused", False):
            raise ValueError(
                "block-parallel dt computes each rank's own blocks: set variant.method.fused=false"
            )
        self.blocks = method.num_blocks
        if world.size > self.blocks:
            raise ValueError(f"{world.size} processes for {self.blocks} blocks: use at most T")
        method.own_blocks(world.share(self.blocks), head_share=1 / world.size)

    def after_backward(self) -> None:
        sum_gradients(self.method.shared_parameters())

    def gather_model(self) -> None:
        """Every block from its owner, to every rank (parameters and batch-norm statistics)."""
        for index, block in enumerate(self.method.blocks):
            owner = self.world.owner(self.blocks, index)
            for tensor in [*block.parameters(), *block.buffers()]:
                dist.broadcast(tensor.data, src=owner)

    def epoch_sums(self, sums: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The ranks' sum: each logs its own blocks' terms and 1/N of the head loss."""
        return summed_over_ranks(self.world, sums)


def parallel_training(world: World, method: Method) -> SingleProcess:
    """How `method` trains in `world`: block-parallel for dt, data-parallel otherwise."""
    if world.size == 1:
        return SingleProcess(world, method)
    if hasattr(method, "own_blocks"):
        return BlockParallel(world, method)
    return DataParallel(world, method)
