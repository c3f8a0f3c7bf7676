"""One MLflow tracking server on PostgreSQL for many writers: a sweep of 8 parallel jobs (joblib)
records into it with no run lost, no "database is locked", parent and children intact. The test
starts PostgreSQL and `mlflow server` itself and stops them (tests/processes.py)."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from tests.processes import mlflow_server, multirun, parent_and_children, postgres_server

JOBS = 8


def test_eight_parallel_jobs_record_into_a_postgres_backed_server(tmp_path):
    with postgres_server() as database, mlflow_server(database, tmp_path, workers=2) as uri:
        seeds = ",".join(map(str, range(JOBS)))
        result = multirun(
            tmp_path,
            uri,
            "hydra/launcher=parallel",
            f"hydra.launcher.n_jobs={JOBS}",
            f"seed={seeds}",
        )
        assert result.returncode == 0, result.stderr[-5000:]
        parent, children = parent_and_children(uri, order_by="seed")
        assert [c.data.params["seed"] for c in children] == [str(s) for s in range(JOBS)]
        assert {c.info.status for c in children} == {"FINISHED"}
        assert all("test_acc" in c.data.metrics for c in children)
        client = MlflowClient(uri)
        for child in children:  # every epoch's metrics and the table artifact made it
            assert len(client.get_metric_history(child.info.run_id, "train_loss")) == 1
            assert "acc_vs_time.json" in {a.path for a in client.list_artifacts(child.info.run_id)}
        assert parent.info.status == "FINISHED"
        assert parent.data.tags["mlflow.note.content"] == f"{JOBS} jobs returned, 0 failed"
        log = result.stderr + (tmp_path / "server.log").read_text()
        assert "database is locked" not in log and "OperationalError" not in log
