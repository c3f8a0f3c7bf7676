"""noprop-bench: how fast each variant trains and infers on this machine, as a table.

Every variant is composed by Hydra and assembled exactly as `noprop-train` does it, so the config
switches (`train.precision`, `train.compile`, `variant.method.fused`, ...) apply; `--override`
passes more. Per variant:

- training throughput: images/s of the loop's own `train_step` (every optimiser step the method
  asks for, e.g. DT's extra head steps) over `--train-steps` full minibatches after
  `--warmup-steps`, timed between device syncs;
- inference throughput at each of `--infer-steps` (default 10 and 1000): images/s of
  `Method.predict` over `--infer-images` test images in `eval.batch_size` batches. DT and the
  backprop baseline infer with their T blocks only: other step counts are "n/a";
- time to the target test accuracy (not with `--smoke`): an ordinary training run (`train.run`,
  logged in MLflow as a child of the benchmark's run) of as many epochs as `--time-budget-s`
  allows at the measured throughput, evaluated every epoch. The time is the loop's own
  `train_time_s` (evaluation excluded) at the first epoch whose test accuracy reached the target,
  read afterwards from the run's metrics: no early stopping, so the run is an ordinary one.
  Reading the test set to stop or select would be test-set model selection when the accuracy is
  reported; here the time to reach it is the measurement.
- peak memory: on CUDA, the peak allocated during the training steps above what was resident
  before them (`resident_gb`: the dataset on the device, weights), as the paper's Table 2 counts
  it; on the CPU, the process's peak resident set (host memory, so far in the process: it never
  goes down).

The machine (CPU model, GPU name), torch version and the table go to `<out>.csv`, `<out>.md`
and an MLflow run in experiment `noprop-bench`. The measurements themselves are in
`noprop_exp.bench.measure`.

`--processes 1,2,...` measures instead how training scales over processes under torchrun
(`noprop_exp.bench.scaling`): `<out>-scaling.csv/.md`, one row per variant and process count.
`--vs-plain` measures instead the suite's training step against a hand-written plain PyTorch
loop of the same maths, side by side (`noprop_exp.bench.versus`): `<out>-vs-plain.csv/.md`.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shlex
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from noprop_exp import train
from noprop_exp.assemble import assemble, resolve_device
from noprop_exp.bench import measure, plain, scaling, versus
from noprop_exp.config import CONF_DIR, Device, compose, default_tracking_uri
from noprop_exp.report.tables import markdown_table
from noprop_exp.store import accuracy_histories, experiment_id
from noprop_exp.tracking import PARENT_RUN_ENV

EXPERIMENT = "noprop-bench"
# The targets (paper Table 1, MNIST); other variants get one with --target-acc NAME=ACC.
DEFAULT_TARGETS = {"dt": 99.4, "ct": 98.0, "fm": 99.0}


@dataclass
class Row:
    """One variant's figures; None where not measured (the note says why)."""

    variant: str
    train_img_s: float | None = None
    infer_img_s: dict[int, float | None] = field(default_factory=dict)
    target_acc: float | None = None
    time_to_target_s: float | None = None
    best_acc: float | None = None
    peak_mem_gb: float | None = None
    memory: str = ""  # what peak_mem_gb measures
    resident_gb: float | None = None
    notes: list[str] = field(default_factory=list)

    def flat(self) -> dict[str, object]:
        """Columns of the table, inference throughput one column per step count."""
        columns = asdict(self)
        del columns["infer_img_s"]
        columns["notes"] = "; ".join(self.notes)
        for steps, value in self.infer_img_s.items():
            columns[f"infer_img_s_{steps}"] = value
        order = ["variant", "train_img_s", *(f"infer_img_s_{s}" for s in self.infer_img_s)]
        return {k: columns[k] for k in order} | {k: v for k, v in columns.items() if k not in order}


def available_variants() -> list[str]:
    """Every variant with a config file in conf/variant."""
    return sorted(path.stem for path in (CONF_DIR / "variant").glob("*.yaml"))


