"""Loaders on small files in the real on-disk formats, missing-data errors, batching, synthetic."""

from __future__ import annotations

import gzip
import inspect
import os
import pickle
import shutil
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
import torchvision.datasets.mnist
from hydra.utils import instantiate
from omegaconf import OmegaConf

from noprop_exp import data
from noprop_exp.data import DatasetNotFoundError, minibatches
from tests.conftest import MNIST_FILES, compose_run_config

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"
# Devices other than the host: `meta` (shapes and dtypes, no memory) stands in where no GPU is.
OTHER_DEVICES = ["meta", pytest.param("cuda", marks=pytest.mark.cuda)]

# Published normalisation constants, written out here independently of the module under test.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
CIFAR10_FILES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]


# ---------------------------------------------------------------------------------------------
# Writers for the real formats
# ---------------------------------------------------------------------------------------------


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """MNIST's idx format: big-endian magic 0x00 0x00 0x08 (ubyte) ndim, then each dimension as
    a big-endian uint32, then the raw bytes; gzip-compressed as the files are distributed."""
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(
        struct.pack(">I", s) for s in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def py2_pickle(entries: dict) -> bytes:
    """Pickle a dict as CIFAR's Python 2 files are: protocol 2 with Python 2 `str` (opcode
    SHORT_BINSTRING) for keys and label names. Loaded with encoding="latin1" (torchvision) the keys
    are str; with encoding="bytes" (the CIFAR website's snippet) they are b'data', b'labels'."""

    def py2_str(text: str) -> bytes:
        raw = text.encode("latin1")
        return b"U" + bytes([len(raw)]) + raw

    def value(v: object) -> bytes:
        if isinstance(v, str):
            return py2_str(v)
        if isinstance(v, list) and v and isinstance(v[0], str):
            return b"](" + b"".join(py2_str(s) for s in v) + b"e"  # EMPTY_LIST MARK ... APPENDS
        return pickle.dumps(v, protocol=2)[2:-1]  # numpy arrays, int lists: drop PROTO and STOP

    body = b"".join(py2_str(k) + value(v) for k, v in entries.items())
    return b"\x80\x02}(" + body + b"u."  # PROTO 2, EMPTY_DICT, MARK, ..., SETITEMS, STOP


@pytest.fixture
def fake_mnist(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """12 train and 7 test images, written only as .gz (the loader must unpack them)."""
    rng = np.random.default_rng(0)
    raw = {
        "train_x": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, 12, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, 7, dtype=np.uint8),
    }
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    for file, key in zip(MNIST_FILES, ["train_x", "train_y", "test_x", "test_y"], strict=True):
        write_idx_gz(folder / f"{file}.gz", raw[key])
    return tmp_path, raw


def write_cifar(root: Path, cifar100: bool) -> dict[str, np.ndarray]:
    """CIFAR batches with (N, 3072) uint8 rows (1024 R, then G, then B, row-major 32x32)."""
    rng = np.random.default_rng(1)
    classes = 100 if cifar100 else 10
    label_key = "fine_labels" if cifar100 else "labels"
    if cifar100:
        folder, train_files, test_file = root / "cifar-100-python", ["train"], "test"
        meta = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": ["c"] * 20}
        meta_file = "meta"
    else:
        folder, test_file = root / "cifar-10-batches-py", "test_batch"
        train_files = CIFAR10_FILES[:5]
        meta = {"num_cases_per_batch": 4, "label_names": [f"l{i}" for i in range(10)]}
        meta_file = "batches.meta"
    folder.mkdir(parents=True)
    parts = {"train": [], "test": []}
    for split, files, n in (("train", train_files, 4), ("test", [test_file], 5)):
        for file in files:
            x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            y = [int(v) for v in rng.integers(0, classes, n)]
            entry = {"batch_label": f"{file} of 5", "data": x, label_key: y}
            if cifar100:
                entry["coarse_labels"] = [v // 5 for v in y]
            (folder / file).write_bytes(py2_pickle(entry))
            parts[split].append((x, y))
    (folder / meta_file).write_bytes(py2_pickle(meta))
    return {
        f"{split}_{k}": np.concatenate([np.asarray(p[i]) for p in parts[split]])
        for split in ("train", "test")
        for i, k in enumerate("xy")
    }


@pytest.fixture
def skip_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks each CIFAR file against the md5 of the official release (module-level
    `check_integrity(path, md5)` in torchvision.datasets.cifar, used by `_check_integrity` and
    `_load_meta`). Self-made files cannot match, so here, in the tests only, that check is
    replaced by an existence check; the parsing code under test is unchanged."""
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )


def normalised(raw: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Expected (N, C, H, W) float tensor from uint8 (N, C, H, W) bytes, in float64."""
    m = np.asarray(mean).reshape(1, -1, 1, 1)
    s = np.asarray(std).reshape(1, -1, 1, 1)
    return torch.from_numpy((raw.astype(np.float64) / 255 - m) / s)


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------


def test_fake_cifar_has_the_real_key_types(tmp_path: Path) -> None:
    write_cifar(tmp_path, cifar100=False)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    as_bytes = pickle.loads(path.read_bytes(), encoding="bytes")
    assert set(as_bytes) == {b"batch_label", b"data", b"labels"}
    assert as_bytes[b"data"].dtype == np.uint8 and as_bytes[b"data"].shape == (4, 3072)
    assert "labels" in pickle.loads(path.read_bytes(), encoding="latin1")


def test_mnist_full_split_matches_raw_bytes(fake_mnist) -> None:
    root, raw = fake_mnist
    splits = data.mnist(str(root), download=False)
    assert splits.name == "mnist" and splits.num_classes == 10
    assert splits.image_shape == (1, 28, 28)
    for split in ("train", "test"):
        x, y = getattr(splits, f"{split}_x"), getattr(splits, f"{split}_y")
        expected = normalised(raw[f"{split}_x"][:, None], (MNIST_MEAN,), (MNIST_STD,))
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.is_contiguous()
        torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-5)
        assert y.tolist() == raw[f"{split}_y"].tolist()


@pytest.mark.parametrize("cifar100", [False, True], ids=["cifar10", "cifar100"])
def test_cifar_full_split_matches_raw_bytes(tmp_path: Path, skip_md5, cifar100: bool) -> None:
    raw = write_cifar(tmp_path, cifar100)
    load, mean, std, classes = (
        (data.cifar100, CIFAR100_MEAN, CIFAR100_STD, 100)
        if cifar100
        else (data.cifar10, CIFAR10_MEAN, CIFAR10_STD, 10)
    )
    splits = load(str(tmp_path), download=False)
    assert splits.num_classes == classes and splits.image_shape == (3, 32, 32)
    assert len(splits.train_x) == (4 if cifar100 else 20) and len(splits.test_x) == 5
    for split in ("train", "test"):
        x, y = getattr(splits, f"{split}_x"), getattr(splits, f"{split}_y")
        expected = normalised(raw[f"{split}_x"].reshape(-1, 3, 32, 32), mean, std)
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.is_contiguous()
        torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-5)
        assert y.tolist() == raw[f"{split}_y"].tolist()


