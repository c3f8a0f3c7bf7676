"""Train one method on one dataset and record it in MLflow. Hydra entry point: `noprop-train`.

Reads top to bottom: decide whether to start, continue or skip a run (`train.resume`), assemble
the run from the config, open the MLflow run (restoring its checkpoint when continuing), then for
each epoch train on every minibatch (timed, evaluation excluded), evaluate on the test set every
`eval.every` epochs, log, checkpoint every `train.checkpoint_every` epochs; at the end log the
weights. SIGTERM or Ctrl-C stops the loop after its minibatch with a checkpoint (lifecycle.py).
One epoch is one pass over the training set; on each minibatch the method takes the optimiser
steps it asks for (NoProp-DT: all T blocks at once, then its extra head steps).

Started by torchrun, every process runs this loop on the same minibatches; `parallel`
(distributed.py) splits the work, sums gradients and gathers the model, and rank 0 alone
records the run, evaluates and draws.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Mapping

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import Tensor, nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from noprop_exp.assemble import assemble, resolve_device
from noprop_exp.checkpoint import LoopState, load_checkpoint, save_checkpoint
from noprop_exp.config import (  # importing registers the schema
    CONF_DIR,
    Device,
    LrSchedule,
    OptimizerName,
    Precision,
)
from noprop_exp.console import announce, summary_line, timed
from noprop_exp.data import DataSplits
from noprop_exp.distributed import (
    ONE_PROCESS,
    WORLD_SIZE_PARAM,
    SingleProcess,
    World,
    join,
    leave,
    parallel_training,
)
from noprop_exp.evaluation import Accuracy, accuracy_on_split
from noprop_exp.lifecycle import Heartbeat, RunStopped, pass_on, stop_on_signals
from noprop_exp.precision import autocast, precision_on
from noprop_exp.resume import command_line_keys, plan_run
from noprop_exp.tracking import tracked_run, untracked
from noprop_exp.validation import check_run_config, check_search_objective
from noprop_exp.variants.base import Diagnostics, Loss, Method

log = logging.getLogger(__name__)


def make_optimizer(cfg: DictConfig, method: Method) -> torch.optim.Optimizer:
    optimizers = {OptimizerName.adam: torch.optim.Adam, OptimizerName.adamw: torch.optim.AdamW}
    optimizer = optimizers[OptimizerName(cfg.optimizer)]
    # One fused kernel over all parameters, on CUDA and on the CPU (torch >= 2.4): measured on
    # the 2-core CPU (1 thread), a dt AdamW step took 11-22 ms fused, 160-460 ms per-parameter.
    fused = True if cfg.fused_optimizer else None  # None: torch's default implementation
    return optimizer(method.parameter_groups(cfg.weight_decay), lr=cfg.lr, fused=fused)


def learning_rate(cfg: DictConfig, minibatches_done: int, minibatches_in_run: int) -> float:
    """`train.lr_schedule`'s rate for the next minibatch: a function of the run's position
    alone, so a resumed run continues on the same curve (raising train.epochs stretches it)."""
    if LrSchedule(cfg.lr_schedule) is LrSchedule.constant:
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * minibatches_done / minibatches_in_run))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def compile_networks(method: Method) -> None:
    """train.compile: torch.compile, in place, each network the method calls (each submodule
    with parameters; each item of a ModuleList); the loop, solvers and the method's own Python
    stay eager. The state dict's keys do not change."""
    for child in method.children():
        for module in child if isinstance(child, nn.ModuleList) else [child]:
            if next(module.parameters(), None) is not None:
                module.compile()