def first_reaching(history: Sequence[tuple[float, float]], target: float) -> float | None:
    """Training time of the first (time, accuracy) evaluation at or above `target`, else None."""
    return next((seconds for seconds, acc in history if acc >= target), None)


def time_to_target(
    cfg: DictConfig,
    choices: dict[str, str],
    row: Row,
    train_images: int,
    budget_s: float,
    parent_run_id: str,
) -> None:
    """Train as many epochs as `budget_s` allows at the measured throughput; fill in `row`."""
    epoch_s = train_images / row.train_img_s
    if epoch_s > 1.5 * budget_s:
        row.notes.append(
            f"time to target skipped: one epoch takes ~{epoch_s:.0f} s, more than the "
            f"{budget_s:.0f} s budget; lower --train-size or raise --time-budget-s"
        )
        return
    cfg.train.epochs = max(1, math.floor(budget_s / epoch_s))
    cfg.eval.every = 1
    if "pictures" in cfg.eval:  # the pictures of a run are not part of its speed
        cfg.eval.pictures = False
    os.environ[PARENT_RUN_ENV] = parent_run_id
    try:
        train.run(cfg, choices)
    finally:
        del os.environ[PARENT_RUN_ENV]
    run_id = mlflow.last_active_run().info.run_id
    logged = accuracy_histories(MlflowClient(cfg.mlflow.tracking_uri), [run_id])
    history = list(zip(logged.train_time_s, logged.test_acc, strict=True))
    row.best_acc = max(acc for _, acc in history)
    row.time_to_target_s = first_reaching(history, row.target_acc)
    if row.time_to_target_s is None:
        row.notes.append(
            f"target not reached in {history[-1][0]:.0f} s ({cfg.train.epochs} epochs), "
            f"best {row.best_acc:.2f}%"
        )
    row.notes.append(f"training run {run_id}")


def bench_variant(variant: str, args: argparse.Namespace, parent_run_id: str) -> Row:
    cfg, choices = compose(variant_overrides(variant, args))
    device = resolve_device(Device(cfg.device).value)
    row = Row(variant, target_acc=args.target_acc.get(variant))
    torch.manual_seed(cfg.seed)
    assembled = assemble(cfg, device)
    if cfg.train.compile:
        train.compile_networks(assembled.method)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        row.resident_gb = torch.cuda.memory_allocated(device) / 1e9
    row.train_img_s = measure.training_throughput(
        assembled, cfg, device, args.warmup_steps, args.train_steps
    )
    row.peak_mem_gb, row.memory = measure.peak_memory(device, row.resident_gb)
    train_images, test_images = len(assembled.data.train_y), len(assembled.data.test_y)
    images = min(args.infer_images or test_images, test_images)
    for steps in args.infer_steps:
        try:
            row.infer_img_s[steps] = measure.inference_throughput(
                assembled, cfg, device, steps, images
            )
        except ValueError as err:  # a method that cannot infer with this many steps says why
            row.infer_img_s[steps] = None
            row.notes.append(f"{steps} steps: n/a ({str(err).split(':')[0]})")
    row.notes.append(f"inference over {images} test images")
    del assembled
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.smoke or args.time_budget_s <= 0:
        row.notes.append("time to target not measured (--smoke or --time-budget-s 0)")
    elif row.target_acc is None:
        row.notes.append(f"no target accuracy: pass --target-acc {variant}=ACC")
    else:
        time_to_target(cfg, choices, row, train_images, args.time_budget_s, parent_run_id)
    return row


def variant_overrides(variant: str, args: argparse.Namespace) -> list[str]:
    """Hydra overrides of one variant's run: the options, then the user's `--override`s."""
    overrides = [
        f"variant={variant}",
        # smoke: the runs' own small preset (data, batch sizes), not sizes restated here
        "debug=tiny" if args.smoke else "dataset=mnist",
        f"device={args.device}",
        f"mlflow.tracking_uri={args.tracking_uri}",
        f"mlflow.experiment_name={EXPERIMENT}",
        "mlflow.log_model=false",
    ]
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    if args.data_root and not args.smoke:
        overrides.append(f"dataset.root={args.data_root}")
    if args.train_size:
        overrides.append(f"dataset.train_size={args.train_size}")
    for override in args.override:
        key = override.split("=", 1)[0]
        scope, setting = override.split(":", 1) if ":" in key else (variant, override)
        if scope == variant:
            overrides.append(setting)
    return overrides


