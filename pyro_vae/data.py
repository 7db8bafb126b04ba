"""Data sets as device-resident tensors, and their binarisation.

A whole data set is read once into one tensor on the training device. Shuffling and
batching index that tensor, so an epoch makes no per-image transforms and no per-batch
host-to-device copies.

Grey-scale images (MNIST, Fashion-MNIST) become binary data for the Bernoulli
likelihood by sampling each pixel as Bernoulli(intensity):

* ``dynamic``: a fresh sample every epoch (the protocol of Burda et al., 2015), seeded
  from ``(seed, epoch)`` so a resumed run sees the very same samples;
* ``fixed``: one sample drawn with a fixed seed, reused every epoch.

The test set is binarised once with a fixed seed, so every evaluation of every run sees
the same binary images. ``binarized-mnist`` is Larochelle & Murray's fixed binarisation
and is used as it is.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DATASETS

DATA_DIR_ENV = "PYRO_VAE_DATA"
DEFAULT_DATA_DIR = Path.home() / ".cache" / "pyro_vae" / "data"
FIXED_BINARIZATION_SEED = 0  # same binary training set for every run with --binarize fixed
TEST_BINARIZATION_SEED = 1  # same binary test set for every evaluation of every run
BINARIZED_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"



class DatasetNotFoundError(FileNotFoundError):
    """The data set's files are not in the data directory and could not be downloaded."""


@dataclass
class ImageData:
    """One split of a data set, held on one device.

    ``images``: float tensor ``(N, C, H, W)``, values in [0, 1] (grey) or {0, 1} (binary).
    ``labels``: long tensor ``(N,)`` of classes, or ``None`` when the data set has none.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    binary: bool
    classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def head(self, n: int | None) -> "ImageData":
        """The first ``n`` images (all when ``n`` is None)."""
        if n is None:
            return self
        labels = None if self.labels is None else self.labels[:n]
        return ImageData(self.images[:n], labels, self.binary, self.classes)

    def to(self, device) -> "ImageData":
        labels = None if self.labels is None else self.labels.to(device)
        return ImageData(self.images.to(device), labels, self.binary, self.classes)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` if given, else ``$PYRO_VAE_DATA``, else ``~/.cache/pyro_vae/data``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else DEFAULT_DATA_DIR


def load_split(name: str, split: str, data_dir=None, download: bool = True) -> ImageData:
    """Read one split ("train", "test", and "valid" for binarized-mnist) on the CPU."""
    root = resolve_data_dir(data_dir)
    if name in ("mnist", "fashion-mnist"):
        if split not in ("train", "test"):
            raise ValueError(f"{name} has splits 'train' and 'test', not {split!r}")
        return _load_torchvision(name, split == "train", root, download)
    if name == "binarized-mnist":
        return _load_binarized_mnist(split, root, download)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def load_data(config, split: str, device) -> ImageData:
    """One split of a run's data set (a :class:`pyro_vae.config.RunConfig`) on ``device``,
    cut to the configured limit and checked."""
    data = load_split(config.data.dataset, split, config.data.data_dir, config.data.download)
    limit = config.data.train_limit if split == "train" else config.data.test_limit
    data = data.head(limit)
    check_images(data.images, what=f"the {config.data.dataset} {split} images")
    return data.to(device)


def _load_torchvision(name: str, train: bool, root: Path, download: bool) -> ImageData:
    from torchvision import datasets

    klass = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[name]
    try:
        ds = klass(str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise _missing(name, root / klass.__name__ / "raw", _expected_files(klass), "downloading is switched off") from None
        try:
            ds = klass(str(root), train=train, download=True)
        except Exception as err:  # URLError, HTTPError, RuntimeError: all mean "offline or blocked"
            raise _missing(name, root / klass.__name__ / "raw", _expected_files(klass), f"the download failed ({err})") from err
    images = ds.data.unsqueeze(1).float().div_(255.0)
    return ImageData(images, ds.targets.long(), binary=False, classes=tuple(ds.classes))


def _expected_files(klass) -> list[str]:
    return [os.path.splitext(os.path.basename(url))[0] for url, _ in klass.resources]


def _load_binarized_mnist(split: str, root: Path, download: bool) -> ImageData:
    if split not in ("train", "valid", "test"):
        raise ValueError(f"binarized-mnist has splits 'train', 'valid' and 'test', not {split!r}")
    folder = root / "binarized_mnist"
    stem = f"binarized_mnist_{split}.amat"
    candidates = [folder / f"{stem}.gz", folder / stem]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        if not download:
            raise _missing("binarized-mnist", folder, [c.name for c in candidates[:1]], "downloading is switched off")
        from torchvision.datasets.utils import download_url

        try:
            download_url(BINARIZED_MNIST_URL + stem, str(folder))
        except Exception as err:
            raise _missing("binarized-mnist", folder, [c.name for c in candidates[:1]], f"the download failed ({err})") from err
        path = folder / stem
    images = torch.from_numpy(_read_amat(path)).float().reshape(-1, 1, 28, 28)
    return ImageData(images, None, binary=True)


def _read_amat(path: Path) -> np.ndarray:
    """Parse an .amat file of lines '0 1 0 ... 1' (784 values) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    width = 2 * 784  # 784 digits, each followed by a space or the newline
    buf = np.frombuffer(raw, dtype=np.uint8)
    if buf.size % width == 0:
        rows = buf.reshape(-1, width)
        digits = rows[:, 0::2] - ord("0")
        seps = rows[:, 1::2]
        if digits.max(initial=0) <= 1 and np.all(seps[:, :-1] == ord(" ")) and np.all(seps[:, -1] == ord("\n")):
            return digits.copy()
    # Not the compact layout (other whitespace, say): fall back to the general parser.
    values = np.loadtxt(path, dtype=np.float32)
    if values.ndim != 2 or values.shape[1] != 784 or not np.isin(values, (0.0, 1.0)).all():
        raise ValueError(f"{path} is not a binarized-MNIST .amat file (784 values in {{0,1}} per line)")
    return values.astype(np.uint8)


