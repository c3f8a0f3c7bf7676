"""Helpers of the tests that start processes: `noprop-train -m` multiruns, and the services a
shared tracking store needs (an `mlflow server`, PostgreSQL), each stopped whatever happens."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "sweeps"
# Tiny jobs, a second or two each once Python has started: nothing saved beside the metrics.
TINY_JOB = [*TINY, "train.epochs=1", "eval.pictures=false", "mlflow.log_model=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multirun(
    tmp_path: Path, tracking_uri: str, *overrides: str, sweep_file: str | None = None
) -> subprocess.CompletedProcess:
    """`noprop-train -m [-cd sweeps -cn SWEEP_FILE]` in a subprocess, run from tmp_path (so
    artifacts land there)."""
    command = [
        sys.executable,
        "-m",
        "noprop_exp.train",
        "-m",
        *(["-cd", str(SWEEPS), "-cn", sweep_file] if sweep_file else []),
        *TINY_JOB,
        f"mlflow.tracking_uri={tracking_uri}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *overrides,
    ]
    # One thread per job: these jobs are too small to gain from more, and on a busy machine
    # extra threads only wait for each other.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )


def parent_and_children(tracking_uri: str, order_by: str = "train.lr"):
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("noprop").experiment_id])
    parents = [r for r in runs if "sweep" in r.data.tags]
    assert len(parents) == 1, [r.data.tags for r in runs]
    children = [r for r in runs if r.info.run_id != parents[0].info.run_id]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    return parents[0], sorted(children, key=lambda r: r.data.params[order_by])


@contextmanager
def mlflow_server(backend_store_uri: str, folder: Path, workers: int = 1) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port, serving artifacts from `folder`;
    yields its URI."""
    port = free_port()
    command = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--backend-store-uri", backend_store_uri),
        *("--artifacts-destination", str(folder / "server-artifacts")),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)),
    ]
    log_path = folder / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        uri = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(f"{uri}/health", timeout=2)
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        pytest.fail("mlflow server did not start:\n" + log_path.read_text())
                    time.sleep(0.5)
            yield uri
        finally:
            os.killpg(server.pid, signal.SIGTERM)  # the server and its workers: our own group
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (Debian: /usr/lib/postgresql/N/bin)."""
    if found := shutil.which("pg_ctl"):
        return Path(found).resolve().parent  # beside the real pg_ctl, not a symlink to it
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port with a database `mlflow`; yields
    its SQLAlchemy URI. PostgreSQL refuses to run as root: as root, it runs as the `postgres`
    user, in a folder of its own (pytest's are readable by root only)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        reason = "PostgreSQL not installed (Debian: apt-get install postgresql)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="noprop-postgres-"))
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()

    def pg(program: str, *args: str) -> None:
        subprocess.run([*as_user, str(bin_dir / program), *args], check=True, capture_output=True)

    try:
        pg("initdb", "-D", str(data), "-U", "mlflow", "--auth=trust")
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
        pg("pg_ctl", "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start")
        try:
            pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow")
            yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
        finally:
            pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
