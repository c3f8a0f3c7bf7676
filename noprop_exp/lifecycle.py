"""How a training run stops: clean stops on SIGTERM / SIGINT, and a heartbeat for the others.

SIGTERM (Slurm, `scancel`, `docker stop`, `kill`), SIGUSR2 (what submitit asks Slurm to send
before a time limit or on pre-emption) and the first SIGINT (Ctrl-C) only set a flag; the loop
finishes its minibatch, writes a checkpoint and raises `RunStopped`, which `tracked_run` records
as KILLED with the signal and the epoch. `pass_on` then hands the signal to the handler that was
there before (submitit's: requeue the job, which continues with `train.resume=auto`). A second
Ctrl-C raises KeyboardInterrupt at once (still KILLED, without a new checkpoint).

SIGKILL or a lost machine cannot be caught: the run stays RUNNING in MLflow. Its `heartbeat`
tag, the Unix time of the loop's last sign of life (every epoch, and every `HEARTBEAT_S` seconds
within one), tells it apart from a live run; `noprop-stale` lists and closes such runs.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn

import mlflow

HEARTBEAT_TAG = "heartbeat"
EPOCHS_DONE_TAG = "epochs_done"
HEARTBEAT_S = 60.0  # at most this long between heartbeats while training
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


class RunStopped(KeyboardInterrupt):
    """A signal stopped the run cleanly (checkpoint written). A KeyboardInterrupt, so that
    Hydra's launchers do not take it for a failed job and go on with the next one."""

    def __init__(self, signal_name: str, epoch: int) -> None:
        super().__init__(f"{signal_name} during epoch {epoch}")
        self.signal_name = signal_name
        self.epoch = epoch


class StopRequest:
    """Set by the signal handlers of `stop_on_signals`; polled by the loop between minibatches."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self and signum == signal.SIGINT:
            raise KeyboardInterrupt("second Ctrl-C: stopping at once")
        self.signal_name = signal.Signals(signum).name


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Catch SIGTERM and SIGINT while the block runs; the previous handlers come back after.
    Signals can only be caught in the main thread; elsewhere the request never fires."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {signum: signal.signal(signum, request.handle) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def pass_on(stopped: RunStopped) -> NoReturn:
    """After a clean stop: run the handler the signal had before the run (a launcher's, such as
    submitit's requeue on SIGUSR2), then exit with the status of a process the signal killed."""
    signum = signal.Signals[stopped.signal_name]
    handler = signal.getsignal(signum)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signum, None)
    raise SystemExit(128 + signum.value)


class Heartbeat:
    """Sets the active run's heartbeat tag: `beat()` always, `maybe_beat()` when it is due.
    At an epoch's end `beat(epochs_done=...)` also records the epochs completed. A process
    without a run (rank > 0 of a distributed run) has a heartbeat that is not `enabled`."""

    def __init__(self, enabled: bool = True) -> None:
        self.last = 0.0
        self.enabled = enabled

    def beat(self, epochs_done: int | None = None) -> None:
        self.last = time.monotonic()
        if not self.enabled:
            return
        tags = {HEARTBEAT_TAG: f"{time.time():.1f}"}
        if epochs_done is not None:
            tags[EPOCHS_DONE_TAG] = str(epochs_done)
        mlflow.set_tags(tags)

    def maybe_beat(self) -> None:
        if time.monotonic() - self.last > HEARTBEAT_S:
            self.beat()