def test_cifar_with_wrong_checksums_says_corrupted(tmp_path: Path) -> None:
    write_cifar(tmp_path, cifar100=False)  # present but not the official files: md5 fails
    with pytest.raises(RuntimeError, match="corrupted"):
        data.cifar10(str(tmp_path), download=False)


def test_subsets_are_deterministic_draws_of_the_split(fake_mnist) -> None:
    root, _ = fake_mnist
    full = data.mnist(str(root), download=False)
    a = data.mnist(str(root), train_size=5, test_size=3, download=False, subset_seed=0)
    b = data.mnist(str(root), train_size=5, test_size=3, download=False, subset_seed=0)
    c = data.mnist(str(root), train_size=5, test_size=3, download=False, subset_seed=1)
    assert a.train_x.shape == (5, 1, 28, 28) and a.test_x.shape == (3, 1, 28, 28)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    for split in ("train", "test"):
        sub_x, sub_y = getattr(a, f"{split}_x"), getattr(a, f"{split}_y")
        all_x, all_y = getattr(full, f"{split}_x"), getattr(full, f"{split}_y")
        rows = [int((all_x == img).flatten(1).all(1).nonzero()) for img in sub_x]
        assert len(set(rows)) == len(rows)  # distinct examples of the split
        assert sub_y.tolist() == all_y[rows].tolist()  # labels travel with their images


