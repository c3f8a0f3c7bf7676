"""noprop-bench, and the speed switches it measures (fused optimiser, bf16 autocast, compile)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from noprop_exp import bench
from noprop_exp.assemble import assemble
from noprop_exp.config import CONF_DIR, Precision
from noprop_exp.precision import native_bf16, precision_on
from noprop_exp.train import compile_networks, make_optimizer, train_step


def test_smoke_run_prints_the_table_and_records_it(tmp_path, tracking_uri, capsys):
    out = tmp_path / "results" / "bench"
    options = ["--variants", "dt", "--device", "cpu", "--out", str(out)]
    bench.main(["--smoke", *options, "--tracking-uri", tracking_uri])
    printed = capsys.readouterr().out
    columns = ["variant", "train_img_s", "infer_img_s_10", "infer_img_s_1000", "target_acc"]
    columns += ["time_to_target_s", "best_acc", "peak_mem_gb", "memory", "resident_gb", "notes"]
    assert "| " + " | ".join(columns) + " |" in printed
    assert "\n| dt | " in printed
    assert "- cpu: " in printed and "- torch: " in printed

    table = pd.read_csv(out.with_suffix(".csv"))
    assert table["variant"].tolist() == ["dt"]
    row = table.iloc[0]
    assert row["train_img_s"] > 0 and row["infer_img_s_10"] > 0 and row["peak_mem_gb"] > 0
    assert math.isnan(row["infer_img_s_1000"])  # DT infers with its 10 blocks only
    assert "infers with its 10 blocks" in row["notes"]
    assert math.isnan(row["time_to_target_s"])  # not measured in a smoke run
    assert row["memory"].startswith("peak host memory")
    assert out.with_suffix(".md").read_text().startswith("# noprop-bench")

    client = MlflowClient(tracking_uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("noprop-bench").experiment_id])
    assert logged.info.status == "FINISHED"
    assert logged.data.metrics["dt/train_img_s"] == pytest.approx(row["train_img_s"])
    assert logged.data.params["gpu"] == "none" and logged.data.params["torch"] == torch.__version__
    assert {a.path for a in client.list_artifacts(logged.info.run_id)} == {"bench.csv", "bench.md"}


def test_scaling_is_measured_on_one_and_two_processes(tmp_path, tracking_uri, capsys):
    out = tmp_path / "bench"
    options = ["--variants", "dt,ct", "--device", "cpu", "--out", str(out), "--processes", "1,2"]
    bench.main(["--smoke", *options, "--tracking-uri", tracking_uri])
    table = pd.read_csv(tmp_path / "bench-scaling.csv")
    assert table[["variant", "processes"]].values.tolist() == [
        ["dt", 1],
        ["dt", 2],
        ["ct", 1],
        ["ct", 2],
    ]
    assert table["mode"].tolist() == ["none", "block", "none", "data"]
    assert (table["train_img_s"] > 0).all()
    one = table[table.processes == 1].set_index("variant").train_img_s
    two = table[table.processes == 2].set_index("variant")
    assert two.speedup.to_dict() == pytest.approx((two.train_img_s / one).to_dict())
    assert two.efficiency.to_dict() == pytest.approx((two.train_img_s / (2 * one)).to_dict())
    assert "| variant | processes | threads_each | mode | train_img_s |" in capsys.readouterr().out


def test_variants_default_to_every_config_and_unknown_ones_fail():
    assert bench.parse_args([]).variants == sorted(p.stem for p in CONF_DIR.glob("variant/*.yaml"))
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "dt,nosuch"])


def test_overrides_apply_to_every_variant_or_to_the_one_named():
    args = bench.parse_args(
        ["--override", "train.precision=bf16", "--override", "dt:variant.method.fused=true"]
    )
    for_dt, for_ct = bench.variant_overrides("dt", args), bench.variant_overrides("ct", args)
    assert "train.precision=bf16" in for_dt and "train.precision=bf16" in for_ct
    assert "variant.method.fused=true" in for_dt and "variant.method.fused=true" not in for_ct
    assert "dataset=mnist" in for_dt and "train.batch_size=128" in for_dt
    smoke = bench.variant_overrides("dt", bench.parse_args(["--smoke"]))
    assert "debug=tiny" in smoke and not any(o.startswith("train.batch_size=") for o in smoke)


def test_first_reaching_takes_the_earliest_evaluation_at_or_above_the_target():
    history = [(10.0, 97.0), (20.0, 98.5), (30.0, 98.2), (40.0, 99.1)]
    assert bench.first_reaching(history, 98.5) == 20.0
    assert bench.first_reaching(history, 99.0) == 40.0
    assert bench.first_reaching(history, 99.5) is None


def test_time_to_target_is_read_from_an_ordinary_training_run(tiny_config, tracking_uri):
    cfg, choices = tiny_config(
        "variant.method.num_blocks=2", "dataset.train_size=128", "dataset.test_size=64"
    )
    row = bench.Row("dt", train_img_s=128 / 5.0, target_acc=0.0)  # 5 s per epoch
    bench.time_to_target(cfg, choices, row, 128, budget_s=10.0, parent_run_id="parent-id")

    client = MlflowClient(tracking_uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("noprop").experiment_id])
    assert logged.data.tags["mlflow.parentRunId"] == "parent-id"
    assert logged.data.params["train.epochs"] == "2"  # the budget's worth of epochs
    first_time = client.get_metric_history(logged.info.run_id, "train_time_s")[0].value
    assert row.time_to_target_s == first_time  # target 0%: reached at the first evaluation
    accs = [m.value for m in client.get_metric_history(logged.info.run_id, "test_acc")]
    assert len(accs) == 2 and row.best_acc == max(accs)


def test_vs_plain_measures_the_three_steps_side_by_side(tmp_path):
    out = tmp_path / "bench"
    options = ["--vs-plain", "--smoke", "--device", "cpu", "--out", str(out), "--rounds", "2"]
    bench.main([*options, "--variants", "fm,backprop"])  # backprop has no plain loop: left out
    table = pd.read_csv(out.parent / "bench-vs-plain.csv")
    assert table["variant"].tolist() == ["fm"]
    row = table.iloc[0]
    assert min(row["plain_img_s"], row["suite_fp32_img_s"], row["suite_img_s"]) > 0
    assert row["suite_vs_plain"] == pytest.approx(row["suite_img_s"] / row["plain_img_s"])
    assert row["precision"] in ("fp32", "bf16") and row["channels_last"]
    assert row["spread"].count("-") == 3  # a min-max range for each step
    with pytest.raises(SystemExit):
        bench.main([*options, "--variants", "backprop"])


def test_switches_off_give_the_paper_cnn_pytorchs_own_dropout(compose_config):
    cnn, _ = compose_config(["variant=ct"])
    off = bench.versus.switches_off_overrides(cnn)
    assert off == [*bench.versus.SWITCHES_OFF, "backbone.dropout_masks=bernoulli"]
    resnet, _ = compose_config(["variant=ct", "backbone=resnet18"])  # no dropout to switch
    assert bench.versus.switches_off_overrides(resnet) == list(bench.versus.SWITCHES_OFF)


# A step of "another implementation" for --vs-step; it records its calls in a neighbour module,
# which it imports as the code it times would be imported.
STEP_FILE = """
import torch

