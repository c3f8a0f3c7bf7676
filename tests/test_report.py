"""noprop-report on hand-made runs: statistics against direct computation, tables that keep
every paper cell (missing ones shown as missing), figures with one panel per dataset."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from mlflow.tracking import MlflowClient

from noprop_exp import paper
from noprop_exp.report import build_report, report_from_mlflow, runs_used, write_report
from noprop_exp.report.runs import comparable_runs, tidy_runs
from noprop_exp.report.tables import (
    MISSING,
    latex,
    markdown,
    pooled_mean_se,
    wide_table1,
    wide_table2,
)


def test_pooled_se_equals_the_se_of_all_inference_runs_taken_together():
    rng = np.random.default_rng(0)
    # 3 seeds with 5, 5 and 2 inference runs each; what a run logs is their mean and s.e.
    scores = [rng.normal(97 + seed, 0.5, size=r) for seed, r in enumerate([5, 5, 2])]
    means = [s.mean() for s in scores]
    ses = [s.std(ddof=1) / math.sqrt(len(s)) for s in scores]
    mean, se = pooled_mean_se(means, ses, [len(s) for s in scores])
    everything = np.concatenate(scores)
    assert mean == pytest.approx(everything.mean())
    assert se == pytest.approx(everything.std(ddof=1) / math.sqrt(len(everything)))


def test_pooled_se_of_single_inference_runs_is_the_se_over_seeds_and_of_one_value_nan():
    mean, se = pooled_mean_se([90.0, 92.0, 97.0], [0.0, 0.0, 0.0], [1, 1, 1])
    assert (mean, se) == pytest.approx((93.0, np.std([90, 92, 97], ddof=1) / math.sqrt(3)))
    mean, se = pooled_mean_se([90.0], [0.0], [1])
    assert mean == 90.0 and math.isnan(se)


def raw_runs() -> pd.DataFrame:
    """What `mlflow.search_runs` returns: dotted column names, strings for params."""
    rows = []

    def add(run_id, variant, embedding, dataset, seed, acc, se=0.1, time=0, **extra):
        steps_acc = extra.pop("steps_acc", {})
        rows.append(
            {
                "run_id": run_id,
                "start_time": pd.Timestamp("2025-01-01") + pd.Timedelta(minutes=time),
                "tags.variant": variant,
                "tags.embedding": embedding,
                "tags.dataset": dataset,
                "params.seed": str(seed),
                "params.eval.repeats": "5",
                "params.embedding.dim": extra.pop("dim", None),
                "metrics.test_acc": acc,
                "metrics.test_acc_se": se,
                "metrics.peak_mem_gb": extra.pop("mem", np.nan),
                "tags.experiment": extra.pop("preset", None),
                "params.train.epochs": extra.pop("epochs", "100"),
                **{f"metrics.test_acc_steps/{n}": v for n, v in steps_acc.items()},
            }
        )

    for seed in range(3):
        add(f"dt{seed}", "dt", "onehot", "mnist", seed, 99.0 + seed / 10, mem=0.5 + seed / 100)
        add(f"ct{seed}", "ct", "onehot", "cifar10", seed, 70.0 + seed, steps_acc={10: 60.0 + seed})
    add("ct-mnist", "ct", "onehot", "mnist", 0, 97.0, steps_acc={10: 95.0})
    add("old", "dt", "onehot", "mnist", 0, 10.0, time=-5)  # replaced by dt0, which is newer
    add("d32", "fm", "learned", "synthetic", 0, 80.0, dim="32")  # not the paper's d = 20
    add("newvariant", "zz", "onehot", "mnist", 0, 50.0)
    rows.append({"run_id": "parent", "start_time": pd.Timestamp("2025-01-01"), "tags.sweep": "s"})
    return pd.DataFrame(rows)


SPEC = Path(__file__).resolve().parents[1] / "docs" / "NOPROP_SPEC.md"


def test_the_papers_numbers_are_those_of_the_spec():
    """noprop_exp.paper holds docs/NOPROP_SPEC.md §8's Table 1 and Table 2, named our way."""
    section = SPEC.read_text().split("## 8.")[1].split("\n## ")[0]
    embeddings = {"one-hot": "onehot", "dim=20": "learned", "prototype": "prototype"}
    table1 = {
        (method.lower().removeprefix("noprop-"), embeddings[embedding]): tuple(
            float(v) for v in values
        )
        for method, embedding, *values in (
            [c.strip() for c in line.strip("|").split("|")]
            for line in section.split("Table 1")[1].split("Table 2")[0].splitlines()
            if line.startswith("| ") and line.split("|")[3].strip()[0].isdigit()
        )
    }
    assert table1 == paper.TABLE1
    table2 = {
        method.lower(): tuple(float(v) for v in values.split(" / "))
        for method, values in re.findall(r"(\w+) ([\d.]+ / [\d.]+ / [\d.]+)", section)
    }
    assert table2 == paper.TABLE2
    assert paper.accuracy("dt", "onehot", "mnist") == 99.47
    assert paper.memory_gb("ct", "cifar10") == 0.45
    assert math.isnan(paper.accuracy("adjoint", "learned", "mnist"))
    assert math.isnan(paper.memory_gb("dt", "synthetic"))


