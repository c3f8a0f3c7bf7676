"""Checkpoints: everything a run needs to continue bit for bit, as an MLflow artifact.

A checkpoint holds the weights, the optimiser state, the loop's position (epochs completed and,
when a signal stopped the run mid-epoch, the minibatches done in the epoch in progress with their
loss sums), the cumulative training time, the accuracy history, and the state of every random
generator the loop draws from: torch's CPU and CUDA generators and the shuffling generator (its
state now and at the start of the epoch in progress, so the epoch's permutation can be drawn
again). Evaluation seeds its own generators from `eval.seed` and needs nothing saved.

Two artifact slots, `checkpoint/slot-0.pt` and `checkpoint/slot-1.pt`, take turns; the run's
`checkpoint` tag names the slot last written in full, and is set only after the upload. A crash
while writing therefore leaves the tag on the previous, complete checkpoint, whatever the artifact
store (a local folder copies files in place, it does not rename them); disk use stays at two
checkpoints however long the run.

A distributed run (distributed.py) writes one checkpoint, from rank 0, after each block's owner
has shared it: the weights once, and for each rank its optimiser state, generators and loss sums
(a block-parallel rank holds the optimiser state of its own blocks only). It continues on as many
processes as wrote it.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.tracking import MlflowClient
from torch.utils._pytree import tree_map

from noprop_exp.distributed import ONE_PROCESS, World

CHECKPOINT_TAG = "checkpoint"  # value: "<artifact path>@<epoch>.<step>"
SLOTS = ("checkpoint/slot-0.pt", "checkpoint/slot-1.pt")


@dataclass
class LoopState:
    """Where the training loop is; what the loop itself carries between epochs."""

    epoch: int = 0  # epochs completed
    step: int = 0  # minibatches done in epoch `epoch + 1` (0: at an epoch boundary)
    train_time_s: float = 0.0  # cumulative, the epoch in progress included
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # of the epoch in progress
    history: list[dict[str, float]] = field(default_factory=list)  # acc_vs_time.json's rows
    epoch_shuffle_state: torch.Tensor | None = None  # the shuffler at the epoch's start


def rng_state(shuffle: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], shuffle: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    shuffle.set_state(state["shuffle"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def on_cpu(state: Any) -> Any:
    """`state` with its tensors moved to the CPU, to travel between processes."""
    return tree_map(lambda v: v.cpu() if isinstance(v, torch.Tensor) else v, state)


def save_checkpoint(
    run_id: str | None,
    method: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    shuffle: torch.Generator,
    loop: LoopState,
    world: World = ONE_PROCESS,
) -> str | None:
    """Write the checkpoint into the slot not named by the run's tag, then point the tag at it;
    returns the tag's new value. Every process of a distributed run calls it (with the blocks
    gathered); rank 0 writes, the others return None."""
    own = {"optimizer": optimizer.state_dict(), "rng": rng_state(shuffle), "sums": loop.sums}
    ranks = world.gather(on_cpu(own) if world.size > 1 else own)
    if not world.is_main:
        return None
    client = MlflowClient()
    current = client.get_run(run_id).data.tags.get(CHECKPOINT_TAG, "")
    slot = SLOTS[1] if current.startswith(SLOTS[0]) else SLOTS[0]
    payload = {"format": 2, "loop": asdict(loop), "method": method.state_dict(), "ranks": ranks}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(slot).name
        torch.save(payload, path)
        mlflow.log_artifact(str(path), str(Path(slot).parent))
    value = f"{slot}@{loop.epoch}.{loop.step}"
    client.set_tag(run_id, CHECKPOINT_TAG, value)
    return value


def has_checkpoint(tags: dict[str, str]) -> bool:
    return CHECKPOINT_TAG in tags


def load_checkpoint(
    run_id: str,
    method: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    shuffle: torch.Generator,
    world: World = ONE_PROCESS,
) -> LoopState:
    """Restore the run's last complete checkpoint into the objects given; returns the loop's
    state. Call after everything that draws random numbers before training. Every process of a
    distributed run calls it; rank 0 reads the checkpoint and hands it to the others."""
    payload = None
    if world.is_main:
        client = MlflowClient()
        slot = client.get_run(run_id).data.tags[CHECKPOINT_TAG].partition("@")[0]
        with tempfile.TemporaryDirectory() as folder:
            path = client.download_artifacts(run_id, slot, folder)
            payload = torch.load(path, map_location="cpu", weights_only=True)
    payload = world.broadcast(payload)
    loop = LoopState(**payload["loop"])
    # Format 1: one process's checkpoint, written before distributed runs existed. A run
    # continues on as many processes as wrote it (resume.py checks).
    ranks = payload.get("ranks") or [{**payload, "sums": loop.sums}]
    own = ranks[world.rank]
    method.load_state_dict(payload["method"])
    optimizer.load_state_dict(own["optimizer"])
    set_rng_state(own["rng"], shuffle)
    device = next(method.parameters()).device
    loop.sums = {name: value.to(device) for name, value in own["sums"].items()}
    return loop
