"""`noprop-pictures RUN_ID`: draw a logged run's trained model again, from its run id alone,
and log the pictures into that run (see `noprop_exp.pictures` for what is drawn)."""

from __future__ import annotations

import argparse
from pathlib import Path

from noprop_exp.cli import run_command
from noprop_exp.evaluation import add_logged_run_arguments, load_named_run, solver_by_name
from noprop_exp.pictures import logged


def main(argv: list[str] | None = None) -> None:
    """noprop-pictures: draw a logged run's trained model and log the PNGs into that run."""
    parser = argparse.ArgumentParser(prog="noprop-pictures", description=main.__doc__)
    add_logged_run_arguments(parser)
    parser.add_argument("--out", type=Path, help="also keep the PNGs in this folder")
    parser.add_argument(
        "--solvers",
        nargs="+",
        metavar="NAME",
        help="evaluate the step sweep with these solvers (default: plot the run's logged sweep)",
    )
    parser.add_argument(
        "--steps",
        nargs="+",
        type=int,
        metavar="N",
        help="step counts to evaluate (default: the run's eval.steps_sweep)",
    )
    run_command(parser, draw, argv)


def draw(args: argparse.Namespace) -> None:
    cfg, run = load_named_run(args)
    cfg.mlflow.tracking_uri = args.tracking_uri  # log where the run was read from
    run.method.eval()  # before any inference: batch norm must not update its statistics
    step_sweep = None
    if args.solvers or args.steps:
        solvers = [solver_by_name(name) for name in args.solvers] if args.solvers else [run.solver]
        step_counts = args.steps or list(cfg.eval.steps_sweep)
        for solver in solvers:  # an unusable solver or step count fails before any work
            for n in step_counts:
                run.method.predict(run.data.test_x[:2], n, solver)
        step_sweep = (
            logged.evaluated_step_sweep(cfg, run, solvers, step_counts) if step_counts else {}
        )
    pictures = logged.log_pictures(cfg, run, args.run_id, step_sweep, args.out)
    made = ", ".join(f"{logged.ARTIFACT_DIR}/{stem}.png" for stem in pictures.figures)
    print(f"{args.run_id}: logged {made}")
    for picture, note in pictures.notes.items():
        print(f"  {picture}: {note}")
    if args.out is not None:
        print(f"  PNGs also in {args.out}")


if __name__ == "__main__":
    main()
