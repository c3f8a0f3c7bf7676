"""Sweeps: one MLflow parent run per Hydra multirun, each job its child, whichever launcher runs
the jobs; failed jobs fail the parent and nothing else; a real tracking server over HTTP; the
sweep files, launcher configs and Docker files that users run."""

from __future__ import annotations

import atexit
import itertools
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from mlflow.tracking import MlflowClient
from omegaconf import open_dict

from noprop_exp import paper
from noprop_exp.config import CONF_DIR
from noprop_exp.report import report_from_mlflow
from noprop_exp.sweep import SweepParentRun, sweep_name, sweep_overrides
from noprop_exp.tracking import PARENT_RUN_ENV
from noprop_exp.train import run
from tests.processes import (
    REPO,
    SWEEPS,
    TINY_JOB,
    mlflow_server,
    multirun,
    parent_and_children,
)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow sqlite store whose tables exist: creating them takes seconds, copying does not."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, empty_store) -> str:
    """The tracking URI of a fresh, empty MLflow store in tmp_path."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.mark.parametrize(
    "launcher",
    # The basic launcher runs the jobs in this process; the others start a process per job.
    [
        "basic",
        pytest.param("parallel", marks=pytest.mark.slow),
        pytest.param("slurm_local", marks=pytest.mark.slow),
    ],
)
def test_a_failed_job_fails_the_parent_by_name_and_leaves_the_others_finished(
    tmp_path, store, launcher
):
    # Job #0's loss overflows (FloatingPointError inside its MLflow run); job #1 is healthy
    # and, with the basic launcher, runs in the same process right after the failure. The
    # dataset choice (debug=tiny's own) is repeated so that the parent records a group choice.
    result = multirun(
        tmp_path, store, f"hydra/launcher={launcher}", "dataset=synthetic", "train.lr=1e30,1e-3"
    )
    assert result.returncode != 0  # Hydra reports the failed job once all jobs have returned
    assert "FloatingPointError" in result.stderr

    parent, (healthy, overflowing) = parent_and_children(store)
    assert (healthy.data.params["train.lr"], healthy.info.status) == ("0.001", "FINISHED")
    assert (overflowing.data.params["train.lr"], overflowing.info.status) == ("1e+30", "FAILED")
    assert "test_acc" in healthy.data.metrics
    assert parent.info.status == "FAILED" and parent.info.end_time is not None
    assert parent.data.tags["failed_jobs"].startswith("#0 train.lr=1e+30: FloatingPointError")
    assert "#1" not in parent.data.tags["failed_jobs"]
    assert parent.data.tags["job.1"] == "COMPLETED: train.lr=0.001"
    assert parent.data.tags["sweep.launcher"] == launcher
    assert parent.data.params["train.lr"] == "1e30,1e-3"
    assert parent.data.params["dataset"] == "synthetic"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_callback_makes_jobs_children_only_while_they_run(tmp_path, store, one_thread):
    """In one process, as with the basic launcher: a job is a child; a run after it is not."""
    overrides = [*TINY_JOB, f"mlflow.tracking_uri={store}", f"hydra.sweep.dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = compose("config", overrides=[*overrides, "seed=0"], return_hydra_config=True)
    with open_dict(config):
        config.hydra.job.num = 0
        job_cfg = config.copy()
        del job_cfg["hydra"]
    choices = {k: v for k, v in config.hydra.runtime.choices.items() if v is not None}
    assert PARENT_RUN_ENV not in os.environ

    callback = SweepParentRun()
    callback.on_multirun_start(config)
    callback.on_job_start(config, task_function=None)
    assert os.environ[PARENT_RUN_ENV] == callback.parent_run_id
    run(job_cfg, choices)
    callback.on_job_end(config, JobReturn(status=JobStatus.COMPLETED))
    assert PARENT_RUN_ENV not in os.environ
    parent_id = callback.parent_run_id
    run(job_cfg, choices)  # outside the sweep's jobs
    callback.on_multirun_end(config)

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("noprop").experiment_id])
    parent, job, outside = sorted(runs, key=lambda r: r.info.start_time)
    assert parent.info.run_id == parent_id and parent.info.status == "FINISHED"
    assert job.data.tags["mlflow.parentRunId"] == parent_id
    assert "mlflow.parentRunId" not in outside.data.tags


def started_sweep(tmp_path, store) -> SweepParentRun:
    """A sweep's callback after on_multirun_start, its atexit hook left to the test to call."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = compose(
            "config",
            [f"mlflow.tracking_uri={store}", f"hydra.sweep.dir={tmp_path}"],
            return_hydra_config=True,
        )
    callback = SweepParentRun()
    callback.on_multirun_start(config)
    atexit.unregister(callback.end_if_open)
    return callback


