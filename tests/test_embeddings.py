"""Label embeddings: W's initialisations, u_y, mix, and the medoid prototypes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from noprop_exp.data import synthetic
from noprop_exp.embeddings import (
    LearnedEmbedding,
    OneHotEmbedding,
    PrototypeEmbedding,
    medoid_indices,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "embedding"


@pytest.fixture(scope="module")
def small_data():
    return synthetic(train_size=60, test_size=10, num_classes=10, image_size=6, channels=2)


def test_onehot_is_fixed_identity(small_data) -> None:
    emb = OneHotEmbedding.from_data(small_data)
    assert torch.equal(emb.weight, torch.eye(10))
    assert not emb.trainable and list(emb.parameters()) == []
    assert "weight" in dict(emb.named_buffers())
    assert emb.dim == 10 and emb.z_shape == (10,) and emb.num_classes == 10
    y = torch.tensor([3, 0, 9])
    assert torch.equal(emb(y), torch.nn.functional.one_hot(y, 10).float())


@pytest.mark.parametrize("num_classes", [10, 20])
def test_learned_rows_orthonormal_when_dim_at_least_m(num_classes: int) -> None:
    torch.manual_seed(0)
    emb = LearnedEmbedding(num_classes, dim=20)
    assert isinstance(emb.weight, torch.nn.Parameter) and emb.trainable
    assert emb.weight.shape == (num_classes, 20) and emb.z_shape == (20,)
    torch.testing.assert_close(emb.weight @ emb.weight.T, torch.eye(num_classes), atol=1e-5, rtol=0)


def test_learned_rows_unit_norm_when_dim_below_m() -> None:
    torch.manual_seed(0)
    emb = LearnedEmbedding(100, dim=20)
    norms = emb.weight.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(100))
    assert torch.linalg.matrix_rank(emb.weight.detach()) == 20  # random, not degenerate


def test_learned_from_data_follows_global_seed(small_data) -> None:
    torch.manual_seed(5)
    a = LearnedEmbedding.from_data(small_data, dim=20)
    torch.manual_seed(5)
    b = LearnedEmbedding.from_data(small_data, dim=20)
    assert torch.equal(a.weight, b.weight) and a.weight.requires_grad


def test_mix_is_weights_times_w_and_reshaped(small_data) -> None:
    emb = PrototypeEmbedding.from_data(small_data, per_class=None)
    probs = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))  # unrestricted (FM)
    mixed = emb.mix(probs)
    assert mixed.shape == (4, 2, 6, 6)
    w = emb.weight.detach().double().numpy()
    expected = np.einsum("bm,md->bd", probs.double().numpy(), w).reshape(4, 2, 6, 6)
    np.testing.assert_allclose(mixed.detach().double().numpy(), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 10\)"):
        emb.mix(torch.ones(4, 9))


def test_medoid_on_hand_made_points() -> None:
    # Class 0 (1-D points): 0, 1, 2.5, 3, 50, 51. Median distance to the other five:
    #   0 -> 3, 1 -> 2, 2.5 -> 2.5, 3 -> 3, 50 -> 47.5, 51 -> 48.5: the medoid is the point 1
    #   (the mean, 17.9, is nearest 3; the sum of distances is smallest at 2.5 and 3).
    # Class 1: 10, 11, 15, 30 -> medians 5, 4, 5, 19: the medoid is 11.
    # Class 2: a single image is its own medoid.
    values = [50.0, 10.0, 0.0, 1.0, 11.0, 7.0, 2.5, 15.0, 3.0, 30.0, 51.0]
    labels = [0, 1, 0, 0, 1, 2, 0, 1, 0, 1, 0]
    images = torch.tensor(values).view(-1, 1, 1, 1)
    index = medoid_indices(images, torch.tensor(labels), 3, per_class=None, generator=None)
    assert index.tolist() == [values.index(1.0), values.index(11.0), values.index(7.0)]


def test_medoid_matches_brute_force_and_subsample_is_seeded(small_data) -> None:
    x, y = small_data.train_x, small_data.train_y
    flat = x.flatten(1).double().numpy()
    expected = []
    for c in range(10):
        members = [i for i in range(len(y)) if y[i] == c]  # 6 each: 5 others, a unique median
        medians = [
            np.median([np.linalg.norm(flat[i] - flat[j]) for j in members if j != i])
            for i in members
        ]
        expected.append(members[int(np.argmin(medians))])
    assert medoid_indices(x, y, 10, None, None).tolist() == expected

    def sub(seed: int) -> list[int]:
        return medoid_indices(x, y, 10, 3, torch.Generator().manual_seed(seed)).tolist()

    assert sub(0) == sub(0)
    assert all(y[i] == c for c, i in enumerate(sub(0)))


def test_medoid_rejects_empty_class() -> None:
    with pytest.raises(ValueError, match="class 2 has no training images"):
        medoid_indices(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 0, 1]), 3, None, None)


def test_prototype_rows_are_the_medoid_images(small_data) -> None:
    emb = PrototypeEmbedding.from_data(small_data, per_class=4, seed=3)
    index = medoid_indices(
        small_data.train_x, small_data.train_y, 10, 4, torch.Generator().manual_seed(3)
    )
    assert torch.equal(emb.weight.detach(), small_data.train_x[index].flatten(1))
    assert emb.z_shape == (2, 6, 6) and emb.dim == 72 and emb.trainable
    assert isinstance(emb.weight, torch.nn.Parameter)
    y = torch.tensor([4, 4, 0])
    assert torch.equal(emb(y), small_data.train_x[index[y]])  # u_y is the image itself
    # Distinct prototypes: each u_y is nearer its own row of W than any other.
    assert torch.cdist(emb(y).flatten(1), emb.weight).argmin(1).tolist() == [4, 4, 0]


@pytest.mark.parametrize(
    ("name", "kind", "dim"),
    [("onehot", OneHotEmbedding, 10), ("learned", LearnedEmbedding, 20),
     ("prototype", PrototypeEmbedding, 72)],
)  # fmt: skip
def test_embedding_configs_instantiate(small_data, name: str, kind: type, dim: int) -> None:
    emb = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))(small_data)
    assert type(emb) is kind and emb.dim == dim
