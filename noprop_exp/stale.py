"""`noprop-stale`: runs MLflow shows RUNNING whose process is gone (SIGKILL, a lost machine).

A training run sets its `heartbeat` tag at least every epoch (lifecycle.py); a RUNNING run whose
heartbeat (or, without one, its start) is older than `--older-than` minutes is listed with the
epochs it completed and the command that continues it. `--mark-killed` ends them KILLED, with a
`stopped.signal` tag saying why, so the UI shows the truth; continuing one later re-opens it.

    noprop-stale --older-than 30                     # list
    noprop-stale --older-than 30 --mark-killed       # and close them
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from mlflow.entities import Run, RunStatus
from mlflow.tracking import MlflowClient

from noprop_exp.cli import add_tracking_uri, open_store, run_command
from noprop_exp.lifecycle import EPOCHS_DONE_TAG, HEARTBEAT_TAG

STALE_NOTE = "no heartbeat for {minutes:.0f} min: marked KILLED by noprop-stale"


def last_sign_of_life(run: Run) -> float:
    """Unix time of the run's last heartbeat, else of its start."""
    heartbeat = run.data.tags.get(HEARTBEAT_TAG)
    return float(heartbeat) if heartbeat else run.info.start_time / 1000


def stale_runs(client: MlflowClient, experiment: str, older_than_min: float) -> list[Run]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    running = client.search_runs(
        [found.experiment_id], "attributes.status = 'RUNNING'", max_results=10_000
    )
    deadline = time.time() - 60 * older_than_min
    return [run for run in running if last_sign_of_life(run) <= deadline]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="noprop-stale", description=__doc__.split("\n")[0])
    add_tracking_uri(parser)
    parser.add_argument("--experiment", default="noprop")
    parser.add_argument(
        "--older-than", type=float, default=30.0, help="minutes without a heartbeat (30)"
    )
    parser.add_argument("--mark-killed", action="store_true", help="end the stale runs KILLED")
    run_command(parser, report_stale, argv)


def report_stale(args: argparse.Namespace) -> None:
    client = open_store(args.tracking_uri)
    runs = stale_runs(client, args.experiment, args.older_than)
    for run in runs:
        minutes = (time.time() - last_sign_of_life(run)) / 60
        epochs = run.data.tags.get(EPOCHS_DONE_TAG, "0")
        print(
            f"{run.info.run_id}  {run.info.run_name}  {epochs} epochs done, silent "
            f"{minutes:.0f} min; continue: noprop-train train.resume={run.info.run_id}"
        )
        if args.mark_killed:
            client.set_tag(run.info.run_id, "stopped.signal", STALE_NOTE.format(minutes=minutes))
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
    verb = "marked KILLED" if args.mark_killed else "found"
    print(f"{len(runs)} stale runs {verb} in experiment {args.experiment!r}")


if __name__ == "__main__":
    main()