def test_tidy_runs_keeps_training_runs_and_the_latest_run_per_seed():
    runs = tidy_runs(raw_runs())
    assert "parent" not in set(runs.run_id) and "old" not in set(runs.run_id)
    assert len(runs) == 9  # 3 dt, 3 ct cifar10, ct mnist, fm d=32, zz
    assert set(runs.embedding) == {"onehot", "learned-d32"}
    assert runs.loc[runs.run_id == "dt0", "seed"].item() == 0


def test_tidy_runs_leaves_out_a_sweeps_parent_run_and_its_swept_params():
    """`--experiment` selects a sweep's parent beside its children; it logs seed "0,1"."""
    parent = {"run_id": "p", "start_time": pd.Timestamp("2025-01-02"), "tags.sweep": "s"}
    parent |= {"params.seed": "0,1", "params.eval.repeats": "1,5", "params.embedding.dim": "8,20"}
    runs = tidy_runs(pd.concat([raw_runs(), pd.DataFrame([parent])], ignore_index=True))
    assert "p" not in set(runs.run_id) and len(runs) == 9
    assert runs.seed.dtype.kind in "if" and runs.repeats.dtype.kind in "if"


def with_smoke_runs() -> pd.DataFrame:
    """raw_runs' dt, run by the paper preset, then a later one-epoch run and a 20-epoch run of
    no preset (seed 0 of each): what a user's experiment holds after trying things out."""
    raw = raw_runs().astype({"tags.experiment": object})
    raw.loc[raw["tags.variant"] == "dt", "tags.experiment"] = "paper/mnist_dt"
    smoke = raw[raw.run_id == "dt0"].assign(**{"tags.experiment": None})
    later = pd.Timestamp("2025-02-01")
    smoke = pd.concat(
        [
            smoke.assign(run_id="smoke", start_time=later, **{"params.train.epochs": "1"}),
            smoke.assign(run_id="twenty", **{"params.train.epochs": "20"}),
        ]
    ).assign(**{"metrics.test_acc": 50.0})
    return pd.concat([raw, smoke], ignore_index=True)


def test_a_cell_pools_runs_of_one_setting_and_a_later_smoke_run_replaces_none():
    runs, left_out = comparable_runs(tidy_runs(with_smoke_runs()))
    dt = runs[runs.variant == "dt"]
    assert sorted(dt.run_id) == ["dt0", "dt1", "dt2"]  # the paper preset's, not the later ones
    assert set(dt.setting) == {
        "experiment=paper/mnist_dt, 100 epochs, all training images, solver=?, eval.steps=?"
    }
    assert sorted(left_out.run_id) == ["smoke", "twenty"]
    table = build_report(runs, pd.DataFrame()).tables["table1"]
    assert cell(table, "dt", "onehot", "mnist").test_acc == pytest.approx(99.1)
    assert len(runs) == 9  # every other cell keeps its runs


