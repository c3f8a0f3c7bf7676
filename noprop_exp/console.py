"""What a training run tells the person who started it: a timed line for each long step outside
the training bar (evaluation, the step sweep, the pictures), and the summary it ends on."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

log = logging.getLogger(__name__)

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


@contextmanager
def timed(what: str) -> Iterator[None]:
    """Log `what...` before the block and how long it took after, so that minutes of
    evaluation or drawing never pass with nothing on the screen."""
    log.info("%s...", what)
    started = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", what, time.perf_counter() - started)


def ui_hint(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """How to open the run in the MLflow UI: its URL on a server, else the `mlflow ui` command
    for the local store and the URL it then serves the run at."""
    path = f"#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri.rstrip('/')}/{path}"
    return f"run `mlflow ui --backend-store-uri {tracking_uri}`, then open {LOCAL_UI}/{path}"


def summary_line(
    run_id: str, experiment_id: str, tracking_uri: str, metrics: Mapping[str, float]
) -> str:
    """The one line a finished run ends on: its id, accuracy, training time and where to look."""
    validation = ""
    if "val_acc" in metrics:
        validation = f"val_acc {metrics['val_acc']:.2f} +- {metrics['val_acc_se']:.2f} %, "
    return (
        f"run {run_id} finished: {validation}test_acc {metrics['test_acc']:.2f} +- "
        f"{metrics['test_acc_se']:.2f} %, training {metrics['train_time_s']:.1f} s; "
        f"to see it, {ui_hint(tracking_uri, experiment_id, run_id)}"
    )


def announce(line: str) -> None:
    """Log `line` at INFO, and print it when no logging handler would show it (`run()` called
    from Python without logging set up): it must reach the screen either way, but only once
    under Hydra, whose console handler already shows INFO."""
    log.info(line)
    if not logging.getLogger().hasHandlers() or not log.isEnabledFor(logging.INFO):
        print(line, flush=True)
