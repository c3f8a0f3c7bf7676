"""The MLflow parent run of a Hydra multirun: one run for the sweep, each job a child of it.

`conf/config.yaml` registers `SweepParentRun` in `hydra.callbacks`, so every `noprop-train -m`
gets one, whichever launcher runs the jobs:

- `on_multirun_start` (the submitting process, before any job) creates the parent run with
  `MlflowClient` (not `mlflow.start_run`: with the basic launcher the jobs run in this same
  process, and each job's `tracked_run` opens its own active run) and records the sweep's
  overrides as params and tags.
- `on_job_start` / `on_job_end` run wherever the job runs: in this process (basic launcher), in a
  loky worker (joblib) or in a submitit job. Hydra hands each job a pickled copy of this callback,
  so the parent run id travels with it; `on_job_start` puts it in the job's environment
  (`tracking.PARENT_RUN_ENV`), where `tracked_run` reads it, and `on_job_end` takes it out again
  and records the job's outcome as a `job.<num>` tag of the parent. Recording in MLflow rather
  than in memory is what lets the submitting process learn about jobs that ran elsewhere.
- The parent ends FINISHED, or FAILED naming the failed jobs, in `on_multirun_end`. Hydra's
  sweepers re-raise a failed job's exception once every job of the batch has returned, and then
  never call `on_multirun_end`; an `atexit` hook ends the parent in that case.

A job that raises does not stop the others: Hydra's `run_job` stores the exception in the job's
`JobReturn`, and the job's own run is closed FAILED by `tracked_run`. (The basic sweeper checks
returns per batch; with its default `max_batch_size: null` every job is in the one batch.)
Runs started outside a sweep never see the variable and stay top-level.
"""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from mlflow.entities import Param, RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from noprop_exp.store import experiment_id
from noprop_exp.tracking import PARENT_RUN_ENV

log = logging.getLogger(__name__)

JOB_TAG_PREFIX = "job."  # parent tags "job.<num>": "COMPLETED|FAILED: <overrides>[: <error>]"
MAX_ERROR_CHARS = 500
DEFAULT_CONFIG = "config"  # conf/config.yaml: a sweep of it is named after its overrides


def sweep_overrides(config: DictConfig) -> tuple[dict[str, str], list[str]]:
    """The sweep's settings as key -> value text, and the keys swept (several values).

    `hydra.sweeper.params` (a sweep file) first, then the command line's overrides, which win:
    e.g. ({'seed': '0,1,2', 'train.epochs': '3'}, ['seed'])."""
    params = config.hydra.sweeper.get("params") or {}
    lines = [f"{key}={value}" for key, value in params.items()]
    parsed = OverridesParser.create().parse_overrides([*lines, *config.hydra.overrides.task])
    last = {o.key_or_group: o for o in parsed}  # a later override of a key replaces it
    overrides = {key: o.input_line.partition("=")[2] for key, o in last.items()}
    return overrides, [key for key, o in last.items() if o.is_sweep_override()]


def sweep_name(config: DictConfig, overrides: dict[str, str], swept: list[str]) -> str:
    """What the sweep is called (its parent's run name and `sweep` tag, which `noprop-report
    --sweep` looks up): its config's name (`-cn figure3`), or, for the default config, the
    swept overrides (`seed=0,1`; all of them when none is swept)."""
    name = config.hydra.job.config_name
    if name != DEFAULT_CONFIG:
        return name
    keys = swept or list(overrides)
    return " ".join(f"{key}={overrides[key]}" for key in keys)[:250] or DEFAULT_CONFIG


def job_outcome(config: DictConfig, job_return: JobReturn, swept: list[str]) -> str:
    """One line for the parent's `job.<num>` tag: status, the job's swept values, the error."""
    overrides = [str(o) for o in config.hydra.overrides.task]
    named = [o for o in overrides if o.partition("=")[0].lstrip("+~") in swept] or overrides
    if job_return.status == JobStatus.COMPLETED:
        return f"COMPLETED: {' '.join(named)}"
    # `return_value` would re-raise the job's exception; the stored one is what we report.
    error = job_return._return_value
    message = f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS]
    return f"FAILED: {' '.join(named)}: {message}"