def test_subset_larger_than_split_names_the_maximum(fake_mnist) -> None:
    root, _ = fake_mnist
    with pytest.raises(ValueError, match=r"train_size=13 .* 12 examples"):
        data.mnist(str(root), train_size=13, download=False)


def _rows_of(images: torch.Tensor, split: torch.Tensor) -> list[int]:
    """The index in `split` of each image of `images` (all distinct random images)."""
    return [int((split == img).flatten(1).all(1).nonzero()) for img in images]


def test_the_validation_split_is_held_out_of_training_seeded_and_kept_across_train_sizes(
    fake_mnist,
) -> None:
    root, _ = fake_mnist
    full = data.mnist(str(root), download=False)
    assert full.val_x is None and full.val_y is None
    a = data.mnist(str(root), val_size=4, download=False, subset_seed=0)
    smaller = data.mnist(str(root), val_size=4, train_size=5, download=False, subset_seed=0)
    other_seed = data.mnist(str(root), val_size=4, download=False, subset_seed=1)
    assert a.val_x.shape == (4, 1, 28, 28) and len(a.train_y) == 8
    val_rows, train_rows = _rows_of(a.val_x, full.train_x), _rows_of(a.train_x, full.train_x)
    assert sorted(val_rows + train_rows) == list(range(12))  # disjoint, and nothing lost
    assert a.val_y.tolist() == full.train_y[val_rows].tolist()
    assert torch.equal(a.test_x, full.test_x)  # the test split is untouched
    # train_size draws from what the validation set left: the same validation set, no overlap
    assert torch.equal(smaller.val_x, a.val_x)
    assert not set(_rows_of(smaller.train_x, full.train_x)) & set(val_rows)
    assert not torch.equal(other_seed.val_x, a.val_x)


def test_a_validation_split_that_leaves_nothing_to_train_on_names_the_limit(fake_mnist) -> None:
    root, _ = fake_mnist
    with pytest.raises(ValueError, match=r"val_size=12 .* 12 examples.* 0\.\.11"):
        data.mnist(str(root), val_size=12, download=False)


def test_synthetic_validation_split_is_extra_examples_of_the_same_classes() -> None:
    plain = data.synthetic(train_size=40, test_size=20, num_classes=4, image_size=8)
    split = data.synthetic(train_size=40, test_size=20, num_classes=4, image_size=8, val_size=12)
    assert plain.val_x is None
    assert torch.equal(split.train_x, plain.train_x) and torch.equal(split.test_x, plain.test_x)
    assert split.val_x.shape == (12, 1, 8, 8) and torch.bincount(split.val_y).tolist() == [3] * 4


# ---------------------------------------------------------------------------------------------
# Missing data
# ---------------------------------------------------------------------------------------------


def _offline(monkeypatch: pytest.MonkeyPatch, module) -> list[str]:
    """Make torchvision's download in `module` fail as it does without network; record calls."""
    calls: list[str] = []

    def fail(url, *args, **kwargs):
        calls.append(url)
        raise URLError("[Errno 101] simulated: Network is unreachable")

    monkeypatch.setattr(module, "download_and_extract_archive", fail)
    return calls


def _assert_helpful(message: str, root: Path, folder: str, files: list[str]) -> None:
    assert str(root.resolve()) in message
    assert folder in message
    for file in files:
        assert file in message
    assert "dataset.root=" in message and "NOPROP_DATA_DIR" in message
    assert "Traceback" not in message and len(message) < 1500


