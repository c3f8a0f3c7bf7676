"""Training on several processes (torch.distributed, gloo on the CPU): the same parameters as one
process after the same steps, for block-parallel dt and data-parallel ct, fm and adjoint; one
MLflow run per torchrun launch, recorded by rank 0; a distributed run continues on resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from mlflow.tracking import MlflowClient

from noprop_exp import train
from noprop_exp.assemble import assemble
from noprop_exp.config import compose
from noprop_exp.distributed import World, join, leave, parallel_training
from noprop_exp.resume import ResumeError
from noprop_exp.train import train_step
from tests.processes import free_port, multirun, parent_and_children

# Dropout off: its masks are drawn per process, so only without it can steps match exactly.
EXACT = ["debug=tiny", "backbone.dropout=0", "dataset.train_size=64"]
VARIANTS = {
    "dt": ["variant=dt", "variant.method.num_blocks=3", "variant.method.head_updates=2"],
    "ct": ["variant=ct", "variant.method.head_updates=2"],
    "fm": ["variant=fm", "embedding=learned", "embedding.dim=8"],
    "adjoint": ["variant=adjoint", "variant.method.train_steps=3"],
    "backprop": ["variant=backprop", "variant.method.num_blocks=3"],
}
BATCH = 31  # shares of 16 and 15 examples: the loss weights must be the shares, not 1/2
STEPS = 2


def train_steps(rank: int, size: int, port: int, out: Path) -> None:
    """STEPS minibatches of every variant in a world of `size`; saves each rank's parameters."""
    torch.set_num_threads(1)
    if size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank))
    world, device = join(torch.device("cpu"))
    states = {}
    for name, overrides in VARIANTS.items():
        cfg, _ = compose([*EXACT, *overrides])
        torch.manual_seed(0)
        parts = assemble(cfg, device)
        method, data = parts.method, parts.data
        parallel = parallel_training(world, method)
        # SGD: a step linear in the gradient, so any error in a share's weight shows (Adam's
        # first steps hardly depend on the gradients' scale).
        optimizer = torch.optim.SGD(method.parameters(), lr=0.05)
        method.train()
        for step in range(STEPS):
            batch = slice(step * BATCH, (step + 1) * BATCH)
            train_step(
                method, optimizer, data.train_x[batch], data.train_y[batch], "fp32", parallel
            )
        parallel.gather_model()
        states[name] = (parallel.mode, method.state_dict())
    torch.save(states, out / f"rank{rank}-of-{size}.pt")
    leave(world)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Parameters after STEPS steps on one process and on two (spawned, gloo)."""
    out = tmp_path_factory.mktemp("distributed")
    threads = torch.get_num_threads()
    train_steps(0, 1, 0, out)
    torch.set_num_threads(threads)
    mp.start_processes(train_steps, args=(2, free_port(), out), nprocs=2, start_method="spawn")
    return out


def load(out: Path, rank: int, size: int) -> dict:
    return torch.load(out / f"rank{rank}-of-{size}.pt", weights_only=False)


@pytest.mark.parametrize("variant", ["dt", "ct", "fm", "adjoint"])
def test_two_processes_train_the_parameters_one_process_does(trained, variant):
    one = load(trained, 0, 1)[variant][1]
    mode, first = load(trained, 0, 2)[variant]
    _, second = load(trained, 1, 2)[variant]
    assert mode == ("block" if variant == "dt" else "data")
    for name, value in one.items():
        torch.testing.assert_close(first[name], value, rtol=1e-4, atol=1e-5, msg=name)
        assert torch.equal(first[name], second[name]), name  # the ranks hold the same model


def test_the_ranks_of_data_parallel_backprop_hold_one_model(trained):
    """backprop's batch norm normalises over each rank's share (SyncBatchNorm needs a GPU),
    so it is not one process's step; but every rank must hold the same parameters."""
    mode, first = load(trained, 0, 2)["backprop"]
    _, second = load(trained, 1, 2)["backprop"]
    one = load(trained, 0, 1)["backprop"][1]
    assert mode == "data"
    parameters = [n for n in first if "running" not in n and "num_batches" not in n]
    for name in parameters:
        assert torch.equal(first[name], second[name]), name
    assert any(not torch.equal(one[n], first[n]) for n in parameters)  # it did train apart