from vs_step_calls import calls


def make_step(cfg, device):
    def step(x, y):
        calls.append((cfg.variant.name, device.type, tuple(x.shape), tuple(y.shape)))
        torch.mm(torch.ones(64, 64), torch.ones(64, 64))

    return step
"""


def test_vs_step_times_another_implementation_in_the_same_turns(tmp_path):
    (tmp_path / "other_impl.py").write_text(STEP_FILE)
    (tmp_path / "vs_step_calls.py").write_text("calls = []\n")
    out = tmp_path / "bench"
    options = ["--vs-plain", "--smoke", "--device", "cpu", "--out", str(out), "--rounds", "2"]
    other = f"other={tmp_path / 'other_impl.py'}:make_step"
    bench.main([*options, "--variants", "fm", "--vs-step", other])
    from vs_step_calls import calls  # the file's folder is on sys.path, as `python FILE` puts it

    row = pd.read_csv(out.parent / "bench-vs-plain.csv").iloc[0]
    assert row["other_img_s"] > 0
    assert row["suite_vs_other"] == pytest.approx(row["suite_img_s"] / row["other_img_s"])
    assert row["spread"].count("-") == 4  # the other step has its range too
    # smoke: 1 warm-up step, then 2 rounds of 2 timed steps, on the suite's minibatches
    assert len(calls) == 1 + 2 * 2
    variant, device, x_shape, y_shape = calls[0]
    assert (variant, device) == ("fm", "cpu") and x_shape[0] == y_shape[0] and len(x_shape) == 4


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("seed", "takes NAME=FILE.py:FUNCTION"),
        ("plain=x.py:f", "taken by a column"),
        ("seed=no_such_file.py:make_step", "no file"),
        ("seed=json:no_such_function", "defines no function 'no_such_function'"),
    ],
)
def test_vs_step_says_what_is_wrong_with_it(spec, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--vs-plain", "--vs-step", spec])
    assert message in capsys.readouterr().err


def test_vs_step_needs_vs_plain(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--vs-step", "seed=json:loads"])
    assert "add --vs-plain" in capsys.readouterr().err


def test_time_to_target_is_skipped_when_one_epoch_exceeds_the_budget(tiny_config):
    cfg, choices = tiny_config()
    row = bench.Row("dt", train_img_s=1.0, target_acc=99.0)
    bench.time_to_target(cfg, choices, row, 512, budget_s=10.0, parent_run_id="unused")
    assert row.time_to_target_s is None and "skipped" in row.notes[0]


@pytest.fixture
def fused_dt(tiny_config):
    cfg, _ = tiny_config("variant.method.fused=true", "variant.method.num_blocks=2")
    torch.manual_seed(0)
    return cfg, assemble(cfg, torch.device("cpu"))


def test_optimiser_is_fused_unless_switched_off(fused_dt):
    cfg, parts = fused_dt
    assert make_optimizer(cfg.train, parts.method).defaults["fused"] is True
    cfg.train.fused_optimizer = False
    assert not make_optimizer(cfg.train, parts.method).defaults["fused"]


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)]
)
def test_precision_sets_the_forward_dtype_only(fused_dt, precision, dtype):
    cfg, parts = fused_dt
    method = parts.method
    seen = []
    method.blocks.head[0].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    optimizer = make_optimizer(cfg.train, method)
    loss, _ = train_step(
        method, optimizer, parts.data.train_x[:16], parts.data.train_y[:16], precision
    )
    assert seen == [dtype] and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in method.parameters())
    assert all(s.dtype == torch.float32 for s in optimizer.state[method.head.weight].values())


def test_auto_precision_is_bf16_exactly_where_the_device_has_it(monkeypatch):
    cpu = torch.device("cpu")
    assert precision_on("fp32", cpu) is Precision.fp32
    assert precision_on("bf16", cpu) is Precision.bf16
    for native, expected in ((True, Precision.bf16), (False, Precision.fp32)):
        monkeypatch.setattr("noprop_exp.precision.native_bf16", lambda _type, n=native: n)
        assert precision_on("auto", cpu) is expected
    monkeypatch.undo()
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    assert native_bf16("cpu") == bool({"avx512_bf16", "amx_bf16"} & set(flags))


def test_channels_last_puts_every_convolution_in_nhwc_and_computes_the_same(tiny_config):
    outputs = []
    for layout in ("false", "true"):
        cfg, _ = tiny_config("variant=ct", f"train.channels_last={layout}", "backbone.dropout=0")
        torch.manual_seed(0)
        parts = assemble(cfg, torch.device("cpu"))
        # (of more than one input channel: with one, the two layouts are the same strides)
        convolutions = [
            m
            for m in parts.method.modules()
            if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1
        ]
        nhwc = [c.weight.stride(1) == 1 for c in convolutions]  # channels innermost
        assert nhwc == [layout == "true"] * len(convolutions) != []
        network = parts.method.network
        with torch.no_grad():
            outputs.append(network.image_features(parts.data.test_x[:8]))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)


def test_compile_switch_compiles_each_network_in_place(fused_dt, tiny_config, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    method = fused_dt[1].method
    compile_networks(method)
    assert compiled == [method.blocks, method.head]  # the one-hot embedding has no parameters

    cfg, _ = tiny_config("variant.method.num_blocks=2", "embedding=learned")
    sequential = assemble(cfg, torch.device("cpu")).method
    compiled.clear()
    compile_networks(sequential)
    assert compiled == [sequential.embedding, *sequential.blocks, sequential.head]


@pytest.mark.slow
def test_compiled_fused_step_matches_eager(tiny_config):
    """train.compile=true computes the same losses (inductor on the CPU: minutes to compile).

    Dropout off: compiled code draws its dropout masks with its own generator."""
    losses = []
    for compile_ in (False, True):
        cfg, _ = tiny_config(
            "variant.method.fused=true", "variant.method.num_blocks=2", "backbone.dropout=0.0"
        )
        torch.manual_seed(0)
        parts = assemble(cfg, torch.device("cpu"))
        if compile_:
            compile_networks(parts.method)
        optimizer = make_optimizer(cfg.train, parts.method)
        x, y = parts.data.train_x[:32], parts.data.train_y[:32]
        torch.manual_seed(1)
        losses.append([train_step(parts.method, optimizer, x, y, "fp32")[0] for _ in range(2)])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_bf16_fused_step_on_cuda(tiny_config):
    cfg, _ = tiny_config("device=cuda", "variant.method.fused=true", "train.precision=bf16")
    torch.manual_seed(0)
    parts = assemble(cfg, torch.device("cuda"))
    optimizer = make_optimizer(cfg.train, parts.method)
    assert optimizer.defaults["fused"] is True
    before = parts.method.blocks.head[6].weight.detach().clone()
    loss, _ = train_step(
        parts.method, optimizer, parts.data.train_x[:64], parts.data.train_y[:64], "bf16"
    )
    assert torch.isfinite(loss)
    assert not torch.equal(before, parts.method.blocks.head[6].weight)


@pytest.mark.cuda
def test_cuda_smoke_bench_reports_device_memory(tmp_path, tracking_uri):
    out = tmp_path / "bench"
    options = ["--variants", "dt", "--device", "cuda", "--override", "dt:variant.method.fused=true"]
    bench.main(["--smoke", *options, "--out", str(out), "--tracking-uri", tracking_uri])
    row = pd.read_csv(out.with_suffix(".csv")).iloc[0]
    assert row["memory"] == "peak device memory allocated in training, above the resident"
    assert row["resident_gb"] > 0 and row["peak_mem_gb"] > 0  # the peak is above the resident