def test_missing_mnist_without_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        data.mnist(str(tmp_path), download=False)
    assert isinstance(info.value, DatasetNotFoundError)
    message = str(info.value)
    _assert_helpful(message, tmp_path, "MNIST/raw", MNIST_FILES)
    assert ".gz" in message and "download=False" in message


def test_missing_mnist_when_download_fails(tmp_path: Path, monkeypatch) -> None:
    calls = _offline(monkeypatch, torchvision.datasets.mnist)
    with pytest.raises(DatasetNotFoundError) as info:
        data.mnist(str(tmp_path), download=True)
    assert calls, "the loader should have tried torchvision's download"
    message = str(info.value)
    _assert_helpful(message, tmp_path, "MNIST/raw", MNIST_FILES)
    assert "download failed" in message and "Network is unreachable" in message


def test_missing_cifar10_without_download(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        data.cifar10(str(tmp_path), download=False)
    _assert_helpful(str(info.value), tmp_path, "cifar-10-batches-py", CIFAR10_FILES)


def test_missing_cifar10_when_download_fails(tmp_path: Path, monkeypatch) -> None:
    calls = _offline(monkeypatch, torchvision.datasets.cifar)
    with pytest.raises(DatasetNotFoundError) as info:
        data.cifar10(str(tmp_path), download=True)
    assert calls
    message = str(info.value)
    _assert_helpful(message, tmp_path, "cifar-10-batches-py", CIFAR10_FILES)
    assert "download failed" in message and "Network is unreachable" in message


def test_missing_lists_only_absent_files(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError) as info:
        data.cifar10(str(tmp_path), download=False)
    missing_line = next(ln for ln in str(info.value).splitlines() if ln.startswith("Missing:"))
    assert "data_batch_1" not in missing_line and "data_batch_2" in missing_line


@pytest.mark.needs_mnist
def test_real_mnist_subset(mnist_root: Path) -> None:
    splits = data.mnist(str(mnist_root), train_size=2000, test_size=500, download=False)
    assert splits.train_x.shape == (2000, 1, 28, 28) and splits.test_x.shape == (500, 1, 28, 28)
    assert splits.train_y.min() == 0 and splits.train_y.max() == 9
    assert splits.test_y.min() >= 0 and splits.test_y.max() <= 9
    # The published constants make real MNIST roughly zero-mean, unit-variance.
    assert abs(splits.train_x.mean().item()) < 0.05
    assert abs(splits.train_x.std().item() - 1) < 0.05


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


def test_minibatches_cover_each_example_once() -> None:
    x = torch.arange(10.0).view(10, 1) * 10
    y = torch.arange(10)
    batches = list(minibatches(x, y, 4, generator=torch.Generator().manual_seed(0)))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(10))
    assert seen.tolist() != list(range(10))  # shuffled
    for xb, yb in batches:
        assert torch.equal(xb[:, 0], yb.float() * 10)  # pairs stay together