def test_a_rank_owns_a_contiguous_share_and_every_item_one_owner():
    for n, size in [(10, 2), (10, 3), (31, 2), (3, 3)]:
        shares = [World(rank, size).share(n) for rank in range(size)]
        assert [i for share in shares for i in share] == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert all(World(0, size).owner(n, i) == r for r, s in enumerate(shares) for i in s)


def test_block_parallel_dt_refuses_fused_blocks_and_more_processes_than_blocks(compose_config):
    cfg, _ = compose_config([*EXACT, *VARIANTS["dt"]])
    method = assemble(cfg, torch.device("cpu")).method
    with pytest.raises(ValueError, match="at most T"):
        parallel_training(World(0, 4), method)
    cfg, _ = compose_config([*EXACT, *VARIANTS["dt"], "variant.method.fused=true"])
    method = assemble(cfg, torch.device("cpu")).method
    with pytest.raises(ValueError, match="fused=false"):
        parallel_training(World(0, 2), method)


# ---------------------------------------------------------------- torchrun, end to end

SMALL_RUN = [
    "debug=tiny",
    "dataset.train_size=128",
    "dataset.test_size=64",
    "train.batch_size=32",
    "eval.pictures=false",
    "backbone.dropout=0",
]


def torchrun(tracking_uri: str, cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`noprop-train` on 2 processes; SMALL_RUN unless continuing a run (train.resume)."""
    resuming = any(o.startswith("train.resume=") for o in overrides)
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"),
        *("--master-port", str(free_port()), "-m", "noprop_exp.train"),
        *([] if resuming else SMALL_RUN),
        f"mlflow.tracking_uri={tracking_uri}",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-8000:]
    return done


def finished_runs(tracking_uri: str) -> list:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("noprop")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])


def test_torchrun_records_one_run_from_rank_0_and_resumes_it_on_two_processes(
    tracking_uri, tmp_path
):
    """dt block-parallel: one epoch, then the same run raised to two epochs (resumed from the
    2-process checkpoint) ends where a 2-epoch 2-process run does."""
    dt = VARIANTS["dt"]
    torchrun(tracking_uri, tmp_path, *dt, "train.epochs=1")
    (run,) = finished_runs(tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["distributed.world_size"] == "2"
    assert run.data.params["distributed.mode"] == "block"
    assert "test_acc" in run.data.metrics and "loss/block_3" in run.data.metrics
    one_process = [f"mlflow.tracking_uri={tracking_uri}", f"train.resume={run.info.run_id}"]
    cfg, choices = compose([*SMALL_RUN, *dt, *one_process, "train.epochs=2"])
    with pytest.raises(ResumeError, match="torchrun --nproc-per-node 2"):
        train.run(cfg, choices)  # refused before the run is touched
    torchrun(tracking_uri, tmp_path, "train.epochs=2", f"train.resume={run.info.run_id}")
    torchrun(tracking_uri, tmp_path, *dt, "train.epochs=2", "mlflow.experiment_name=reference")
    client = MlflowClient(tracking_uri)
    (reference,) = client.search_runs([client.get_experiment_by_name("reference").experiment_id])
    (resumed,) = finished_runs(tracking_uri)
    for name in ("test_acc", "train_loss", "loss/head", "loss/block_1"):
        assert resumed.data.metrics[name] == pytest.approx(reference.data.metrics[name]), name


def test_torchrun_trains_ct_data_parallel(tracking_uri, tmp_path):
    torchrun(tracking_uri, tmp_path, "variant=ct", "train.epochs=1", "eval.steps=4")
    (run,) = finished_runs(tracking_uri)
    assert run.info.status == "FINISHED" and run.data.params["distributed.mode"] == "data"
    assert run.data.metrics["test_acc"] > 0 and "loss/denoise" in run.data.metrics


def test_a_submitit_job_of_two_tasks_is_one_block_parallel_run(tracking_uri, tmp_path):
    """hydra/launcher=slurm_local (submitit's local executor, Slurm's code path) with
    tasks_per_node=2: its two tasks are the two processes of one run."""
    result = multirun(
        tmp_path,
        tracking_uri,
        "hydra/launcher=slurm_local",
        "hydra.launcher.tasks_per_node=2",
        *VARIANTS["dt"],
        "backbone.dropout=0",
        "seed=0",
    )
    assert result.returncode == 0, result.stderr[-5000:]
    parent, (child,) = parent_and_children(tracking_uri, order_by="seed")
    assert child.info.status == "FINISHED" and parent.info.status == "FINISHED"
    assert child.data.params["distributed.world_size"] == "2"
    assert child.data.params["distributed.mode"] == "block"