def train_step(
    method: Method,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    precision: str,
    parallel: SingleProcess | None = None,
) -> tuple[Tensor, Diagnostics]:
    """One minibatch: an optimiser step on each loss the method yields, in order; returns the
    first (the method's main loss; later ones are auxiliary steps) and its diagnostics.

    The method's forward passes run under `autocast`, the backward passes outside it, as
    torch.autocast's documentation recommends. Nothing here waits for the device. With several
    processes, `parallel` gives each its share and sums the gradients before each step.
    """
    parallel = parallel or SingleProcess(ONE_PROCESS, method)
    parallel.begin_minibatch(len(y))
    losses = method.update_losses(x, y)
    main = None
    while True:
        with autocast(precision, x.device):
            item = next(losses, None)
        if item is None:
            return main
        loss, diagnostics = item
        optimizer.zero_grad(set_to_none=True)
        total = backward(loss, parallel, precision, x.device)
        parallel.after_backward()
        optimizer.step()
        if main is None:
            main = (total, diagnostics)


def backward(loss: Loss, parallel: SingleProcess, precision: str, device: torch.device) -> Tensor:
    """Backpropagate a loss, or each term of a lazily computed sum as it comes (its forward
    under autocast); returns the (detached) loss."""
    if isinstance(loss, Tensor):
        parallel.scale(loss).backward()
        return loss.detach()
    total = None
    while True:
        with autocast(precision, device):
            term = next(loss, None)
        if term is None:
            return total
        parallel.scale(term).backward()
        total = term.detach() if total is None else total + term.detach()


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that wall-clock times measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_finite(value: float, where: str, precision: str) -> None:
    if not math.isfinite(value):
        advice = "lower train.lr"
        if Precision(precision) is not Precision.fp32:
            advice += ", or try train.precision=fp32"
        raise FloatingPointError(f"training loss became {value} {where}; {advice}")


def epoch_meaning(data: DataSplits, batches_per_epoch: int, method: Method) -> dict[str, int]:
    """Run parameters that say what one epoch is, so runs of different sizes compare."""
    return {
        "epoch.train_images": len(data.train_y),
        "epoch.minibatches": batches_per_epoch,
        "epoch.optimizer_steps": batches_per_epoch * method.optimizer_steps_per_minibatch(),
        "data.val_images": 0 if data.val_y is None else len(data.val_y),
        "data.test_images": len(data.test_y),
    }


def run(cfg: DictConfig, choices: Mapping[str, str] | None = None) -> dict[str, float]:
    """Train and evaluate as `cfg` says; returns the last epoch's metrics.

    `choices` (config group -> option) become MLflow tags; by default Hydra's runtime choices.
    `train.resume` may continue an earlier run or skip a finished one (`resume.py`).
    """
    if choices is None:
        choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    world, device = join(resolve_device(Device(cfg.device).value))
    try:
        return train(cfg, choices, world, device)
    finally:
        leave(world)