def test_minibatches_deterministic_and_unshuffled() -> None:
    x, y = torch.randn(23, 2), torch.arange(23)

    def order(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([yb for _, yb in minibatches(x, y, 5, generator=gen)]).tolist()

    assert order(3) == order(3) and order(3) != order(4)
    plain = list(minibatches(x, y, 5, shuffle=False))
    assert torch.cat([yb for _, yb in plain]).tolist() == list(range(23))


@pytest.mark.parametrize("device", OTHER_DEVICES)
@pytest.mark.parametrize("seeded", [False, True])
def test_minibatches_stay_on_device(device: str, seeded: bool) -> None:
    x, y = torch.empty(9, 3, device=device), torch.empty(9, dtype=torch.int64, device=device)
    gen = torch.Generator().manual_seed(0) if seeded else None  # a CPU generator on purpose
    for xb, yb in minibatches(x, y, 4, generator=gen):
        assert xb.device.type == device and yb.device.type == device


def test_minibatches_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        next(minibatches(torch.zeros(3), torch.zeros(3), 0))
    with pytest.raises(ValueError, match="differ in length"):
        next(minibatches(torch.zeros(3), torch.zeros(4), 2))


# ---------------------------------------------------------------------------------------------
# Synthetic
# ---------------------------------------------------------------------------------------------


def test_synthetic_shapes_and_determinism() -> None:
    a = data.synthetic(train_size=40, test_size=20, num_classes=4, image_size=8, channels=3)
    b = data.synthetic(train_size=40, test_size=20, num_classes=4, image_size=8, channels=3)
    c = data.synthetic(train_size=40, test_size=20, num_classes=4, image_size=8, channels=3,
                       subset_seed=1)  # fmt: skip
    assert a.train_x.shape == (40, 3, 8, 8) and a.test_x.shape == (20, 3, 8, 8)
    assert a.train_x.dtype == torch.float32 and a.train_y.dtype == torch.int64
    assert a.image_shape == (3, 8, 8) and a.num_classes == 4
    assert torch.bincount(a.train_y).tolist() == [10, 10, 10, 10]  # balanced
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)


