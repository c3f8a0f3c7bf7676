"""Datasets as tensors on the training device, and on-device minibatching.

The paper's datasets are small (MNIST 188 MB, CIFAR 614 MB as float32), so each split is converted
once into one normalised tensor and moved to the device. Batching is then a random permutation and
index slices on that device: no DataLoader workers, no per-sample Python, no host-to-device copies
per step, which would otherwise dominate the cost of NoProp's cheap per-block updates.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchvision import datasets


@dataclass
class DataSplits:
    """A dataset as tensors on the training device: images normalised (N, C, H, W) float32,
    labels int64. The validation split, when there is one (`val_size` > 0), is held out of the
    training split: studies choose on it, and the test split only reports what they chose."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    val_x: Tensor | None = None
    val_y: Tensor | None = None
    # dataset.train_storage=uint8 (ours): the training images stay uint8 (N, C, H, W), 4x smaller
    # on the device, and are normalised per minibatch with these per-channel (mean, std).
    train_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    # dataset.train_on_device=false (ours): the training split stays in host memory and each
    # minibatch is copied to this device.
    train_device: torch.device | None = None

    def train_images(self, images: Tensor) -> Tensor:
        """Training images as the model sees them, normalised float32, however they are stored."""
        return images if self.train_stats is None else _scale(images, *self.train_stats)

    def train_minibatches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One shuffled pass over the training split (`minibatches`), each batch on the training
        device and normalised."""
        for x, y in minibatches(self.train_x, self.train_y, batch_size, generator):
            if self.train_device is not None:
                x = x.to(self.train_device, non_blocking=True)
                y = y.to(self.train_device, non_blocking=True)
            yield self.train_images(x), y

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """(images, labels) of the "test" or "val" split; ValueError when there is no val split."""
        images, labels = (self.test_x, self.test_y) if name == "test" else (self.val_x, self.val_y)
        if images is None:
            raise ValueError(f"{self.name} has no {name} split (dataset.val_size=0)")
        return images, labels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return (c, h, w)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not under the given root and could not be downloaded."""


class CorruptDatasetError(RuntimeError):
    """A dataset file exists but cannot be read: truncated or corrupted."""


@dataclass(frozen=True)
class _Source:
    """Where torchvision keeps one dataset on disk, and how to normalise it."""

    key: str  # DataSplits.name, as in the config group
    name: str  # for messages
    dataset: type[datasets.VisionDataset]
    folder: str  # relative to root, torchvision's layout
    files: tuple[str, ...]
    gzipped: bool  # the files may be present only as `<file>.gz` (as MNIST is distributed)
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def missing(self, root: Path) -> list[str]:
        def present(file: str) -> bool:
            path = root / self.folder / file
            return path.is_file() or (self.gzipped and path.with_name(file + ".gz").is_file())

        return [f for f in self.files if not present(f)]

    def decompress(self, root: Path) -> None:
        """Unpack `<file>.gz` where the raw file is absent or older than the archive (a restored
        archive replaces what an earlier one gave): torchvision reads raw files."""
        if not self.gzipped:
            return
        for file in self.files:
            path = root / self.folder / file
            archive = path.with_name(file + ".gz")
            if archive.is_file() and (
                not path.is_file() or path.stat().st_mtime < archive.stat().st_mtime
            ):
                _gunzip_atomically(archive, path)

    def not_found_message(self, root: Path, missing: list[str], reason: str) -> str:
        suffix = " (each may be .gz compressed)" if self.gzipped else ""
        return (
            f"{self.name} not found under dataset root {root} ({reason}).\n"
            f"Expected in {root / self.folder}{suffix}: {', '.join(self.files)}\n"
            f"Missing: {', '.join(missing)}\n"
            f"Fix: put the files there, or point to the folder that holds `{self.folder}` with "
            f"dataset.root=/path/to/data (or the NOPROP_DATA_DIR environment variable), "
            f"or set dataset.download=true on a machine with internet access."
        )


