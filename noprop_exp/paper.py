"""The paper's published numbers and names (docs/NOPROP_SPEC.md §8), as plain data.

Li, Teh & Pascanu (2025): Table 1 (test accuracy %, mean over 3 seeds x 5 inference runs) and
Table 2 (GPU memory allocated, GB, one-hot embeddings), keyed by our config names (`variant`,
`embedding`, `dataset` tags). The dicts of display names are in the paper's row and column
order. `noprop-report` places these beside ours; tests compare against them from here.
"""

from __future__ import annotations

import math

DATASETS = {"mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
VARIANTS = {
    "backprop": "Backprop",
    "dt": "NoProp-DT",
    "adjoint": "Adjoint",
    "ct": "NoProp-CT",
    "fm": "NoProp-FM",
}
EMBEDDINGS = {"onehot": "one-hot", "learned": "learned (d=20)", "prototype": "prototype"}
LEARNED_DIM = "20"  # the paper's "dim=20": our `learned` embedding with embedding.dim=20
FIGURE3_EMBEDDING = "onehot"  # Figure 3 and Table 2 are one-hot

# Values in the column order of TABLE_DATASETS.
TABLE_DATASETS = ("mnist", "cifar10", "cifar100")
TABLE1 = {
    ("backprop", "onehot"): (99.46, 79.92, 45.85),
    ("backprop", "learned"): (99.43, 79.30, 46.57),
    ("backprop", "prototype"): (99.44, 79.58, 47.80),
    ("dt", "onehot"): (99.47, 79.25, 45.93),
    ("dt", "learned"): (99.49, 79.12, 45.19),
    ("dt", "prototype"): (99.54, 80.54, 46.06),
    ("adjoint", "onehot"): (98.62, 66.78, 25.03),
    ("ct", "onehot"): (97.84, 73.35, 33.66),
    ("ct", "learned"): (97.70, 71.77, 33.99),
    ("ct", "prototype"): (97.17, 66.54, 21.31),
    ("fm", "onehot"): (99.21, 73.14, 6.38),
    ("fm", "learned"): (99.29, 73.50, 31.14),
    ("fm", "prototype"): (98.52, 75.18, 37.57),
}
TABLE2 = {
    "backprop": (0.87, 1.17, 1.73),
    "dt": (0.49, 0.64, 1.23),
    "adjoint": (2.32, 6.23, 6.45),
    "ct": (1.05, 0.45, 0.50),
    "fm": (1.06, 0.44, 0.49),
}


def _value(values: tuple[float, ...] | None, dataset: str) -> float:
    if values is None or dataset not in TABLE_DATASETS:
        return math.nan
    return values[TABLE_DATASETS.index(dataset)]


def accuracy(variant: str, embedding: str, dataset: str) -> float:
    """Table 1's test accuracy (%) of a cell; nan where the paper has none."""
    return _value(TABLE1.get((variant, embedding)), dataset)


def memory_gb(variant: str, dataset: str) -> float:
    """Table 2's GPU memory (GB) of a cell; nan where the paper has none."""
    return _value(TABLE2.get(variant), dataset)
