"""What noprop-bench measures of an assembled run: training and inference throughput, peak
memory, and the machine they were measured on (see the package docstring)."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig

from noprop_exp import train
from noprop_exp.assemble import Assembled
from noprop_exp.distributed import SingleProcess
from noprop_exp.precision import autocast


def describe_machine(device: torch.device) -> dict[str, str]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return {
        "cpu": f"{cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        "gpu": gpu,
        "device": str(device),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
    }


def endless_batches(assembled: Assembled, batch_size: int, seed: int) -> Iterator:
    """Full training minibatches, reshuffled each pass, as the loop draws them."""
    data = assembled.data
    if len(data.train_y) < batch_size:
        raise ValueError(
            f"the training set has {len(data.train_y)} images, fewer than one batch of "
            f"{batch_size}: lower --batch-size or raise --train-size"
        )
    generator = torch.Generator(device=data.train_x.device).manual_seed(seed)
    while True:
        for x, y in data.train_minibatches(batch_size, generator):
            if len(y) == batch_size:
                yield x, y


def training_throughput(
    assembled: Assembled,
    cfg: DictConfig,
    device: torch.device,
    warmup: int,
    steps: int,
    parallel: SingleProcess | None = None,
) -> float:
    """Images/s of `train.train_step` (the loop's step) on full minibatches; with `parallel`,
    this process's share of a distributed step (bench/scaling.py)."""
    batches = endless_batches(assembled, cfg.train.batch_size, cfg.seed)
    step = suite_step(assembled, cfg, parallel)
    for _ in range(warmup):
        step(*next(batches))
    return step_throughput(step, batches, steps, device)


def suite_step(
    assembled: Assembled, cfg: DictConfig, parallel: SingleProcess | None = None
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The loop's training step on a minibatch, with an optimiser of its own."""
    method = assembled.method
    optimizer = train.make_optimizer(cfg.train, method)
    method.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        train.train_step(method, optimizer, x, y, cfg.train.precision, parallel)

    return step


def step_throughput(
    step: Callable[[torch.Tensor, torch.Tensor], None],
    batches: Iterator,
    steps: int,
    device: torch.device,
) -> float:
    """Images/s of `step` over the next `steps` minibatches, timed between device syncs."""
    work = [next(batches) for _ in range(steps)]  # gathered before the clock starts
    train.synchronize(device)
    started = time.perf_counter()
    for x, y in work:
        step(x, y)
    train.synchronize(device)
    return sum(len(y) for _, y in work) / (time.perf_counter() - started)


def inference_throughput(
    assembled: Assembled, cfg: DictConfig, device: torch.device, steps: int, images: int
) -> float:
    """Images/s of `Method.predict` with `steps` steps over `images` test images."""
    method, solver = assembled.method, assembled.solver
    test_x = assembled.data.test_x[:images]
    generator = torch.Generator(device=device).manual_seed(cfg.eval.seed)
    method.eval()
    with autocast(cfg.train.precision, device):
        method.predict(test_x[: min(len(test_x), 8)], steps, solver, generator)  # warm-up
        train.synchronize(device)
        started = time.perf_counter()
        for batch in test_x.split(cfg.eval.batch_size):
            method.predict(batch, steps, solver, generator)
        train.synchronize(device)
    return len(test_x) / (time.perf_counter() - started)


def peak_memory(device: torch.device, resident_gb: float | None = None) -> tuple[float, str]:
    """Peak memory (GB) so far and what it measures: on CUDA, above `resident_gb`."""
    if device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(device) / 1e9 - (resident_gb or 0.0)
        return allocated, "peak device memory allocated in training, above the resident"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kib * 1024 / 1e9, "peak host memory (process RSS so far)"