def test_synthetic_is_learnable() -> None:
    """Nearest class mean (fit on train) scores far above chance (10%) on test."""
    splits = data.synthetic(noise=1.0)
    assert abs(splits.train_x.std().item() - 1) < 0.15
    means = torch.stack([splits.train_x[splits.train_y == c].mean(0) for c in range(10)])
    dist = ((splits.test_x[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    accuracy = (dist.argmin(1) == splits.test_y).float().mean().item()
    assert accuracy > 0.8


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "synthetic"])
def test_dataset_config_matches_its_function(name: str) -> None:
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    function = getattr(data, name)
    assert cfg._target_ == f"noprop_exp.data.{name}" and cfg._partial_ is True
    keys = set(cfg) - {"_target_", "_partial_"}
    assert keys == set(inspect.signature(function).parameters) - {"device"}


def test_dataset_configs_instantiate(fake_mnist, monkeypatch) -> None:
    root, _ = fake_mnist
    monkeypatch.setenv("NOPROP_DATA_DIR", str(root))
    cfg = compose_run_config(["dataset=mnist", "dataset.download=false"])[0].dataset
    assert cfg.root == str(root)  # paths.data_root reads NOPROP_DATA_DIR
    assert len(instantiate(cfg)(device="cpu").train_x) == 12
    synthetic = instantiate(OmegaConf.load(CONF / "synthetic.yaml"))(device="cpu")
    assert synthetic.train_x.shape == (512, 1, 16, 16)


def test_a_truncated_archive_is_named_leaves_no_partial_file_and_a_good_one_recovers(
    fake_mnist,
) -> None:
    root, _ = fake_mnist
    folder = root / "MNIST" / "raw"
    archive = folder / "train-images-idx3-ubyte.gz"
    good = archive.read_bytes()
    archive.write_bytes(good[: len(good) // 2])
    with pytest.raises(data.CorruptDatasetError, match=r"train-images-idx3-ubyte\.gz") as failure:
        data.mnist(str(root), download=False)
    assert "truncated or corrupted" in str(failure.value)
    # Nothing half-written is left for the next run to trust.
    assert not (folder / "train-images-idx3-ubyte").exists()
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".partial")]

    archive.write_bytes(good)
    splits = data.mnist(str(root), download=False)
    assert splits.train_x.shape == (12, 1, 28, 28)


def test_a_raw_file_older_than_its_restored_archive_is_extracted_again(fake_mnist) -> None:
    """A partial raw file left by an earlier, interrupted extraction is replaced once the
    archive is (re)written after it."""
    root, raw = fake_mnist
    raw_file = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    raw_file.write_bytes(b"")
    os.utime(raw_file, (0, 0))
    splits = data.mnist(str(root), download=False)
    expected = torch.as_tensor(raw["train_x"]).float().div(255).sub(0.1307).div(0.3081)
    torch.testing.assert_close(splits.train_x[:, 0], expected)


def test_runs_extracting_the_same_archive_at_once_both_succeed(fake_mnist, monkeypatch) -> None:
    """Runs of a parallel sweep extract a fresh folder's archives together: while one copies,
    another extracts and renames the same file; neither may lose its temporary file."""
    root, raw = fake_mnist
    copy = shutil.copyfileobj
    overlapped = []

    def copy_while_another_run_extracts(source, sink) -> None:
        copy(source, sink)
        if not overlapped:
            overlapped.append(True)
            data.mnist(str(root), download=False)  # the other run, from start to finish

    monkeypatch.setattr(data.shutil, "copyfileobj", copy_while_another_run_extracts)
    splits = data.mnist(str(root), download=False)
    assert overlapped
    expected = torch.as_tensor(raw["train_x"]).float().div(255).sub(0.1307).div(0.3081)
    torch.testing.assert_close(splits.train_x[:, 0], expected)
    assert not [p.name for p in (root / "MNIST" / "raw").iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_uint8_training_storage_holds_pixels_and_gives_the_float32_minibatches(
    tmp_path: Path, fake_mnist, skip_md5, dataset: str
) -> None:
    if dataset == "mnist":
        root, raw = fake_mnist
        pixels = raw["train_x"][:, None]
    else:
        root = tmp_path / "cifar"
        pixels = write_cifar(root, cifar100=False)["train_x"].reshape(-1, 3, 32, 32)
    load = getattr(data, dataset)
    floats = load(str(root), download=False, val_size=2)
    stored = load(str(root), download=False, val_size=2, train_storage="uint8")
    assert stored.train_x.dtype == torch.uint8 and stored.image_shape == floats.image_shape
    # The same examples as float32 storage (the validation split held out alike), as pixels.
    assert torch.equal(stored.train_y, floats.train_y)
    assert set(stored.train_x.unique().tolist()) <= set(np.unique(pixels).tolist())
    # Normalised per batch, they are the float32 storage's values exactly, not approximately.
    assert torch.equal(stored.train_images(stored.train_x), floats.train_x)
    assert torch.equal(stored.val_x, floats.val_x) and torch.equal(stored.test_x, floats.test_x)
    seen = 0
    for (x, y), (x_float, y_float) in zip(
        stored.train_minibatches(3, torch.Generator().manual_seed(4)),
        floats.train_minibatches(3, torch.Generator().manual_seed(4)),
        strict=True,
    ):
        assert x.dtype == torch.float32 and torch.equal(x, x_float) and torch.equal(y, y_float)
        seen += len(y)
    assert seen == len(floats.train_y)


def test_an_unknown_training_storage_is_refused(fake_mnist) -> None:
    root, _ = fake_mnist
    with pytest.raises(ValueError, match="train_storage must be float32 or uint8"):
        data.mnist(str(root), download=False, train_storage="float16")


@pytest.mark.parametrize("device", OTHER_DEVICES)
def test_a_training_split_kept_on_the_host_reaches_the_device_batch_by_batch(
    fake_mnist, device: str
) -> None:
    root, _ = fake_mnist
    on_host = data.mnist(str(root), download=False, device=device, train_on_device=False)
    assert on_host.train_x.device.type == on_host.train_y.device.type == "cpu"
    assert on_host.test_x.device.type == device  # evaluation splits stay on the device
    assert on_host.train_x.is_pinned() == (device == "cuda")
    batches = list(on_host.train_minibatches(5, torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in batches] == [5, 5, 2]
    assert all(x.device.type == y.device.type == device for x, y in batches)
    assert all(x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28) for x, _ in batches)
    if device == "cuda":
        on_device = data.mnist(str(root), download=False, device=device)
        expected = on_device.train_minibatches(5, torch.Generator(device).manual_seed(0))
        for (x, y), (x_expected, y_expected) in zip(batches, expected, strict=True):
            assert torch.equal(x, x_expected) and torch.equal(y, y_expected)