_MNIST = _Source(
    key="mnist",
    name="MNIST",
    dataset=datasets.MNIST,
    folder="MNIST/raw",
    files=(
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ),
    gzipped=True,
    mean=(0.1307,),
    std=(0.3081,),
)
_CIFAR10 = _Source(
    key="cifar10",
    name="CIFAR-10",
    dataset=datasets.CIFAR10,
    folder="cifar-10-batches-py",
    files=(*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"),
    gzipped=False,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)
_CIFAR100 = _Source(
    key="cifar100",
    name="CIFAR-100",
    dataset=datasets.CIFAR100,
    folder="cifar-100-python",
    files=("train", "test", "meta"),
    gzipped=False,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)


def mnist(
    root: str,
    train_size: int | None = None,
    test_size: int | None = None,
    download: bool = True,
    subset_seed: int = 0,
    device: str | torch.device = "cpu",
    val_size: int = 0,
    train_storage: str = "float32",
    train_on_device: bool = True,
) -> DataSplits:
    """MNIST (1x28x28, 10 classes), standard 60k/10k split, normalised with mean 0.1307 std 0.3081.

    `train_size` / `test_size`: None for the whole split, else a random subset drawn with
    `subset_seed`. `val_size` examples of the standard training split are held out first (also
    drawn with `subset_seed`), so the validation set does not change with `train_size`.
    `train_storage`: `float32` (normalised once) or `uint8` (kept as pixels, normalised per
    minibatch: the same values, a quarter of the memory). `train_on_device=False` keeps the
    training split in host memory (pinned for a GPU) and copies each minibatch to `device`.
    Raises `DatasetNotFoundError` when the files are absent and cannot be downloaded.
    """
    return _load(_MNIST, **locals())  # locals(): exactly the arguments, before any other name


def cifar10(
    root: str,
    train_size: int | None = None,
    test_size: int | None = None,
    download: bool = True,
    subset_seed: int = 0,
    device: str | torch.device = "cpu",
    val_size: int = 0,
    train_storage: str = "float32",
    train_on_device: bool = True,
) -> DataSplits:
    """CIFAR-10 (3x32x32, 10 classes), standard 50k/10k split, per-channel normalisation.

    Arguments as for `mnist`.
    """
    return _load(_CIFAR10, **locals())


def cifar100(
    root: str,
    train_size: int | None = None,
    test_size: int | None = None,
    download: bool = True,
    subset_seed: int = 0,
    device: str | torch.device = "cpu",
    val_size: int = 0,
    train_storage: str = "float32",
    train_on_device: bool = True,
) -> DataSplits:
    """CIFAR-100 (3x32x32, 100 fine classes), standard 50k/10k split, per-channel normalisation.

    Arguments as for `mnist`.
    """
    return _load(_CIFAR100, **locals())


def _load(
    source: _Source,
    root: str,
    train_size: int | None,
    test_size: int | None,
    download: bool,
    subset_seed: int,
    device: str | torch.device,
    val_size: int,
    train_storage: str,
    train_on_device: bool,
) -> DataSplits:
    if train_storage not in ("float32", "uint8"):
        raise ValueError(
            f"{source.key}: dataset.train_storage must be float32 or uint8, got {train_storage!r}"
        )
    root_path = Path(root).expanduser().resolve()
    missing = source.missing(root_path)
    if missing:
        reason = "download=False"
        if download:
            try:  # torchvision fetches both splits at once
                source.dataset(str(root_path), train=True, download=True)
            except Exception as err:  # any failure becomes the one clear error below
                reason = f"download failed: {_summary(err)}"
            missing = source.missing(root_path)
        if missing:
            raise DatasetNotFoundError(source.not_found_message(root_path, missing, reason))
    source.decompress(root_path)

    generator = torch.Generator().manual_seed(subset_seed)
    splits, val = [], None
    for train, size in ((True, train_size), (False, test_size)):
        try:
            ds = source.dataset(str(root_path), train=train, download=False)
        except (RuntimeError, ValueError, EOFError, OSError) as err:
            raise CorruptDatasetError(
                f"{source.name} files in {root_path / source.folder} exist but could not be read "
                f"({_summary(err)}); they may be incomplete or corrupted: delete them and "
                f"download again (dataset.download=true)."
            ) from None
        images = torch.as_tensor(ds.data)
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
        if train and val_size:
            held_out, kept = _hold_out(len(labels), val_size, generator, source.key)
            val = (_normalise(images[held_out], source, device), labels[held_out].to(device))
            images, labels = images[kept], labels[kept]
        index = _subset(len(labels), size, generator, "train" if train else "test", source.key)
        if index is not None:
            images, labels = images[index], labels[index]
        on_host = train and not train_on_device
        where = "cpu" if on_host else device
        if train and train_storage == "uint8":
            images = _channels_first(images, where)
        else:
            images = _normalise(images, source, where)
        labels = labels.to(where)
        if on_host and torch.device(device).type == "cuda":
            images, labels = images.pin_memory(), labels.pin_memory()  # asynchronous copies
        splits.append((images, labels))
        num_classes = len(ds.classes)
    (train_x, train_y), (test_x, test_y) = splits
    loaded = DataSplits(source.key, train_x, train_y, test_x, test_y, num_classes, *(val or ()))
    if train_storage == "uint8":
        loaded.train_stats = (source.mean, source.std)
    if not train_on_device:
        loaded.train_device = torch.device(device)
    return loaded


def _normalise(images: Tensor, source: _Source, device: str | torch.device) -> Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> normalised float32 (N, C, H, W), converted on `device`
    so that only the 4x smaller uint8 array crosses to it."""
    return _scale(_channels_first(images, device), source.mean, source.std)


def _channels_first(images: Tensor, device: str | torch.device) -> Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> uint8 (N, C, H, W) on `device`."""
    images = images.to(device)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return images.contiguous()


def _scale(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (N, C, H, W) pixels -> float32, / 255, normalised per channel."""
    x = images.to(torch.float32).div_(255)
    mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def _gunzip_atomically(archive: Path, target: Path) -> None:
    """Decompress into a temporary file beside `target`, renamed into place only when complete,
    so an unreadable archive never leaves a partial file that later runs would trust. The
    temporary file is this call's own: runs of a parallel sweep may extract the same archive at
    once, and each renames a complete copy."""
    descriptor, name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".partial"
    )
    partial = Path(name)
    try:
        with gzip.open(archive, "rb") as source, os.fdopen(descriptor, "wb") as sink:
            shutil.copyfileobj(source, sink)
    except (OSError, EOFError, zlib.error) as err:
        partial.unlink(missing_ok=True)
        raise CorruptDatasetError(
            f"{archive} could not be decompressed ({_summary(err)}): the archive is truncated "
            f"or corrupted. Delete it and download it again (dataset.download=true), or copy a "
            f"good one there."
        ) from None
    partial.chmod(0o644)  # mkstemp's 0o600 would hide the file from other users of the folder
    os.replace(partial, target)


def _subset(
    available: int, size: int | None, generator: torch.Generator, split: str, name: str
) -> Tensor | None:
    """Indices of a random subset of `size` examples, or None for the whole split."""
    if size is None:
        return None
    if not 0 < size <= available:
        raise ValueError(
            f"{name}: {split}_size={size} is not possible: the {split} split has {available} "
            f"examples; use a value in 1..{available}, or null for all of them."
        )
    return torch.randperm(available, generator=generator)[:size]


def _hold_out(
    available: int, val_size: int, generator: torch.Generator, name: str
) -> tuple[Tensor, Tensor]:
    """Indices of a random validation set of `val_size` examples, and of the rest."""
    if not 0 <= val_size < available:
        raise ValueError(
            f"{name}: val_size={val_size} is not possible: the training split has {available} "
            f"examples, and some must stay for training; use a value in 0..{available - 1}."
        )
    order = torch.randperm(available, generator=generator)
    return order[:val_size], order[val_size:]


def _summary(err: BaseException, limit: int = 300) -> str:
    """One line naming the exception, short enough for an error message (no traceback)."""
    text = f"{type(err).__name__}: {' '.join(str(err).split())}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def synthetic(
    train_size: int | None = 512,
    test_size: int | None = 256,
    num_classes: int = 10,
    image_size: int = 16,
    channels: int = 1,
    noise: float = 1.0,
    subset_seed: int = 0,
    device: str | torch.device = "cpu",
    val_size: int = 0,
) -> DataSplits:
    """A small learnable image set: each class is a fixed smooth random image, each example that
    image (zero mean, unit variance) plus Gaussian noise of std `noise`, then scaled by
    1 / sqrt(1 + noise^2) so that pixels have unit variance, like normalised real images.

    As with a real dataset, the classes depend only on (num_classes, channels, image_size) and
    `subset_seed` picks the examples. None sizes mean the defaults (512 train, 256 test);
    `val_size` more examples are drawn for a validation split.
    Labels are balanced (as equal counts as the size allows). Generated on the CPU, then moved.
    """
    if num_classes < 2 or image_size < 4 or channels < 1 or noise < 0:
        raise ValueError(
            f"synthetic: need num_classes >= 2, image_size >= 4, channels >= 1, noise >= 0; "
            f"got {num_classes=}, {image_size=}, {channels=}, {noise=}."
        )
    # Smooth prototypes: random 4x4 patterns upsampled, so neighbouring pixels agree as in images
    # and a small CNN has local structure to pick up; zero mean, unit variance each. Their seed
    # is fixed (not subset_seed): the classes are the dataset, the seed only picks examples.
    coarse = torch.randn(num_classes, channels, 4, 4, generator=torch.Generator().manual_seed(0))
    prototypes = torch.nn.functional.interpolate(
        coarse, size=(image_size, image_size), mode="bicubic", align_corners=False
    )
    flat = prototypes.flatten(1)
    prototypes = (prototypes - flat.mean(1).view(-1, 1, 1, 1)) / flat.std(1).view(-1, 1, 1, 1)

    generator = torch.Generator().manual_seed(subset_seed)
    scale = math.sqrt(1.0 + noise**2)
    splits = []
    sizes = (512 if train_size is None else train_size, 256 if test_size is None else test_size)
    if val_size < 0:
        raise ValueError(f"synthetic: val_size must be >= 0, got {val_size}.")
    for size in (*sizes, *([val_size] if val_size else [])):
        if size < 1:
            raise ValueError(f"synthetic: sizes must be positive, got {size}.")
        labels = (torch.arange(size) % num_classes)[torch.randperm(size, generator=generator)]
        draw = torch.randn(size, channels, image_size, image_size, generator=generator)
        images = (prototypes[labels] + noise * draw) / scale
        splits.append((images.to(device), labels.to(device)))
    (train_x, train_y), (test_x, test_y), *val = splits
    return DataSplits(
        "synthetic", train_x, train_y, test_x, test_y, num_classes, *(val[0] if val else ())
    )


def minibatches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
) -> Iterator[tuple[Tensor, Tensor]]:
    """One pass over (x, y) in batches of `batch_size` (the last one may be smaller).

    With `shuffle`, one permutation per call (drawn on `generator`'s device, else on the data's),
    and each batch gathered on the data's device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}.")
    n = len(x)
    if not shuffle:
        for start in range(0, n, batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
        return
    perm_device = generator.device if generator is not None else x.device
    perm = torch.randperm(n, generator=generator, device=perm_device).to(x.device)
    for start in range(0, n, batch_size):
        index = perm[start : start + batch_size]
        yield x[index], y[index]