def test_a_sweep_stopped_before_its_end_fails_its_parent(tmp_path, store):
    """Ctrl-C or a launcher error: Hydra never calls on_multirun_end; the atexit hook ends it."""
    callback = started_sweep(tmp_path, store)
    parent_id = callback.parent_run_id
    callback.end_if_open()
    parent = MlflowClient(store).get_run(parent_id)
    assert parent.info.status == "FAILED" and parent.info.end_time is not None
    assert "stopped early" in parent.data.tags["mlflow.note.content"]


def test_a_sweep_whose_job_a_signal_stopped_ends_its_parent_killed(tmp_path, store):
    """Ctrl-C during a job: the job's run ends KILLED (lifecycle.py), and so does the parent."""
    callback = started_sweep(tmp_path, store)
    parent_id = callback.parent_run_id
    client = MlflowClient(store)
    experiment = client.get_run(parent_id).info.experiment_id
    job = client.create_run(experiment, tags={"mlflow.parentRunId": parent_id}).info.run_id
    client.set_terminated(job, "KILLED")
    callback.end_if_open()
    parent = client.get_run(parent_id)
    assert parent.info.status == "KILLED" and parent.info.end_time is not None
    assert "a signal stopped the sweep" in parent.data.tags["mlflow.note.content"]


def test_sweep_overrides_take_the_sweep_file_then_the_command_line():
    with initialize_config_dir(config_dir=str(SWEEPS), version_base="1.3"):
        config = GlobalHydra.instance().hydra.compose_config(
            "figure3_small",
            [f"hydra.searchpath=[file://{CONF_DIR}]", "seed=3", "train.lr=0.01,0.1"],
            run_mode=RunMode.MULTIRUN,
        )
    overrides, swept = sweep_overrides(config)
    assert overrides["seed"] == "3"  # the command line wins over the file's 0,1
    assert overrides["dataset"] == "mnist,synthetic"
    assert overrides["train.lr"] == "0.01,0.1"
    assert swept == ["experiment", "dataset", "train.lr"]


@pytest.mark.parametrize(
    ("config_dir", "config_name", "overrides", "expected"),
    [
        (SWEEPS, "figure3_small", ["seed=3"], "figure3_small"),
        (CONF_DIR, "config", ["seed=0,1", "train.epochs=1"], "seed=0,1"),
        (CONF_DIR, "config", ["train.epochs=1"], "train.epochs=1"),
    ],
)
def test_a_sweep_is_named_after_its_config_else_its_swept_overrides(
    config_dir, config_name, overrides, expected
):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        config = GlobalHydra.instance().hydra.compose_config(
            config_name,
            [f"hydra.searchpath=[file://{CONF_DIR}]", *overrides],
            run_mode=RunMode.MULTIRUN,
        )
    assert sweep_name(config, *sweep_overrides(config)) == expected


@pytest.fixture
def sqlite_server(tmp_path):
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path) as uri:
        yield uri