def test_without_a_preset_the_setting_of_the_most_epochs_is_used():
    raw = with_smoke_runs()
    raw = raw[raw["tags.experiment"].isna() | (raw["tags.variant"] != "dt")]  # no preset runs
    runs, left_out = comparable_runs(tidy_runs(raw))
    assert list(runs.run_id[runs.variant == "dt"]) == ["twenty"]
    assert list(left_out.run_id) == ["smoke"]
    # An epochs tag (set again when a resumed run is extended) wins over the first param.
    raw.loc[raw.run_id == "smoke", "tags.epochs"] = "40"
    runs, _ = comparable_runs(tidy_runs(raw))
    assert list(runs.run_id[runs.variant == "dt"]) == ["smoke"]


def test_the_report_says_which_runs_each_cell_used(tmp_path):
    runs, left_out = comparable_runs(tidy_runs(with_smoke_runs()))
    lines = runs_used(runs, left_out).splitlines()
    assert len(lines) == 5  # ct cifar10, ct mnist, dt mnist, fm synthetic, zz mnist
    (dt,) = [line for line in lines if line.startswith("dt onehot mnist")]
    assert "3 run(s) of experiment=paper/mnist_dt, 100 epochs" in dt
    assert "[dt0, dt1, dt2]; left out 2 of other settings (runs_left_out.csv)" in dt
    report = build_report(runs, pd.DataFrame())
    report.left_out = left_out
    write_report(report, tmp_path)
    assert sorted(pd.read_csv(tmp_path / "runs_left_out.csv").run_id) == ["smoke", "twenty"]
    assert "setting" in pd.read_csv(tmp_path / "runs.csv")


def cell(table: pd.DataFrame, variant, embedding, dataset) -> pd.Series:
    match = (table.variant == variant) & (table.embedding == embedding) & (table.dataset == dataset)
    assert match.sum() == 1
    return table[match].iloc[0]


def test_table1_keeps_every_paper_cell_and_places_ours_and_the_papers():
    report = build_report(tidy_runs(raw_runs()), pd.DataFrame(columns=["run_id"]))
    long = report.tables["table1"]
    dt = cell(long, "dt", "onehot", "mnist")
    assert dt.test_acc == pytest.approx(99.1) and dt.seeds == 3 and dt.inference_runs == 15
    assert dt.paper == paper.accuracy("dt", "onehot", "mnist")
    assert cell(long, "dt", "prototype", "cifar10").paper == paper.accuracy(
        "dt", "prototype", "cifar10"
    )
    assert math.isnan(cell(long, "dt", "prototype", "cifar10").test_acc)  # no run: missing
    assert cell(long, "adjoint", "onehot", "cifar100").paper == paper.accuracy(
        "adjoint", "onehot", "cifar100"
    )
    assert math.isnan(cell(long, "fm", "learned-d32", "synthetic").paper)  # not in the paper
    # 13 paper rows + 2 of ours (fm learned d=32, variant zz), x 4 datasets (3 + synthetic).
    assert len(long) == 15 * 4

    wide = wide_table1(long)
    assert list(wide.columns[:2]) == ["MNIST ours", "MNIST paper"]
    assert wide.index[0] == ("Backprop", "one-hot") and wide.index[-1] == ("zz", "one-hot")
    assert (
        wide.loc[("NoProp-DT", "one-hot"), "MNIST paper"]
        == f"{paper.accuracy('dt', 'onehot', 'mnist'):.2f}"
    )
    assert wide.loc[("NoProp-DT", "one-hot"), "MNIST ours"].startswith("99.10 ± ")
    assert wide.loc[("NoProp-DT", "prototype"), "CIFAR-10 ours"] == MISSING
    assert wide.loc[("NoProp-FM", "learned-d32"), "synthetic paper"] == MISSING


