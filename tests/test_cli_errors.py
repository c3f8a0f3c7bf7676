"""A user's mistakes with the commands that read runs: one or two lines naming the store and what
to do, exit code 2, no traceback (unless --debug), and no store created or changed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from noprop_exp import evaluation, report, stale
from noprop_exp.cli import UserError
from noprop_exp.pictures import cli as pictures

MAINS: dict[str, Callable[[list[str]], object]] = {
    "noprop-eval": lambda argv: evaluation.main(["RUN", *argv]),
    "noprop-pictures": lambda argv: pictures.main(["RUN", *argv]),
    "noprop-report": report.main,
    "noprop-stale": stale.main,
}


def fails(main: Callable[[list[str]], object], argv: list[str], capsys) -> str:
    """What the command wrote on stderr; it must exit with code 2 and print no traceback."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2
    return err


@pytest.fixture
def store(tracking_uri: str) -> MlflowClient:
    client = MlflowClient(tracking_uri)
    client.create_experiment("noprop")
    return client


def unchanged(tracking_uri: str) -> Callable[[], bool]:
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    before = path.read_bytes()
    return lambda: path.read_bytes() == before


@pytest.mark.parametrize("command", MAINS)
def test_a_missing_store_is_refused_and_not_created(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the wrong folder: no mlflow.db here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    err = fails(MAINS[command], [], capsys)
    assert err == (
        f"{command}: no MLflow store at {tmp_path.resolve() / 'mlflow.db'} (tracking URI "
        "sqlite:///mlflow.db): run from the folder holding mlflow.db, pass --tracking-uri, "
        "or set MLFLOW_TRACKING_URI\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_store_is_named(tmp_path, capsys):
    path = tmp_path / "mlflow.db"
    path.write_text("not a database")
    err = fails(stale.main, ["--tracking-uri", f"sqlite:///{path}"], capsys)
    assert err.startswith(f"noprop-stale: cannot read the MLflow store at {path} (tracking URI ")
    assert path.read_text() == "not a database"


@pytest.mark.parametrize("command", ["noprop-eval", "noprop-pictures"])
def test_an_unknown_run_is_named_with_its_store(command, store, tracking_uri, capsys):
    same = unchanged(tracking_uri)
    err = fails(MAINS[command], ["--tracking-uri", tracking_uri], capsys)
    path = tracking_uri.removeprefix("sqlite:///")
    assert err == (
        f"{command}: no run RUN in the MLflow store at {path} (tracking URI {tracking_uri}): "
        f"check the id (the UI: mlflow ui --backend-store-uri {tracking_uri}) or run from the "
        "folder holding mlflow.db, pass --tracking-uri, or set MLFLOW_TRACKING_URI\n"
    )
    assert same()


def test_a_failed_run_with_a_checkpoint_says_how_to_continue_it(store, tracking_uri, capsys):
    tags = {"checkpoint": "checkpoint/slot-1.pt@3.0", "failure.reason": "NaN loss at epoch 4"}
    run_id = store.create_run(store.get_experiment_by_name("noprop").experiment_id, tags=tags)
    run_id = run_id.info.run_id
    store.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
    same = unchanged(tracking_uri)
    err = fails(evaluation.main, [run_id, "--tracking-uri", tracking_uri], capsys)
    assert err == (
        f"noprop-eval: run {run_id} (status FAILED: NaN loss at epoch 4) has no "
        "model/state_dict.pt (no logged weights);\n"
        f"it has a checkpoint after epoch 3: continue it with noprop-train "
        f"train.resume={run_id}, then evaluate it\n"
    )
    assert same()


def test_a_run_killed_before_its_first_checkpoint_is_to_be_trained_again(
    store, tracking_uri, capsys
):
    run_id = store.create_run(store.get_experiment_by_name("noprop").experiment_id).info.run_id
    store.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
    err = fails(evaluation.main, [run_id, "--tracking-uri", tracking_uri], capsys)
    assert err.endswith("\nit stopped before its first checkpoint: train it again\n")


def test_a_run_logged_without_weights_says_why(store, tracking_uri, capsys):
    run_id = store.create_run(store.get_experiment_by_name("noprop").experiment_id).info.run_id
    store.set_terminated(run_id)
    err = fails(pictures.main, [run_id, "--tracking-uri", tracking_uri], capsys)
    assert err == (
        f"noprop-pictures: run {run_id} (status FINISHED) has no model/state_dict.pt "
        "(no logged weights);\nit was trained with mlflow.log_model=false: train it again with "
        "mlflow.log_model=true\n"
    )


def test_a_report_of_an_empty_selection_names_the_store_and_the_selection(
    store, tracking_uri, tmp_path, capsys
):
    same = unchanged(tracking_uri)
    argv = ["--tracking-uri", tracking_uri, "--filter", "params.seed = '7'"]
    err = fails(report.main, [*argv, "--out", str(tmp_path / "out")], capsys)
    path = tracking_uri.removeprefix("sqlite:///")
    assert err == (
        f"noprop-report: no finished training runs in the MLflow store at {path} (tracking URI "
        f"{tracking_uri}) match experiment noprop (the default) --filter \"params.seed = '7'\";\n"
        "check --tracking-uri and the --sweep / --parent-run / --experiment / --filter options\n"
    )
    assert same() and not (tmp_path / "out").exists()


def test_an_unknown_sweep_is_a_user_error(store, tracking_uri, capsys):
    err = fails(report.main, ["--tracking-uri", tracking_uri, "--sweep", "nope"], capsys)
    assert err.startswith("noprop-report: no sweep named 'nope' in the MLflow store at ")


def test_debug_shows_the_traceback(tmp_path):
    command = [sys.executable, "-c", "from noprop_exp.stale import main; main()"]
    argv = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    plain = subprocess.run([*command, *argv], capture_output=True, text=True, check=False)
    assert plain.returncode == 2
    assert plain.stderr.startswith("noprop-stale: no MLflow store at ")
    assert "Traceback" not in plain.stderr
    debug = subprocess.run(
        [*command, *argv, "--debug"], capture_output=True, text=True, check=False
    )
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and f"{UserError.__module__}.UserError" in debug.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_an_unknown_solver_names_the_choices_before_anything_loads(store, tracking_uri, capsys):
    same = unchanged(tracking_uri)
    err = fails(evaluation.main, ["RUN", "--tracking-uri", tracking_uri, "--solver", "rk9"], capsys)
    assert err == (
        "noprop-eval: --solver rk9: no such solver; choose one of "
        "ddim, dpm, euler, heun, posterior\n"
    )
    assert same()