@pytest.mark.slow
def test_a_tracking_server_receives_a_sweep_and_its_report(tmp_path, sqlite_server):
    result = multirun(tmp_path, sqlite_server, "seed=0,1")
    assert result.returncode == 0, result.stderr
    parent, children = parent_and_children(sqlite_server)
    assert sorted(c.data.params["seed"] for c in children) == ["0", "1"]
    assert {c.info.status for c in children} == {"FINISHED"}
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "seed=0,1"
    assert parent.data.params["seed"] == "0,1" and parent.data.params["train.epochs"] == "1"
    assert parent.data.tags["sweep"] == "seed=0,1"
    assert parent.data.tags["sweep.dir"] == str(tmp_path / "sweep")
    assert parent.data.tags["mlflow.note.content"] == "2 jobs returned, 0 failed"
    assert "failed_jobs" not in parent.data.tags

    report = report_from_mlflow(sqlite_server, tmp_path / "report", sweeps=["seed=0,1"])
    # One panel per dataset (here the synthetic one), one line per variant.
    (panel,) = report.figures["figure3"].axes
    assert panel.get_title() == "synthetic"
    assert len([line for line in panel.lines if len(line.get_xdata())]) == 1
    table1 = report.tables["table1"].set_index(["variant", "embedding", "dataset"])
    ours = table1.loc[("dt", "onehot", "synthetic")]
    assert (ours.seeds, ours.inference_runs) == (2, 2)
    assert ours.test_acc == pytest.approx(sum(c.data.metrics["test_acc"] for c in children) / 2)
    assert table1.loc[("dt", "onehot", "mnist"), "paper"] == paper.accuracy("dt", "onehot", "mnist")
    fm_cifar100 = paper.accuracy("fm", "prototype", "cifar100")
    assert table1.loc[("fm", "prototype", "cifar100"), "paper"] == fm_cifar100
    assert len(table1.loc[("dt", slice(None), slice(None))]) == 3 * 4  # 3 embeddings x datasets
    markdown = (tmp_path / "report" / "table1.md").read_text()
    assert (
        f"| NoProp-DT | one-hot | — | {paper.accuracy('dt', 'onehot', 'mnist'):.2f} |" in markdown
    )
    table2 = (tmp_path / "report" / "table2.md").read_text()
    # CPU runs: memory missing, paper beside
    assert f"| NoProp-DT | — | {paper.memory_gb('dt', 'mnist'):.2f} |" in table2
    logged = MlflowClient(sqlite_server).list_artifacts(parent.info.run_id, "report")
    assert {"report/figure3.png", "report/table1.md", "report/table2.csv"} <= {
        a.path for a in logged
    }


# ---- the files users run: sweep files, launcher configs, Docker ----------------------------


# Grid sweeps (Hydra's basic sweeper, reported with noprop-report) and searches (Optuna's).
SEARCH_FILES = sorted(p for p in SWEEPS.glob("*.yaml") if "hydra/sweeper: search" in p.read_text())
SWEEP_FILES = sorted(set(SWEEPS.glob("*.yaml")) - set(SEARCH_FILES))


def compose_sweep(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(SWEEPS), version_base="1.3"):
        return compose(
            name,
            overrides=[f"hydra.searchpath=[file://{CONF_DIR}]", *overrides],
            return_hydra_config=True,
        )


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_every_job_of_every_sweep_file_composes_and_its_command_is_documented(path):
    text = path.read_text()
    assert f"noprop-train -m -cd sweeps -cn {path.stem}\n" in text
    assert f"noprop-report --sweep {path.stem} --out reports/{path.stem}\n" in text
    params = compose_sweep(path.stem, []).hydra.sweeper.params
    values = {key: [v.strip() for v in str(value).split(",")] for key, value in params.items()}
    values.pop("seed")  # seeds do not change what is composed
    for combination in itertools.product(*values.values()):
        overrides = [f"{key}={value}" for key, value in zip(values, combination, strict=True)]
        config = compose_sweep(path.stem, overrides)
        assert config.variant.name in {"backprop", "dt", "adjoint", "ct", "fm"}