def bench_cell(value: object) -> str:
    """Numbers to 3 significant figures, missing ones as n/a."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def report(rows: list[Row], machine: dict[str, str], command: str) -> tuple[pd.DataFrame, str]:
    return report_frame(pd.DataFrame([row.flat() for row in rows]), machine, command)


def report_frame(
    frame: pd.DataFrame, machine: dict[str, str], command: str
) -> tuple[pd.DataFrame, str]:
    """The table in markdown under what it was measured on and the command."""
    header = [
        "# noprop-bench",
        "",
        *(f"- {key}: {value}" for key, value in machine.items()),
        f"- command: `{command}`",
        "",
    ]
    return frame, "\n".join(header) + markdown_table(frame, bench_cell)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="noprop-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", help="comma-separated (default: every conf/variant/*.yaml)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--data-root", help="folder holding MNIST/raw (default: the config's)")
    parser.add_argument("--train-size", type=int, help="training images (default: all)")
    parser.add_argument(
        "--batch-size", type=int, help="training batch (default 128; smoke: debug=tiny's)"
    )
    parser.add_argument(
        "--target-acc",
        action="append",
        default=[],
        metavar="VARIANT=ACC",
        help=f"test accuracy (%%) to reach; defaults {DEFAULT_TARGETS}",
    )
    parser.add_argument("--time-budget-s", type=float, default=120.0, help="0: skip that part")
    parser.add_argument("--smoke", action="store_true", help="CI-sized (debug=tiny), seconds")
    parser.add_argument("--out", default="noprop-bench", help="writes OUT.csv and OUT.md")
    parser.add_argument(
        "--tracking-uri",
        default=default_tracking_uri(),
        help="MLflow store or server (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="[VARIANT:]KEY=VALUE",
        help="Hydra override for every variant, or only VARIANT's, e.g. train.precision=bf16",
    )
    parser.add_argument("--warmup-steps", type=int, help="untimed steps first (default 3; smoke 1)")
    parser.add_argument("--train-steps", type=int, help="timed steps (default 20; smoke 2)")
    parser.add_argument("--infer-steps", default="10,1000", help="comma-separated step counts")
    parser.add_argument("--infer-images", type=int, help="default: the test set (smoke 16)")
    parser.add_argument(
        "--processes", help="comma-separated process counts, e.g. 1,2: training scaling instead"
    )
    parser.add_argument(
        "--vs-plain",
        action="store_true",
        help=f"training speed against a plain PyTorch loop instead ({', '.join(plain.VARIANTS)})",
    )
    parser.add_argument(
        "--vs-step",
        action="append",
        default=[],
        metavar="NAME=FILE.py:FUNCTION",
        help="--vs-plain: another implementation's step in the turns too (bench/versus.py)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="--vs-plain: turns of each step")
    args = parser.parse_args(argv)
    if args.vs_step and not args.vs_plain:
        parser.error("--vs-step joins the --vs-plain table: add --vs-plain")
    try:
        args.vs_step = dict(versus.load_step_factory(spec) for spec in args.vs_step)
    except ValueError as err:
        parser.error(str(err))
    if args.processes:
        args.processes = [int(n) for n in args.processes.split(",")]

    known = available_variants()
    args.variants = args.variants.split(",") if args.variants else known
    if args.vs_plain:
        args.variants = [v for v in args.variants if v in plain.VARIANTS]
        if not args.variants:
            parser.error(f"--vs-plain compares {list(plain.VARIANTS)} only")
    unknown = sorted(set(args.variants) - set(known))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {known}")
    targets = dict(DEFAULT_TARGETS)
    for item in args.target_acc:
        name, _, value = item.partition("=")
        try:
            targets[name] = float(value)
        except ValueError:
            parser.error(f"--target-acc takes VARIANT=ACC, e.g. dt=99.4; got {item!r}")
    args.target_acc = targets
    args.infer_steps = [int(s) for s in args.infer_steps.split(",")]
    small, full = (None, 1, 2, 16), (128, 3, 20, None)  # smoke: debug=tiny's batch size
    defaults = small if args.smoke else full
    for name, default in zip(
        ("batch_size", "warmup_steps", "train_steps", "infer_images"), defaults, strict=True
    ):
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """noprop-bench: training and inference speed of each variant; see the module docstring."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    machine = measure.describe_machine(device)
    command = shlex.join(["noprop-bench", *(sys.argv[1:] if argv is None else argv)])
    if args.processes:
        side_table(args, machine, command, "scaling", scaling_rows)
        return
    if args.vs_plain:
        side_table(args, machine, command, "vs-plain", versus_rows)
        return
    client = MlflowClient(args.tracking_uri)
    bench_run = client.create_run(
        experiment_id(client, EXPERIMENT), run_name=f"noprop-bench {machine['gpu']}"
    )
    run_id = bench_run.info.run_id
    rows, failed = [], []
    try:
        for variant in args.variants:
            print(f"noprop-bench: {variant} ...", file=sys.stderr, flush=True)
            try:
                rows.append(bench_variant(variant, args, run_id))
            except Exception as err:  # one broken variant must not hide the others' figures
                traceback.print_exc()
                failed.append(variant)
                rows.append(Row(variant, notes=[f"failed: {type(err).__name__}: {err}"]))
        frame, markdown = report(rows, machine, command)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out.with_suffix(".csv"), index=False)
        out.with_suffix(".md").write_text(markdown)
        print(markdown)
        log_to_mlflow(client, run_id, rows, machine, args, out)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
    if failed:
        raise SystemExit(f"noprop-bench: failed for {', '.join(failed)} (see the notes column)")