def test_table2_shows_cpu_runs_memory_as_missing():
    report = build_report(tidy_runs(raw_runs()), pd.DataFrame(columns=["run_id"]))
    long = report.tables["table2"]
    assert cell(long.assign(embedding="onehot"), "dt", "onehot", "mnist").peak_mem_gb == (
        pytest.approx(0.51)
    )
    wide = wide_table2(long)
    assert wide.loc[("NoProp-CT",), "CIFAR-10 ours"] == MISSING  # ran, but logged no memory
    assert wide.loc[("NoProp-CT",), "CIFAR-10 paper"] == f"{paper.memory_gb('ct', 'cifar10'):.2f}"
    assert (
        wide.loc[("Adjoint",), "CIFAR-100 paper"] == f"{paper.memory_gb('adjoint', 'cifar100'):.2f}"
    )


def test_markdown_and_latex_have_a_row_per_table_row():
    wide = wide_table1(build_report(tidy_runs(raw_runs()), pd.DataFrame()).tables["table1"])
    lines = markdown(wide).splitlines()
    assert lines[0].startswith("| method | embedding | MNIST ours | MNIST paper |")
    assert len(lines) == 2 + len(wide)
    tex = latex(wide, "caption")
    assert r"$\pm$" in tex and "±" not in tex
    assert tex.count(r"\\") == 1 + len(wide)


def histories(runs: pd.DataFrame) -> pd.DataFrame:
    """Three evaluated epochs per run; accuracy rises by the seed, time by the epoch."""
    rows = [
        (r.run_id, epoch, 10.0 * epoch + r.seed, r.test_acc - 3 + epoch)
        for r in runs.itertuples()
        for epoch in (1, 2, 3)
    ]
    return pd.DataFrame(rows, columns=["run_id", "epoch", "train_time_s", "test_acc"])


def test_figure3_has_a_panel_per_dataset_a_line_per_variant_and_a_min_max_band(tmp_path):
    runs = tidy_runs(raw_runs())
    report = build_report(runs, histories(runs))
    figure = report.figures["figure3"]
    # One-hot runs only: datasets mnist and cifar10 (the d=32 synthetic run is left out).
    assert [ax.get_title() for ax in figure.axes] == ["MNIST", "CIFAR-10"]
    mnist, cifar10 = figure.axes
    assert len([line for line in mnist.lines if len(line.get_xdata())]) == 3  # dt, ct, zz
    (ct_line,) = [line for line in cifar10.lines if len(line.get_xdata())]
    # ct on cifar10: seeds 0, 1, 2 at acc 70, 71, 72 (-3 + epoch); time 10 * epoch + seed.
    assert list(ct_line.get_xdata()) == pytest.approx([11.0, 21.0, 31.0])
    assert list(ct_line.get_ydata()) == pytest.approx([69.0, 70.0, 71.0])
    (band,) = [c for c in cifar10.collections if isinstance(c, PolyCollection)]
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(68.0) and ys.max() == pytest.approx(72.0)
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend == ["NoProp-DT", "NoProp-CT", "zz"]
    assert_title_inside(figure)

    files = write_report(report, tmp_path)
    names = {f.name for f in files}
    assert {"figure3.png", "figure3.pdf", "table1.md", "table1.csv", "table1.tex"} <= names
    assert {"table2.md", "steps.png", "steps.md", "runs.csv"} <= names
    csv = pd.read_csv(tmp_path / "table1.csv")
    assert csv.test_acc.isna().sum() == report.tables["table1"].test_acc.isna().sum()
    assert MISSING in (tmp_path / "table1.md").read_text()


def assert_title_inside(figure) -> None:
    figure.canvas.draw()
    title = figure._suptitle.get_window_extent(figure.canvas.get_renderer())
    assert 0 <= title.x0 < title.x1 <= figure.bbox.width and title.y1 <= figure.bbox.height


def test_a_one_panel_figures_title_fits_inside_it():
    runs = tidy_runs(raw_runs())
    ct_cifar = runs[(runs.variant == "ct") & (runs.dataset == "cifar10")]
    figure = build_report(ct_cifar, histories(ct_cifar)).figures["figure3"]
    assert len(figure.axes) == 1
    assert_title_inside(figure)


def test_steps_study_averages_over_seeds():
    report = build_report(tidy_runs(raw_runs()), pd.DataFrame())
    steps = report.tables["steps"]
    ct = cell(steps, "ct", "onehot", "cifar10")
    assert ct.steps == 10 and ct.test_acc == pytest.approx(61.0)
    assert ct.test_acc_se == pytest.approx(1.0 / math.sqrt(3))  # std of 60, 61, 62 is 1
    assert [ax.get_title() for ax in report.figures["steps"].axes] == ["MNIST", "CIFAR-10"]