@pytest.mark.parametrize("path", SEARCH_FILES, ids=lambda p: p.stem)
def test_a_search_maximises_val_acc_and_its_best_trial_is_a_logged_child(tmp_path, store, path):
    assert f"noprop-train -m -cd sweeps -cn {path.stem}\n" in path.read_text()
    result = multirun(
        tmp_path,
        store,
        "dataset.train_size=128",
        "dataset.val_size=64",
        "hydra.sweeper.n_trials=2",
        sweep_file=path.stem,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = parent_and_children(store)
    assert parent.data.tags["sweep"] == path.stem
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED"]
    assert {c.data.params["data.val_images"] for c in children} == {"64"}
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(c.data.metrics["val_acc"] for c in children))


def test_each_paper_sweep_has_a_small_variant_of_the_same_shape():
    full = [p.stem for p in SWEEP_FILES if not p.stem.endswith(("_small", "_study"))]
    assert sorted(full) == ["figure3", "steps", "table1", "table2"]
    for name in full:
        big = compose_sweep(name, []).hydra.sweeper.params
        small = compose_sweep(f"{name}_small", []).hydra.sweeper.params
        assert set(big) <= set(small), name


@pytest.mark.parametrize(
    ("launcher", "target"),
    [
        ("parallel", "hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("slurm_local", "hydra_submitit_launcher.submitit_launcher.LocalLauncher"),
        ("slurm", "hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ],
)
def test_launcher_configs_extend_the_plugins(launcher, target):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = compose("config", [f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert config.hydra.launcher._target_ == f"hydra_plugins.{target}"
    if launcher != "parallel":
        assert config.hydra.launcher.gpus_per_node == 1
        assert config.hydra.launcher.timeout_min >= 24 * 60


def test_compose_file_wires_trainer_to_the_postgres_backed_mlflow_server():
    compose_file = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose_file["services"]
    assert set(services) == {"postgres", "mlflow", "trainer"}
    postgres = services["postgres"]["environment"]
    server = services["mlflow"]["command"]
    assert server[:2] == ["mlflow", "server"]
    backend = server[server.index("--backend-store-uri") + 1]
    assert backend == (
        f"postgresql+psycopg2://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{postgres['POSTGRES_DB']}"
    )
    assert "--serve-artifacts" in server and "--artifacts-destination" in server
    port = server[server.index("--port") + 1]
    assert services["mlflow"]["ports"] == [f"{port}:{port}"]
    allowed = server[server.index("--allowed-hosts") + 1].split(",")
    assert f"mlflow:{port}" in allowed

    trainer = services["trainer"]
    assert f"mlflow.tracking_uri=http://mlflow:{port}" in trainer["command"]
    assert trainer["depends_on"]["mlflow"]["condition"] == "service_healthy"
    sweep = trainer["command"][trainer["command"].index("-cn") + 1]
    assert (SWEEPS / f"{sweep}.yaml").is_file()
    (gpu,) = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    for service in ("mlflow", "trainer"):
        assert services[service]["build"]["context"] == ".."
        assert f" AS {services[service]['build']['target']}\n" in dockerfile


def test_the_image_installs_the_suite_with_the_command_ci_uses():
    def suite_install(text: str) -> list[str]:
        """The words of the one `pip install ... -e ...` command in a shell or Docker file."""
        lines = text.replace("\\\n", " ").splitlines()
        (line,) = [line for line in lines if "pip install" in line and " -e " in line]
        return shlex.split(line[line.index("python3 -m pip install") :])

    ci = suite_install((REPO / ".ci" / "run").read_text())
    assert ci[-2:] == ["-e", ".[test]"] and ".ci/constraints.txt" in ci
    assert suite_install((REPO / "docker" / "Dockerfile").read_text()) == ci
