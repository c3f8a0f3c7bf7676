"""What the commands that read MLflow runs share: their `--tracking-uri` and `--debug` options,
opening a store that must already exist, finding a run, and answering a user's mistake in a
line or two on stderr with exit code 2 instead of a traceback (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from noprop_exp.checkpoint import CHECKPOINT_TAG
from noprop_exp.config import default_tracking_uri
from noprop_exp.tracking import FAILURE_TAG

T = TypeVar("T")
WEIGHTS = "model/state_dict.pt"
WHERE_TO_RUN = (
    "run from the folder holding mlflow.db, pass --tracking-uri, or set MLFLOW_TRACKING_URI"
)


class UserError(Exception):
    """A mistake in what the user asked for (a wrong store, run or selection): shown as its
    message alone, since a traceback would only hide it."""


class UserExit(SystemExit):
    """Exit code 2 (argparse's for a usage error) that still carries the message, so that a
    caller catching SystemExit can read what went wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def add_tracking_uri(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        default=default_tracking_uri(),
        help="MLflow store or server (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )


def run_command(
    parser: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace], T],
    argv: list[str] | None = None,
) -> T:
    """Parse `argv` (with a `--debug` flag added) and run `body`; a UserError becomes one message
    on stderr and exit code 2, or, with --debug, propagates with its traceback."""
    parser.add_argument(
        "--debug", action="store_true", help="on an error, show the full Python traceback"
    )
    args = parser.parse_args(argv)
    # The timed lines of long steps (console.timed) reach the screen, as under noprop-train.
    if not logging.getLogger().hasHandlers():
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return body(args)
    except UserError as error:
        if args.debug:
            raise
        print(f"{parser.prog}: {error}", file=sys.stderr)
        raise UserExit(str(error)) from None


def store_path(tracking_uri: str) -> Path | None:
    """The local file or folder behind a tracking URI; None for a server."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///"))
    if tracking_uri.startswith("file://"):
        return Path(tracking_uri.removeprefix("file://"))
    return None if "://" in tracking_uri else Path(tracking_uri)


def describe(tracking_uri: str) -> str:
    """The store as the messages name it: its absolute path and the URI it came from."""
    path = store_path(tracking_uri)
    return tracking_uri if path is None else f"{path.resolve()} (tracking URI {tracking_uri})"


def open_store(tracking_uri: str) -> MlflowClient:
    """A client of an existing store. MLflow creates a missing local store on first use, so a
    command run from the wrong folder would read an empty one and report "no run": refuse."""
    path = store_path(tracking_uri)
    if path is not None and not path.exists():
        raise UserError(f"no MLflow store at {describe(tracking_uri)}: {WHERE_TO_RUN}")
    try:  # a local store is opened, and its schema checked, as the client is made
        client = MlflowClient(tracking_uri)
        client.search_experiments(max_results=1)
    except Exception as error:  # a foreign file, an old schema, a server that does not answer
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot read the MLflow store at {describe(tracking_uri)}: {reason}"
        ) from error
    return client


def find_run(client: MlflowClient, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        raise UserError(
            f"no run {run_id} in the MLflow store at {describe(client.tracking_uri)}: "
            f"check the id (the UI: mlflow ui --backend-store-uri {client.tracking_uri}) "
            f"or {WHERE_TO_RUN}"
        ) from error


def run_with_weights(client: MlflowClient, run_id: str) -> Run:
    """The run, which must have logged its trained weights; if not, say how to get them."""
    run = find_run(client, run_id)
    if WEIGHTS in {a.path for a in client.list_artifacts(run_id, "model")}:
        return run
    tags, status = run.data.tags, run.info.status
    reason = f": {tags[FAILURE_TAG]}" if FAILURE_TAG in tags else ""
    if status == "FINISHED":
        advice = (
            "it was trained with mlflow.log_model=false: train it again with mlflow.log_model=true"
        )
    elif CHECKPOINT_TAG in tags:
        epoch = tags[CHECKPOINT_TAG].partition("@")[2].partition(".")[0]
        advice = (
            f"it has a checkpoint after epoch {epoch}: continue it with "
            f"noprop-train train.resume={run_id}, then evaluate it"
        )
    else:
        advice = "it stopped before its first checkpoint: train it again"
    raise UserError(
        f"run {run_id} (status {status}{reason}) has no {WEIGHTS} (no logged weights);\n{advice}"
    )