def _missing(name: str, folder: Path, files: list[str], why: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"dataset {name!r} not found: expected the files {', '.join(files)} in {folder}, and {why}. "
        f"Put the files there, or point --data-dir (or the {DATA_DIR_ENV} environment variable) "
        "at a folder that holds them."
    )


# -- binarisation -------------------------------------------------------------------


def binarize(images: torch.Tensor, seed: int) -> torch.Tensor:
    """x ~ Bernoulli(images), elementwise, from a generator seeded with ``seed``."""
    gen = torch.Generator(device=images.device)
    gen.manual_seed(int(seed))
    return torch.bernoulli(images, generator=gen)


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A seed for one random stream (shuffling, binarisation) of one epoch of one run."""
    return (int(seed) * 1_000_003 + int(epoch)) * 8 + stream


class TrainingSet:
    """The training images on the device, with per-epoch binarisation and shuffling.

    Everything random about epoch ``e`` is a function of ``(seed, e)``: a run resumed
    at any epoch sees exactly the images and order an uninterrupted run would.
    """

    SHUFFLE, BINARIZE = 0, 1

    def __init__(self, data: ImageData, binarization: str, seed: int):
        if binarization not in ("dynamic", "fixed"):
            raise ValueError(f"binarization must be 'dynamic' or 'fixed', got {binarization!r}")
        self.data = data
        self.seed = int(seed)
        self.dynamic = binarization == "dynamic" and not data.binary
        if data.binary:
            self._fixed = data.images
        elif not self.dynamic:
            self._fixed = binarize(data.images, FIXED_BINARIZATION_SEED)

    def __len__(self) -> int:
        return len(self.data)

    def images(self, epoch: int) -> torch.Tensor:
        if self.dynamic:
            return binarize(self.data.images, epoch_seed(self.seed, epoch, self.BINARIZE))
        return self._fixed

    def permutation(self, epoch: int) -> torch.Tensor:
        device = self.data.images.device
        gen = torch.Generator(device=device)
        gen.manual_seed(epoch_seed(self.seed, epoch, self.SHUFFLE))
        return torch.randperm(len(self), generator=gen, device=device)


def binary_test_set(data: ImageData) -> ImageData:
    """The test split binarised once with a fixed seed (unchanged if already binary)."""
    if data.binary:
        return data
    return ImageData(binarize(data.images, TEST_BINARIZATION_SEED), data.labels, True, data.classes)


def check_images(images: torch.Tensor, image_shape=None, what: str = "images") -> None:
    """Reject data that no VAE here can train on, with a message saying what is wrong."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(images).__name__}")
    if images.shape[0] == 0:
        raise ValueError(f"{what} is empty: there is nothing to train on")
    if images.dim() != 4:
        raise ValueError(f"{what} must have shape (N, C, H, W), got {tuple(images.shape)}")
    if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(f"{what} have shape {tuple(images.shape[1:])}, expected {tuple(image_shape)}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"{what} must lie in [0, 1], found values in [{lo:g}, {hi:g}]; scale pixels to [0, 1]")
