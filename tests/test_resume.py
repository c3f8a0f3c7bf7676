"""Long runs that survive: checkpoints, resume, clean stops on signals, failure records, sweeps
that continue, stale runs. A run interrupted and resumed must end as the same run left alone."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

import noprop_exp.train as train_module
from noprop_exp.lifecycle import RunStopped, StopRequest, pass_on
from noprop_exp.resume import ResumeError, config_hash, merged_config
from noprop_exp.stale import main as stale_main
from noprop_exp.train import run
from noprop_exp.variants.dt import NoPropDT
from tests.conftest import compose_run_config

REPO = Path(__file__).resolve().parents[1]
# 4 minibatches an epoch, a few inference steps: a second or two per epoch.
SMALL = [
    "debug=tiny",
    "dataset.train_size=128",
    "dataset.test_size=64",
    "train.batch_size=32",
    "eval.pictures=false",
]
DT = ["variant=dt", "variant.method.num_blocks=3"]
BATCHES = 4
UNEQUAL = {"train_time_s", "peak_mem_gb"}  # wall-clock measurements, as is time/...


@pytest.fixture(autouse=True)
def one_thread():
    """One thread, in-process and in subprocesses: the same reduction order everywhere, so
    runs compare bit for bit (and small runs do not fight over the 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(tracking_uri: str, *overrides: str, experiment: str = "noprop"):
    """A small run's config; dt with 3 blocks unless `overrides` pick a variant."""
    if not any(o.startswith("variant=") for o in overrides):
        overrides = (*DT, *overrides)
    uri, name = f"mlflow.tracking_uri={tracking_uri}", f"mlflow.experiment_name={experiment}"
    return compose_run_config([*SMALL, uri, name, *overrides])


def signal_after(monkeypatch, batches: int, signum: int = signal.SIGTERM) -> None:
    """Deliver `signum` to this process while minibatch number `batches` (from 1) trains."""
    original, calls = train_module.train_step, {"n": 0}

    def counting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == batches:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", counting)


def the_run(tracking_uri: str, experiment: str = "noprop"):
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def assert_same_run(tracking_uri: str, run_a: str, run_b: str, tmp_path: Path) -> None:
    """Equal weights, and every metric equal at every epoch (times excepted)."""
    client = MlflowClient(tracking_uri)
    a, b = client.get_run(run_a), client.get_run(run_b)
    assert set(a.data.metrics) == set(b.data.metrics)
    for name in {m for m in a.data.metrics if m not in UNEQUAL and not m.startswith("time/")}:
        history = [
            [
                (m.step, m.value)
                for m in sorted(client.get_metric_history(r, name), key=lambda m: m.step)
            ]
            for r in (run_a, run_b)
        ]
        assert history[0] == history[1], name
    weights = [
        torch.load(client.download_artifacts(r, "model/state_dict.pt", str(tmp_path / r)))
        for r in (run_a, run_b)
    ]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_sigterm_after_second_epoch_ends_killed_with_a_checkpoint_and_resumes_exactly(
    tracking_uri, monkeypatch, tmp_path
):
    reference = run(*config(tracking_uri, "train.epochs=3", experiment="reference"))
    signal_after(monkeypatch, 2 * BATCHES)
    with pytest.raises(RunStopped):
        run(*config(tracking_uri, "train.epochs=3"))
    stopped = the_run(tracking_uri)
    assert stopped.info.status == "KILLED"
    assert stopped.data.tags["stopped.signal"] == "SIGTERM"
    assert stopped.data.tags["stopped.epoch"] == "2"
    assert stopped.data.tags["checkpoint"].endswith("@2.0")
    assert stopped.data.tags["epochs_done"] == "2"
    monkeypatch.undo()

    run_id = stopped.info.run_id
    resumed = run(*config(tracking_uri, "train.epochs=3", f"train.resume={run_id}"))
    finished = the_run(tracking_uri)
    assert finished.info.run_id == run_id and finished.info.status == "FINISHED"
    assert "stopped.signal" not in finished.data.tags
    assert resumed["test_acc"] == reference["test_acc"]
    assert_same_run(tracking_uri, run_id, the_run(tracking_uri, "reference").info.run_id, tmp_path)


def test_a_finished_run_trains_further_when_train_epochs_is_raised(tracking_uri):
    run(*config(tracking_uri, "train.epochs=1", "mlflow.log_model=false"))
    run_id = the_run(tracking_uri).info.run_id
    with pytest.raises(ResumeError, match=r"raise train\.epochs"):
        run(*config(tracking_uri, "train.epochs=1", f"train.resume={run_id}"))
    run(*config(tracking_uri, "train.epochs=2", f"train.resume={run_id}", "mlflow.log_model=false"))
    history = MlflowClient(tracking_uri).get_metric_history(run_id, "test_acc")
    assert sorted(m.step for m in history) == [1, 2]
    extended = the_run(tracking_uri)
    assert extended.info.status == "FINISHED"
    # MLflow keeps a param's first value; the epochs tag says what the run now trains to.
    assert extended.data.params["train.epochs"] == "1" and extended.data.tags["epochs"] == "2"


@pytest.mark.parametrize(
    "variant",
    [
        DT,
        [*DT, "variant.method.fused=true"],
        ["variant=ct", "noise_schedule=learned", "eval.steps=4"],
        ["variant=fm", "eval.steps=4"],
        ["variant=fm", "eval.steps=4", "train.lr_schedule=cosine"],
        ["variant=backprop", "variant.method.num_blocks=3"],
        ["variant=adjoint", "variant.method.train_steps=4"],
    ],
    ids=["dt", "dt-fused", "ct-learned", "fm", "fm-cosine-lr", "backprop", "adjoint"],
)
def test_every_variant_resumes_exactly_from_a_mid_epoch_stop(
    tracking_uri, monkeypatch, tmp_path, variant
):
    overrides = ["train.epochs=2", *variant]
    run(*config(tracking_uri, *overrides, experiment="reference"))
    signal_after(monkeypatch, BATCHES + 2)  # the second minibatch of epoch 2
    with pytest.raises(RunStopped):
        run(*config(tracking_uri, *overrides))
    stopped = the_run(tracking_uri)
    assert stopped.info.status == "KILLED"
    assert stopped.data.tags["checkpoint"].endswith("@1.2")
    monkeypatch.undo()
    run(*config(tracking_uri, *overrides, "train.resume=auto"))
    run_id = stopped.info.run_id
    assert the_run(tracking_uri).info.status == "FINISHED"
    assert_same_run(tracking_uri, run_id, the_run(tracking_uri, "reference").info.run_id, tmp_path)


def test_sigkill_leaves_a_heartbeat_and_resume_continues_from_the_last_checkpoint(
    tracking_uri, tmp_path
):
    overrides = [*SMALL, *DT, "train.epochs=4", f"mlflow.tracking_uri={tracking_uri}"]
    command = [sys.executable, "-m", "noprop_exp.train", *overrides]
    command.append(f"hydra.run.dir={tmp_path / 'out'}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    client = MlflowClient(tracking_uri)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        experiment = client.get_experiment_by_name("noprop")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if runs and runs[0].data.tags.get("epochs_done") == "2":
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = the_run(tracking_uri)
    assert killed.info.status == "RUNNING"  # nobody could tell MLflow
    assert float(killed.data.tags["heartbeat"]) > time.time() - 120
    assert killed.data.tags["checkpoint"].split("@")[1] in {"2.0", "3.0"}

    stale_main(["--tracking-uri", tracking_uri, "--older-than", "0", "--mark-killed"])
    assert client.get_run(killed.info.run_id).info.status == "KILLED"

    run(*config(tracking_uri, "train.epochs=4", "train.resume=auto"))
    assert the_run(tracking_uri).info.status == "FINISHED"
    run(*config(tracking_uri, "train.epochs=4", experiment="reference"))
    reference = the_run(tracking_uri, "reference").info.run_id
    assert_same_run(tracking_uri, killed.info.run_id, reference, tmp_path)


def test_a_failed_run_records_its_reason_and_traceback(tracking_uri, monkeypatch, tmp_path):
    original = NoPropDT.update_losses

    def nan(self, x, y):
        for loss, diagnostics in original(self, x, y):
            yield loss * float("nan"), diagnostics

    monkeypatch.setattr(NoPropDT, "update_losses", nan)
    with pytest.raises(FloatingPointError):
        run(*config(tracking_uri))
    failed = the_run(tracking_uri)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["failure.reason"].startswith("FloatingPointError: training loss")
    path = MlflowClient(tracking_uri).download_artifacts(
        failed.info.run_id, "failure/traceback.txt", str(tmp_path)
    )
    text = Path(path).read_text()
    assert "Traceback" in text and "check_finite" in text


def test_a_second_ctrl_c_stops_at_once():
    request = StopRequest()
    request.handle(signal.SIGINT, None)
    assert request.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        request.handle(signal.SIGINT, None)


def test_a_stopped_run_passes_its_signal_on_to_the_launchers_handler():
    """submitit's SIGUSR2 handler requeues the job: it must still run after the clean stop."""
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        with pytest.raises(SystemExit) as exited:
            pass_on(RunStopped("SIGUSR2", 3))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [signal.SIGUSR2]
    assert exited.value.code == 128 + signal.SIGUSR2


def test_resume_refuses_overrides_that_change_training_and_takes_more_epochs():
    stored, _ = compose_run_config([*SMALL, "variant=ct", "train.epochs=3"])
    given, _ = compose_run_config([*SMALL, *DT, "train.epochs=5", "seed=1", "train.resume=abc"])
    with pytest.raises(ResumeError, match=r"seed \(the run's: 0, given: 1\)"):
        merged_config(given, stored, ["train.epochs", "seed", "train.resume"])
    merged = merged_config(given, stored, ["train.epochs", "train.resume"])
    assert merged.train.epochs == 5 and merged.train.resume == "abc"
    assert merged.variant.name == "ct"  # the run's own config, not the command line's default
    assert config_hash(merged) == config_hash(stored)
    same_job = OmegaConf.merge(stored, {"mlflow": {"tracking_uri": "elsewhere"}})
    assert config_hash(same_job) == config_hash(stored)


@pytest.mark.slow  # ~18 s on the shared 2-core CPU: a multirun subprocess
def test_a_relaunched_multirun_trains_only_the_job_that_was_killed(
    tracking_uri, monkeypatch, tmp_path
):
    # A first launch: job seed=0 finished, job seed=1 stopped by SIGTERM in its second epoch.
    run(*config(tracking_uri, "seed=0", "train.resume=auto", "mlflow.log_model=false"))
    signal_after(monkeypatch, BATCHES + 1)
    with pytest.raises(RunStopped):
        run(*config(tracking_uri, "seed=1", "train.resume=auto", "mlflow.log_model=false"))
    monkeypatch.undo()
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("noprop").experiment_id
    before = {r.data.params["seed"]: r for r in client.search_runs([experiment])}

    command = [sys.executable, "-m", "noprop_exp.train", "-m", *SMALL, *DT, "seed=0,1"]
    command += [
        "train.resume=auto",
        "mlflow.log_model=false",
        f"mlflow.tracking_uri={tracking_uri}",
    ]
    command.append(f"hydra.sweep.dir={tmp_path / 'sweep'}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True)

    runs = client.search_runs([experiment])
    assert sum("sweep" in r.data.tags for r in runs) == 1  # the sweep's parent run
    jobs = {r.data.params["seed"]: r for r in runs if "sweep" not in r.data.tags}
    assert {seed: r.info.run_id for seed, r in jobs.items()} == {
        seed: r.info.run_id for seed, r in before.items()
    }
    assert all(r.info.status == "FINISHED" for r in jobs.values())
    # seed=0 was not trained again: its metrics were logged once per epoch.
    history = client.get_metric_history(jobs["0"].info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]
    assert math.isclose(
        float(jobs["0"].data.tags["heartbeat"]), float(before["0"].data.tags["heartbeat"])
    )
    history = client.get_metric_history(jobs["1"].info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]