class SweepParentRun(Callback):
    """Hydra callback: the MLflow parent run of a multirun (see the module docstring)."""

    def __init__(self) -> None:
        self.parent_run_id: str | None = None
        self.tracking_uri: str | None = None
        self.swept: list[str] = []
        self._saved_env: str | None = None

    # ---- the submitting process ----------------------------------------------------------

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # The master config holds the sweep's single-valued settings: the tracking URI and
        # experiment are one per sweep (a swept value would not be resolved here).
        self.tracking_uri = config.mlflow.tracking_uri
        client = MlflowClient(self.tracking_uri)
        overrides, self.swept = sweep_overrides(config)
        name = sweep_name(config, overrides, self.swept)
        described = " ".join(f"{key}={value}" for key, value in overrides.items())
        run = client.create_run(
            experiment_id(client, config.mlflow.experiment_name),
            run_name=config.mlflow.run_name or name,
            tags={
                "sweep": name,
                "sweep.overrides": described,
                "sweep.dir": str(Path(config.hydra.sweep.dir).resolve()),
                "sweep.launcher": str(config.hydra.runtime.choices.get("hydra/launcher")),
            },
        )
        self.parent_run_id = run.info.run_id
        client.log_batch(
            self.parent_run_id, params=[Param(key, value) for key, value in overrides.items()]
        )
        atexit.register(self.end_if_open)
        log.info(
            "MLflow parent run %s (%s): report with `noprop-report --parent-run %s "
            "--tracking-uri %s`",
            self.parent_run_id,
            name,
            self.parent_run_id,
            self.tracking_uri,
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id is not None:
            self._end(all_returned=True)
            atexit.unregister(self.end_if_open)  # kept as a retry if _end raised

    def end_if_open(self) -> None:
        """The atexit hook: the sweep raised (a failed job, a launcher error, Ctrl-C) before
        `on_multirun_end`, so end the parent: KILLED when a signal stopped one of its jobs
        (that job's run is KILLED) and none failed, else FAILED."""
        self._end(all_returned=False)

    def _end(self, all_returned: bool) -> None:
        client = MlflowClient(self.tracking_uri)
        tags = client.get_run(self.parent_run_id).data.tags
        outcomes = {
            int(key.removeprefix(JOB_TAG_PREFIX)): value
            for key, value in tags.items()
            if key.startswith(JOB_TAG_PREFIX) and key.removeprefix(JOB_TAG_PREFIX).isdigit()
        }
        failed = [
            f"#{num} {outcome.removeprefix('FAILED: ')}"
            for num, outcome in sorted(outcomes.items())
            if outcome.startswith("FAILED")
        ]
        summary = f"{len(outcomes)} jobs returned, {len(failed)} failed"
        stopped = not all_returned and not failed and self._a_job_was_stopped(client)
        if stopped:
            summary += "; a signal stopped the sweep (continue it with train.resume=auto)"
        elif not all_returned and not failed:
            summary += "; the sweep stopped early (Ctrl-C or a launcher error: see its log)"
        note = summary + "".join(f"\n- {line}" for line in failed)
        client.set_tag(self.parent_run_id, "mlflow.note.content", note)
        if failed:
            client.set_tag(self.parent_run_id, "failed_jobs", "; ".join(failed)[:7000])
        ok = all_returned and not failed
        status = RunStatus.FINISHED if ok else RunStatus.KILLED if stopped else RunStatus.FAILED
        client.set_terminated(self.parent_run_id, RunStatus.to_string(status))
        (log.info if ok else log.error)("MLflow parent run %s: %s", self.parent_run_id, note)
        self.parent_run_id = None

    def _a_job_was_stopped(self, client: MlflowClient) -> bool:
        """Whether a child run ended KILLED: a signal (SIGTERM, Ctrl-C) stopped its job."""
        experiment = client.get_run(self.parent_run_id).info.experiment_id
        killed = client.search_runs(
            [experiment],
            f"tags.mlflow.parentRunId = '{self.parent_run_id}' and attributes.status = 'KILLED'",
            max_results=1,
        )
        return bool(killed)

    # ---- wherever a job runs --------------------------------------------------------------

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id is not None:
            self._saved_env = os.environ.get(PARENT_RUN_ENV)
            os.environ[PARENT_RUN_ENV] = self.parent_run_id

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.parent_run_id is None:
            return
        if self._saved_env is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = self._saved_env
        MlflowClient(self.tracking_uri).set_tag(
            self.parent_run_id,
            f"{JOB_TAG_PREFIX}{config.hydra.job.num}",
            job_outcome(config, job_return, self.swept),
        )