def side_table(
    args: argparse.Namespace,
    machine: dict[str, str],
    command: str,
    name: str,
    rows_of: Callable[[str, argparse.Namespace], list[dict[str, object]]],
) -> None:
    """A table other than the main one (`--processes`, `--vs-plain`): `<out>-<name>.csv/.md`."""
    rows = []
    for variant in args.variants:
        print(f"noprop-bench {name}: {variant} ...", file=sys.stderr, flush=True)
        rows += [{"variant": variant, **row} for row in rows_of(variant, args)]
    frame, markdown = report_frame(pd.DataFrame(rows), machine, command)
    out = Path(f"{args.out}-{name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out.with_suffix(".csv"), index=False)
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


def scaling_rows(variant: str, args: argparse.Namespace) -> list[dict[str, object]]:
    """Training images/s of `variant` on each of `args.processes` processes (torchrun)."""
    overrides = variant_overrides(variant, args)
    return scaling.measure_scaling(overrides, args.processes, args.warmup_steps, args.train_steps)


def versus_rows(variant: str, args: argparse.Namespace) -> list[dict[str, object]]:
    """`variant`'s training images/s against the plain loop's, side by side."""
    overrides = variant_overrides(variant, args)
    return [
        versus.versus_plain(
            overrides, args.rounds, args.warmup_steps, args.train_steps, args.vs_step
        )
    ]


def log_to_mlflow(
    client: MlflowClient,
    run_id: str,
    rows: list[Row],
    machine: dict[str, str],
    args: argparse.Namespace,
    out: Path,
) -> None:
    """The machine and options as params, every figure as metric `<variant>/<column>`."""
    params = machine | {
        "variants": ",".join(args.variants),
        "batch_size": args.batch_size or "debug=tiny",
        "smoke": args.smoke,
        "overrides": " ".join(args.override) or "none",
        "time_budget_s": args.time_budget_s,
    }
    for key, value in params.items():
        client.log_param(run_id, key, str(value)[:500])
    for row in rows:
        for column, value in row.flat().items():
            if isinstance(value, float) and math.isfinite(value):
                client.log_metric(run_id, f"{row.variant}/{column}", value)
    for suffix in (".csv", ".md"):
        client.log_artifact(run_id, str(out.with_suffix(suffix)))


if __name__ == "__main__":
    main()
