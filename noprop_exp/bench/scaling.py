"""`noprop-bench --processes 1,2`: training throughput on 1, 2, ... processes (torchrun), and
the scaling efficiency, images/s on N processes / (N x images/s on 1).

Each figure is its own `torchrun --nproc-per-node N` launch of this module, which assembles the
variant as `noprop-train` does, trains as the loop does (block-parallel dt, data-parallel
otherwise: `noprop_exp.distributed`) and has rank 0 print one line. On the CPU every launch uses
all cores: each of the N processes gets cores / N threads, so the table compares spreading the
work over processes with spreading it over one process's threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence

import torch

from noprop_exp.assemble import assemble, resolve_device
from noprop_exp.bench import measure
from noprop_exp.config import Device, compose
from noprop_exp.distributed import join, leave, parallel_training

MARK = "noprop-bench-scaling: "  # the line rank 0 prints


def measure_scaling(
    overrides: Sequence[str], processes: Sequence[int], warmup: int, steps: int
) -> list[dict[str, float]]:
    """One row per process count: processes, threads each, images/s, speedup, efficiency."""
    rows = []
    for count in processes:
        threads = max(1, (os.cpu_count() or 1) // count)
        command = [
            *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(count)),
            "--standalone",  # a rendezvous on a free local port
            *("-m", "noprop_exp.bench.scaling", str(warmup), str(steps), *overrides),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"{count} process(es) failed:\n{done.stderr[-4000:]}")
        rows.append(
            {"processes": count, "threads_each": threads, **json.loads(lines[0][len(MARK) :])}
        )
    single = rows[0]["train_img_s"] / rows[0]["processes"]
    for row in rows:
        row["speedup"] = row["train_img_s"] / rows[0]["train_img_s"]
        row["efficiency"] = row["train_img_s"] / (row["processes"] * single)
    return rows


def worker(warmup: int, steps: int, overrides: list[str]) -> None:
    """One process of a launch: train `steps` timed minibatches; rank 0 prints images/s."""
    cfg, _ = compose(overrides)
    world, device = join(resolve_device(Device(cfg.device).value))
    torch.manual_seed(cfg.seed)
    assembled = assemble(cfg, device)
    parallel = parallel_training(world, assembled.method)
    images_s = measure.training_throughput(assembled, cfg, device, warmup, steps, parallel)
    if world.is_main:
        print(MARK + json.dumps({"mode": parallel.mode, "train_img_s": images_s}), flush=True)
    leave(world)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