def train(
    cfg: DictConfig, choices: Mapping[str, str], world: World, device: torch.device
) -> dict[str, float]:
    """`run` in one process of `world` (a world of one without torchrun)."""
    plan = plan_run(cfg, command_line_keys(), world.size) if world.is_main else None
    plan = world.broadcast(plan)
    if plan.finished is not None:
        return plan.finished
    cfg = plan.cfg
    check_run_config(cfg)
    precision = cfg.train.precision
    torch.manual_seed(cfg.seed)
    run_parts = assemble(cfg, device)
    data, method, solver = run_parts.data, run_parts.method, run_parts.solver
    parallel = parallel_training(world, method)
    if cfg.train.compile:
        compile_networks(method)
    steps = cfg.eval.steps or method.default_steps()
    # Fail on an unusable solver or step count now, not after hours of training; in eval mode,
    # so that these test images leave batch norm's running statistics alone.
    method.eval()
    for n in {steps, *cfg.eval.steps_sweep}:
        method.predict(data.test_x[:2], n, solver)
    optimizer = make_optimizer(cfg.train, method)
    shuffle = torch.Generator(device=device).manual_seed(cfg.seed)
    batches_per_epoch = math.ceil(len(data.train_y) / cfg.train.batch_size)
    minibatches_in_run = cfg.train.epochs * batches_per_epoch

    def split_accuracy(num_steps: int, split: str = "test", by_step: bool = False) -> Accuracy:
        what = f"evaluating {len(data.split(split)[1]):,} {split} images at {num_steps} steps"
        with timed(f"{what}, {cfg.eval.repeats} run(s)"), autocast(cfg.train.precision, device):
            return accuracy_on_split(
                method, data, cfg.eval, num_steps, solver, split=split, by_step=by_step
            )

    def checkpoint() -> None:
        parallel.gather_model()
        save_checkpoint(tracker.run_id, method, optimizer, shuffle, loop, world)

    with (
        (
            tracked_run(cfg, choices, plan.tags, plan.run_id) if world.is_main else untracked()
        ) as tracker,
        stop_on_signals() as stop,
        logging_redirect_tqdm(),  # log lines print above the progress bar, not through it
    ):
        if world.is_main:
            log.info("MLflow run %s: %s on %s, %s", tracker.run_id, method.name, data.name, device)
        tracker.log_params(epoch_meaning(data, batches_per_epoch, method))
        loop, metrics = LoopState(), {}
        read_out = None  # the last evaluation's read-outs at every step, for the pictures
        if plan.run_id is not None:
            # After every draw from the generators above, so that they continue from the state
            # the run was stopped in.
            loop = load_checkpoint(plan.run_id, method, optimizer, shuffle, world)
            metrics = tracker.latest_metrics()
            log.info("continuing epoch %d after %d minibatches", loop.epoch + 1, loop.step)
        tracker.log_params(
            {
                WORLD_SIZE_PARAM: world.size,
                "distributed.mode": parallel.mode,
                "train.precision_on": precision_on(precision, device).value,
            }
        )
        heartbeat = Heartbeat(enabled=world.is_main)
        heartbeat.beat()
        progress = tqdm(
            total=minibatches_in_run,
            initial=loop.epoch * batches_per_epoch + loop.step,
            disable=None if world.is_main else True,
            unit="batch",
        )
        for epoch in range(loop.epoch + 1, cfg.train.epochs + 1):
            method.train()
            if loop.step == 0:
                loop.sums, loop.epoch_shuffle_state = {}, shuffle.get_state()
            else:  # resumed mid-epoch: draw the epoch's permutation again, skip the done batches
                shuffle.set_state(loop.epoch_shuffle_state)
            synchronize(device)
            if device.type == "cuda":  # Table 2: the training steps' peak above what is resident
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            started = time.perf_counter()
            progress.unpause()  # the bar's rate counts training only, not the epoch's end
            batches = data.train_minibatches(cfg.train.batch_size, shuffle)
            for x, y in itertools.islice(batches, loop.step, None):
                step = loop.step
                done = (epoch - 1) * batches_per_epoch + step
                set_learning_rate(optimizer, learning_rate(cfg.train, done, minibatches_in_run))
                main_loss, diagnostics = train_step(method, optimizer, x, y, precision, parallel)
                loop.step += 1
                for name, value in {"train_loss": main_loss, **diagnostics}.items():
                    loop.sums[name] = loop.sums.get(name, 0.0) + value
                if step % cfg.train.log_every == 0:  # syncs with the device: not every step
                    check_finite(main_loss.item(), f"at epoch {epoch}, batch {step}", precision)
                    progress.set_postfix(epoch=epoch, loss=f"{main_loss.item():.4f}", refresh=False)
                    heartbeat.maybe_beat()
                progress.update()
                if world.any(bool(stop)):  # every process stops after the same minibatch
                    stop.signal_name = stop.signal_name or "SIGTERM"
                    break
            synchronize(device)
            loop.train_time_s += time.perf_counter() - started
            if stop and loop.step < batches_per_epoch:
                checkpoint()
                raise RunStopped(stop.signal_name, epoch)

            sums = parallel.epoch_sums(loop.sums)
            metrics = {k: (total / batches_per_epoch).item() for k, total in sums.items()}
            check_finite(metrics["train_loss"], f"on average in epoch {epoch}", precision)
            metrics["train_time_s"] = loop.train_time_s
            metrics["lr"] = optimizer.param_groups[0]["lr"]  # the epoch's last minibatch's
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) - resident
                metrics["peak_mem_gb"] = peak / 1e9
            evaluate = epoch % cfg.eval.every == 0 or epoch == cfg.train.epochs
            if evaluate:
                parallel.gather_model()
            if evaluate and world.is_main:
                accuracies = {}
                started_eval = time.perf_counter()
                if data.val_y is not None:
                    held_out = split_accuracy(steps, "val")
                    accuracies |= {"val_acc": held_out.mean, "val_acc_se": held_out.se}
                # The last evaluation reads out every step as well: the pictures draw from it.
                final = cfg.eval.pictures and epoch == cfg.train.epochs
                result = split_accuracy(steps, by_step=final)
                metrics["time/eval_s"] = time.perf_counter() - started_eval
                read_out = result.by_step
                accuracies |= {"test_acc": result.mean, "test_acc_se": result.se}
                metrics |= accuracies | method.diagnostics()
                loop.history.append(
                    {"epoch": epoch, "train_time_s": loop.train_time_s, **accuracies}
                )
                tracker.log_table(loop.history, "acc_vs_time.json")
                progress.set_postfix(
                    epoch=epoch, loss=f"{metrics['train_loss']:.4f}", test_acc=f"{result.mean:.2f}"
                )
            tracker.log_metrics(metrics, step=epoch)
            if world.is_main:
                log.info(
                    "epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
                )
            loop.epoch, loop.step = epoch, 0
            every = cfg.train.checkpoint_every
            if stop or epoch == cfg.train.epochs or (every and epoch % every == 0):
                checkpoint()
            heartbeat.beat(epochs_done=epoch)
            if stop:
                raise RunStopped(stop.signal_name, epoch)
        progress.close()
        if stop:  # before the evaluations and pictures of the end, which may take long
            raise RunStopped(stop.signal_name, loop.epoch)
        if not world.is_main:  # the model is rank 0's to evaluate, log and draw
            return metrics

        if cfg.eval.steps_sweep:
            started_sweep = time.perf_counter()
            by_steps = []
            for n in cfg.eval.steps_sweep:
                swept = split_accuracy(n)
                by_steps.append({"steps": n, "test_acc": swept.mean, "test_acc_se": swept.se})
            swept_metrics = {f"test_acc_steps/{r['steps']}": r["test_acc"] for r in by_steps}
            swept_metrics["time/steps_sweep_s"] = time.perf_counter() - started_sweep
            metrics |= swept_metrics
            tracker.log_metrics(swept_metrics, step=cfg.train.epochs)
            tracker.log_table(by_steps, "acc_vs_steps.json")
        if cfg.mlflow.log_model:
            tracker.log_state_dict(method)
        if cfg.eval.pictures:
            # Imported here: matplotlib is loaded only by runs that draw.
            from noprop_exp.pictures.logged import log_pictures

            started_pictures = time.perf_counter()
            with timed("drawing the pictures"):
                log_pictures(cfg, run_parts, tracker.run_id, by_step=read_out)
            metrics["time/pictures_s"] = time.perf_counter() - started_pictures
            tracker.log_metrics({"time/pictures_s": metrics["time/pictures_s"]}, cfg.train.epochs)
    announce(summary_line(tracker.run_id, tracker.experiment_id, cfg.mlflow.tracking_uri, metrics))
    return metrics


# An absolute path: the console script imports this module as a package, where Hydra would
# resolve a relative path inside the package rather than next to it.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Returns the objective a search maximises (hydra/sweeper=search): validation accuracy,
    None without a validation split, so that no search can select on the test set."""
    check_search_objective(cfg, HydraConfig.get().sweeper)
    try:
        return run(cfg).get("val_acc")
    except RunStopped as stopped:
        log.warning("stopped by %s; continue with train.resume=<run id> or =auto", stopped)
        pass_on(stopped)


if __name__ == "__main__":
    main()
