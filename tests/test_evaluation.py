"""The one test-set evaluation: what the `eval` config section asks for, mean and s.e."""

from __future__ import annotations

import dataclasses
import io
import math
import statistics
import sys

import pytest
import torch
from omegaconf import OmegaConf

from noprop_exp.assemble import assemble
from noprop_exp.data import DataSplits
from noprop_exp.evaluation import accuracy, accuracy_on_split, predict_labels
from noprop_exp.solvers import DDIMSolver
from noprop_exp.variants.base import Method


class GuessesAtRandom(Method):
    """Scores drawn from the inference generator: each seed gives another accuracy."""

    def trajectory(self, x, steps, solver, generator=None):
        return torch.randn((1, len(x), 10), generator=generator)


def test_accuracy_on_split_averages_the_configured_repeats_with_their_standard_error():
    labels = torch.arange(200) % 10
    images = torch.zeros(200, 1, 2, 2)
    data = DataSplits("zeros", images[:10], labels[:10], images, labels, 10)
    eval_cfg = OmegaConf.create({"batch_size": 64, "repeats": 3, "seed": 7})
    method, solver = GuessesAtRandom(), DDIMSolver()

    result = accuracy_on_split(method, data, eval_cfg, 1, solver)

    # Repeat r is one inference run seeded seed + r; the s.e. is the sample s.d. over sqrt(3).
    runs = [accuracy(method, images, labels, 1, solver, 64, 1, 7 + r).mean for r in range(3)]
    assert len(set(runs)) > 1  # the repeats do differ: the s.e. is not trivially 0
    assert result.mean == pytest.approx(statistics.mean(runs))
    assert result.se == pytest.approx(statistics.stdev(runs) / math.sqrt(3))
    single = accuracy_on_split(method, data, OmegaConf.merge(eval_cfg, {"repeats": 1}), 1, solver)
    assert (single.mean, single.se) == (runs[0], 0.0)


class PredictsZero(Method):
    def trajectory(self, x, steps, solver, generator=None):
        return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10)[None].float()


def test_split_val_scores_the_validation_images_and_needs_them():
    images = torch.zeros(40, 1, 2, 2)
    test_y, val_y = torch.zeros(20, dtype=torch.long), torch.arange(20) % 4  # 100% and 25%
    eval_cfg = OmegaConf.create({"batch_size": 8, "repeats": 1, "seed": 0})
    method, solver = PredictsZero(), DDIMSolver()
    data = DataSplits("zeros", images, test_y, images[:20], test_y, 10, images[20:], val_y)
    assert accuracy_on_split(method, data, eval_cfg, 1, solver).mean == 100.0
    assert accuracy_on_split(method, data, eval_cfg, 1, solver, split="val").mean == 25.0
    no_val = DataSplits("zeros", images, test_y, images[:20], test_y, 10)
    with pytest.raises(ValueError, match="no val split"):
        accuracy_on_split(method, no_val, eval_cfg, 1, solver, split="val")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stderr", [Terminal(), io.StringIO()], ids=["terminal", "pipe"])
def test_progress_counts_repeats_times_batches_on_a_terminal_only(stderr, monkeypatch):
    monkeypatch.setattr(sys, "stderr", stderr)
    labels = torch.arange(200) % 10
    images = torch.zeros(200, 1, 2, 2)
    accuracy(GuessesAtRandom(), images, labels, 1, DDIMSolver(), 64, 3, 7, progress=True)
    shown = stderr.getvalue()
    assert ("12/12" in shown) == isinstance(stderr, Terminal)  # 3 repeats x 4 batches of 64
    assert isinstance(stderr, Terminal) or shown == ""


@pytest.mark.parametrize("variant", ["dt", "ct", "fm", "backprop", "adjoint"])
def test_no_label_reaches_inference_whatever_the_labels_are(tiny_config, variant):
    """The accuracy is the images' own predictions, made beforehand with no label in reach,
    counted against the labels: against the true ones, shuffled ones or all zeros alike. An
    evaluation that drew on the labels in any way (z_0 from q(z_0 | y), a peek at the answer)
    would predict differently as the labels change."""
    cfg, _ = tiny_config(f"variant={variant}", "eval.repeats=2", "dataset.test_size=64")
    parts = assemble(cfg, torch.device("cpu"))
    method, data, solver = parts.method, parts.data, parts.solver
    steps = cfg.eval.steps or method.default_steps()
    predictions = [
        predict_labels(
            method,
            data.test_x,
            steps,
            solver,
            cfg.eval.batch_size,
            torch.Generator().manual_seed(cfg.eval.seed + repeat),
        )
        for repeat in range(cfg.eval.repeats)
    ]
    shuffled = data.test_y[
        torch.randperm(len(data.test_y), generator=torch.Generator().manual_seed(1))
    ]
    for labels in (data.test_y, shuffled, torch.zeros_like(data.test_y)):
        shown = dataclasses.replace(data, test_y=labels)
        got = accuracy_on_split(method, shown, cfg.eval, steps, solver)
        hits = [100.0 * (p == labels).float().mean().item() for p in predictions]
        assert got.mean == pytest.approx(statistics.mean(hits))