def test_report_of_an_experiment_holding_a_sweeps_parent_run(tmp_path, tracking_uri):
    """`noprop-report --experiment NAME`: the parent, with params like seed "0,1", is no run."""
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("sweeps")
    parent = client.create_run(experiment, tags={"sweep": "s"}).info.run_id
    client.log_param(parent, "seed", "0,1")
    client.set_terminated(parent)
    for seed in (0, 1):
        tags = {"mlflow.parentRunId": parent, "variant": "dt", "embedding": "onehot"}
        child = client.create_run(experiment, tags={**tags, "dataset": "mnist"}).info.run_id
        client.log_param(child, "seed", str(seed))
        for epoch in (1, 2):
            client.log_metric(child, "train_time_s", 10.0 * epoch, step=epoch)
            client.log_metric(child, "test_acc", 90.0 + seed + epoch, step=epoch)
        client.set_terminated(child)
    report = report_from_mlflow(tracking_uri, tmp_path / "out", experiments=["sweeps"])
    assert sorted(report.runs.seed) == [0, 1]
    dt = cell(report.tables["table1"], "dt", "onehot", "mnist")
    assert dt.test_acc == pytest.approx(92.5)  # the seeds' last test_acc: 92 and 93
    assert "figure3" in report.figures


def test_a_sweep_over_training_settings_gets_a_study_table_chosen_on_val_acc(
    tmp_path, tracking_uri
):
    """A parent that varied eta (and seeds): a row per eta, seeds pooled, by val_acc; the
    steadiness is the largest fall below the best so far from epoch 2 on, the worst seed's."""
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("study")
    parent = client.create_run(experiment, tags={"sweep": "study"}).info.run_id
    client.log_param(parent, "variant.method.eta", "0.5,1.0")
    client.log_param(parent, "seed", "0,1")
    client.set_terminated(parent)
    curves = {("0.5", 0): [60, 80, 70], ("0.5", 1): [62, 81, 79], ("1.0", 0): [50, 85, 90]}
    curves[("1.0", 1)] = [55, 86, 92]
    for (eta, seed), curve in curves.items():
        tags = {"mlflow.parentRunId": parent, "variant": "ct", "embedding": "onehot"}
        child = client.create_run(experiment, tags={**tags, "dataset": "mnist"}).info.run_id
        client.log_param(child, "seed", str(seed))
        client.log_param(child, "variant.method.eta", eta)
        for epoch, value in enumerate(curve, 1):
            client.log_metric(child, "val_acc", value, step=epoch)
            client.log_metric(child, "test_acc", value - 1, step=epoch)
            client.log_metric(child, "train_time_s", 10.0 * epoch, step=epoch)
        client.log_metric(child, "grad_norm/denoise", 2.0 if eta == "0.5" else 4.0, step=3)
        client.set_terminated(child)
    report = report_from_mlflow(tracking_uri, tmp_path / "out", parent_runs=[parent])
    study = report.tables["study"]
    assert list(study["variant.method.eta"]) == ["1.0", "0.5"]  # best val_acc first
    steady, falling = study.iloc[0], study.iloc[1]
    assert steady.val_acc == pytest.approx(91.0) and steady.largest_drop == 0
    assert steady.val_acc_se == pytest.approx(np.std([90, 92], ddof=1) / math.sqrt(2))
    assert falling.largest_drop == pytest.approx(10.0)  # seed 0: 80, then 70
    assert falling.val_by_epoch == "61.0 / 80.5 / 74.5"
    assert (steady.test_acc, steady["grad_norm/denoise"]) == (pytest.approx(90.0), 4.0)
    assert (tmp_path / "out" / "study.md").read_text().startswith("| variant.method.eta | seeds |")
    assert (tmp_path / "out" / "study.png").is_file()
    assert len(report.figures["study"].legends[0].get_texts()) == 2
