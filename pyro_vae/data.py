"""Data sets as device-resident tensors, and their binarisation.

A whole data set is read once into one tensor on the training device. Shuffling and
batching index that tensor, so an epoch makes no per-image transforms and no per-batch
host-to-device copies.

Grey-scale images (MNIST, Fashion-MNIST) become binary data for the Bernoulli
likelihood by sampling each pixel as Bernoulli(intensity):

* ``dynamic``: a fresh sample every epoch (the protocol of Burda et al., 2015), seeded
  from ``(seed, epoch)`` so a resumed run sees the very same samples;
* ``fixed``: one sample drawn with a fixed seed, reused every epoch.

Only likelihoods that score binary data are given binarised images; continuous ones
(continuous Bernoulli, Gaussian) see the grey values as they are
(``TrainingSet(data, None, seed)``).

The test set is binarised once with a fixed seed, so every evaluation of every run sees
the same binary images. ``binarized-mnist`` is Larochelle & Murray's fixed binarisation
and is used as it is.

Data sets are registered in :data:`DATASETS`, each with a loader
``(split, root, download) -> ImageData``:

* ``mnist``, ``fashion-mnist``: torchvision's files, 60,000 / 10,000 grey 28 x 28 images.
* ``binarized-mnist``: 50,000 / 10,000 / 10,000 (train / valid / test) binary images.
* ``frey``: Frey Face (the face data of Kingma & Welling, 2013), 1,965 grey images of
  28 x 20 from ``frey/frey_rawface.mat``. The frames are consecutive frames of one video,
  so neighbours are near-copies: a random split would put copies of test frames in the
  training set. The split is therefore contiguous and fixed: frames 1-1,765 train,
  frames 1,766-1,965 (the last 200) test. No labels.
* ``frey-shuffled``: the same frames split as FFJORD and the Sylvester-flow papers report
  Frey Face: shuffled, 1,565 train, 200 valid, 200 test (near copies of test frames then
  train; the protocol's numbers are on that split).
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .catalog import DATASETS

DATA_DIR_ENV = "PYRO_VAE_DATA"
DEFAULT_DATA_DIR = Path.home() / ".cache" / "pyro_vae" / "data"
FIXED_BINARIZATION_SEED = 0  # same binary training set for every run with --binarize fixed
TEST_BINARIZATION_SEED = 1  # same binary test set for every evaluation of every run
BINARIZED_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
FREY_URL = "https://cs.nyu.edu/~roweis/data/frey_rawface.mat"
FREY_TRAIN = 1765  # frames 0..1764 train, the last 200 frames test (see the module docstring)
FREY_SHUFFLE_SEED = 0  # frey-shuffled: the permutation of the published protocol's split

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
    return DATASETS[name](split, resolve_data_dir(data_dir), download)


def load_data(config, split: str, device) -> ImageData:
    """One split of a data set described by a :class:`pyro_vae.config.DataConfig`, on
    ``device``, cut to the configured limit and checked."""
    data = load_split(config.dataset, split, config.data_dir, config.download)
    limit = config.train_limit if split == "train" else config.test_limit
    data = data.head(limit)
    check_images(data.images, what=f"the {config.dataset} {split} images")
    return data.to(device)


def _train_or_test(name: str, split: str) -> bool:
    if split not in ("train", "test"):
        raise ValueError(f"{name} has splits 'train' and 'test', not {split!r}")
    return split == "train"


def _load_mnist(split: str, root: Path, download: bool) -> ImageData:
    return _load_torchvision("mnist", _train_or_test("mnist", split), root, download)


def _load_fashion_mnist(split: str, root: Path, download: bool) -> ImageData:
    return _load_torchvision("fashion-mnist", _train_or_test("fashion-mnist", split), root, download)


_IDX_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}  # torchvision's layout under the data folder
_IDX_CLASSES = {
    "mnist": ("0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
              "8 - eight", "9 - nine"),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
}


def _read_idx(path: Path) -> torch.Tensor | None:
    """An IDX file of unsigned bytes (LeCun's format of MNIST): 4 bytes of magic, the last
    of them the number of dimensions, a big-endian uint32 per dimension, then the data."""
    raw = path.read_bytes()
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":  # zero, zero, 0x08 = unsigned bytes
        return None
    dims = raw[3]
    shape = struct.unpack(f">{dims}I", raw[4:4 + 4 * dims])
    if len(raw) != 4 + 4 * dims + int(np.prod(shape)):
        return None  # truncated or padded: torchvision's reader says what is wrong
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape).copy())


def _load_torchvision(name: str, train: bool, root: Path, download: bool) -> ImageData:
    # files already there are read without torchvision, whose import takes seconds
    raw = root / _IDX_FOLDERS[name] / "raw"
    prefix = "train" if train else "t10k"
    images_file, labels_file = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
    if images_file.is_file() and labels_file.is_file():
        images, labels = _read_idx(images_file), _read_idx(labels_file)
        if images is not None and labels is not None and images.dim() == 3 and labels.shape == images.shape[:1]:
            return ImageData(images.unsqueeze(1).float().div_(255.0), labels.long(), binary=False,
                             classes=_IDX_CLASSES[name])
    from torchvision import datasets

    klass = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[name]
    try:
        ds = klass(str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise _missing(name, root / klass.__name__ / "raw", _expected_files(klass), "downloading is switched off") from None
        try:
            with _undone_on_failure(root / klass.__name__ / "raw"):
                ds = klass(str(root), train=train, download=True)
        except Exception as err:  # URLError, HTTPError, RuntimeError: all mean "offline or blocked"
            raise _missing(name, root / klass.__name__ / "raw", _expected_files(klass), f"the download failed ({err})") from err
    images = ds.data.unsqueeze(1).float().div_(255.0)
    return ImageData(images, ds.targets.long(), binary=False, classes=tuple(ds.classes))


@contextlib.contextmanager
def _undone_on_failure(folder: Path):
    """If the block raises, remove the folders on the way to ``folder`` that did not exist
    when it began, so that a failed download leaves no empty ``MNIST/raw`` (and no
    ``--data-dir`` made up on the spot) behind. What existed before is never touched: the
    topmost of the new folders goes, with what the failed download wrote into it."""
    new = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]
    try:
        yield
    except BaseException:
        if new:
            shutil.rmtree(new[-1], ignore_errors=True)
        raise


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
            with _undone_on_failure(folder):
                download_url(BINARIZED_MNIST_URL + stem, str(folder))
        except Exception as err:
            raise _missing("binarized-mnist", folder, [c.name for c in candidates[:1]], f"the download failed ({err})") from err
        path = folder / stem
    images = torch.from_numpy(_read_amat(path)).float().reshape(-1, 1, 28, 28)
    return ImageData(images, None, binary=True)


def _load_frey(split: str, root: Path, download: bool) -> ImageData:
    train = _train_or_test("frey", split)
    frames = _frey_frames(root, download)
    frames = frames[:FREY_TRAIN] if train else frames[FREY_TRAIN:]
    return ImageData(torch.from_numpy(np.ascontiguousarray(frames)).float().div_(255.0), None, binary=False)


def _load_frey_shuffled(split: str, root: Path, download: bool) -> ImageData:
    """The published protocol's split (Grathwohl et al. 2019, Table 3; van den Berg et al. 2018):
    a shuffled 1,565 / 200 / 200 split. Their permutation is not published; this one is
    numpy's ``default_rng(0).permutation(1965)``. Neighbouring frames of the video are near
    copies, so test faces have near copies among the training faces, as in that protocol."""
    if split not in ("train", "valid", "test"):
        raise ValueError(f"frey-shuffled has splits 'train', 'valid' and 'test', not {split!r}")
    frames = _frey_frames(root, download)
    order = np.random.default_rng(FREY_SHUFFLE_SEED).permutation(frames.shape[0])
    start, stop = {"train": (0, 1565), "valid": (1565, 1765), "test": (1765, 1965)}[split]
    chosen = frames[np.sort(order[start:stop])]
    return ImageData(torch.from_numpy(np.ascontiguousarray(chosen)).float().div_(255.0), None, binary=False)


def _frey_frames(root: Path, download: bool) -> np.ndarray:
    """All 1,965 frames, ``(1965, 1, 28, 20)`` uint8, in the video's order."""
    folder = root / "frey"
    path = folder / "frey_rawface.mat"
    if not path.exists():
        if not download:
            raise _missing("frey", folder, [path.name], "downloading is switched off")
        from torchvision.datasets.utils import download_url

        try:
            with _undone_on_failure(folder):
                download_url(FREY_URL, str(folder))
        except Exception as err:
            raise _missing("frey", folder, [path.name], f"the download failed ({err})") from err
    from scipy.io import loadmat

    # 'ff' is (560, 1965): one column per frame, each frame 28 rows of 20 pixels, row-major
    return loadmat(str(path))["ff"].T.reshape(-1, 1, 28, 20)


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
    """x ~ Bernoulli(images), elementwise, from a generator seeded with ``seed``.

    The draws of ``torch.bernoulli(images, generator)``, bit for bit; on the CPU, for a
    contiguous float32 or float64 tensor, computed as ``uniform < images`` from the same
    generator's uniforms of that dtype, which are the numbers torch's Bernoulli kernel
    compares with, drawn in the same order (0.3 to 0.4 s for MNIST's 47 M pixels against
    0.8 s on one AMD EPYC core; tests/test_data.py holds the two equal).
    """
    gen = torch.Generator(device=images.device)
    gen.manual_seed(int(seed))
    if images.device.type == "cpu" and images.dtype in (torch.float32, torch.float64) and images.is_contiguous():
        return torch.rand(images.shape, generator=gen, dtype=images.dtype).lt_(images)  # 1.0 where below
    return torch.bernoulli(images, generator=gen)


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A seed for one random stream (shuffling, binarisation) of one epoch of one run."""
    return (int(seed) * 1_000_003 + int(epoch)) * 8 + stream


UNLABELLED = -1  # the label of an image whose label is hidden from the program (or unknown)
LABELS_SEED_STREAM = 2  # the stream of a run's seed that chooses the labelled images (--labels N)


def choose_labelled(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """The positions of ``count`` images whose labels a semi-supervised run keeps: as equal a
    number of each class as ``count`` allows (``count // C`` each, one more for ``count % C``
    classes picked at random), the images of each class picked at random; sorted, ``(count,)``.

    Random from a CPU generator seeded by ``seed`` alone, so the choice is the same on every
    device and for every other setting of the run (``--labels 100 --seed 3`` keeps the same
    100 images whatever the epochs or the model). A run records its choice
    (:func:`pyro_vae.train.fit`), and a resumed run restores the recorded one."""
    labels = labels.detach().cpu()
    classes = torch.unique(labels[labels != UNLABELLED])
    if count > labels.shape[0]:
        raise ValueError(f"--labels {count} asks for more labelled images than the {labels.shape[0]} training images")
    if classes.numel() == 0:
        raise ValueError("--labels N keeps the labels of N images, and this data set has none")
    gen = torch.Generator().manual_seed(epoch_seed(seed, 0, LABELS_SEED_STREAM))
    share = torch.full((classes.numel(),), count // classes.numel(), dtype=torch.long)
    share[torch.randperm(classes.numel(), generator=gen)[: count % classes.numel()]] += 1
    chosen = []
    for c, k in zip(classes.tolist(), share.tolist()):
        members = (labels == c).nonzero().squeeze(1)
        if k > members.numel():
            raise ValueError(f"--labels {count} keeps {k} images of class {c}, which has {members.numel()} in the "
                             "training set; ask for fewer labels (or train on more images)")
        chosen.append(members[torch.randperm(members.numel(), generator=gen)[:k]])
    return torch.cat(chosen).sort().values


def hide_labels(data: ImageData, keep: torch.Tensor) -> ImageData:
    """``data`` with every label but those at the positions ``keep`` replaced by :data:`UNLABELLED`."""
    if data.labels is None:
        raise ValueError("--labels N keeps the labels of N images, and this data set has none")
    hidden = torch.full_like(data.labels, UNLABELLED)
    keep = keep.to(data.labels.device)
    hidden[keep] = data.labels[keep]
    return ImageData(data.images, hidden, data.binary, data.classes)


def labelled_per_batch(batch_size: int, num_labelled: int, num_data: int) -> int:
    """How many of a semi-supervised minibatch's ``batch_size`` images are labelled: the
    labelled share of the data set, but at least an eighth of the batch (while there are
    unlabelled images too).

    Any share gives an unbiased estimate of the objective, since each part's plate scales
    it by its own ``N / b`` (:mod:`pyro_vae.models.m2`); the share sets its variance and
    cost. With few labels (100 of 60,000) the data set's share is 0.2 images a batch, so a
    labelled image would come once in five steps with a weight of 500 times its own; an
    eighth of the batch (25 of 200) gives every step a labelled part whose weight is
    N_l / 25, for 12 % more images a step, each cheaper than an unlabelled one (no sum over
    the classes). Pyro's tutorial instead alternates whole labelled and unlabelled
    batches, each labelled image once an epoch, which is this scheme's expectation with
    more variance."""
    if num_labelled <= 0:
        return 0
    if num_labelled >= num_data:
        return batch_size
    share = max(math.ceil(batch_size * num_labelled / num_data), math.ceil(batch_size / 8))
    return max(1, min(share, num_labelled, batch_size - 1))


class TrainingSet:
    """The training images on the device, with per-epoch binarisation and shuffling.

    Everything random about epoch ``e`` is a function of ``(seed, e)``: a run resumed
    at any epoch sees exactly the images and order an uninterrupted run would.

    Labels equal to :data:`UNLABELLED` are unknown to the program. A semi-supervised
    program's minibatches each hold labelled and unlabelled images (:meth:`mixed_order`).
    """

    SHUFFLE, BINARIZE, LABELLED = 0, 1, 3

    def __init__(self, data: ImageData, binarization: str | None, seed: int):
        """``binarization``: "dynamic", "fixed", or None for the images as they are."""
        if binarization not in ("dynamic", "fixed", None):
            raise ValueError(f"binarization must be 'dynamic', 'fixed' or None, got {binarization!r}")
        self.data = data
        self.seed = int(seed)
        self.dynamic = binarization == "dynamic" and not data.binary
        if data.binary or binarization is None:
            self._fixed = data.images
        elif not self.dynamic:
            self._fixed = binarize(data.images, FIXED_BINARIZATION_SEED)

    @property
    def labels(self) -> torch.Tensor | None:
        """The labels on the device, or None when the data set has none."""
        return self.data.labels

    def __len__(self) -> int:
        return len(self.data)

    _last: tuple[int, torch.Tensor] | None = None  # the last epoch binarised, and its images

    def images(self, epoch: int) -> torch.Tensor:
        if not self.dynamic:
            return self._fixed
        if self._last is None or self._last[0] != epoch:  # (drawing 47 M pixels takes a quarter second)
            self._last = (epoch, binarize(self.data.images, epoch_seed(self.seed, epoch, self.BINARIZE)))
        return self._last[1]

    def permutation(self, epoch: int, count: int | None = None) -> torch.Tensor:
        device = self.data.images.device
        gen = torch.Generator(device=device)
        gen.manual_seed(epoch_seed(self.seed, epoch, self.SHUFFLE))
        return torch.randperm(len(self) if count is None else count, generator=gen, device=device)

    _parts: tuple[torch.Tensor, torch.Tensor] | None = None

    def parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(labelled, unlabelled)``: the positions of the images with and without a label (sorted)."""
        if self._parts is None:
            labels = self.labels
            n = len(self)
            device = self.data.images.device
            if labels is None:
                self._parts = (torch.zeros(0, dtype=torch.long, device=device), torch.arange(n, device=device))
            else:
                known = labels != UNLABELLED
                self._parts = (known.nonzero().squeeze(1), (~known).nonzero().squeeze(1))
        return self._parts

    def labelled_per_batch(self, batch_size: int) -> int:
        """The labelled images of each minibatch of a semi-supervised program (:func:`labelled_per_batch`)."""
        return labelled_per_batch(batch_size, self.parts()[0].numel(), len(self))

    def num_steps(self, batch_size: int, semi_supervised: bool = False) -> int:
        """Minibatches in an epoch: every image once, or for a semi-supervised program every
        unlabelled image once (the labelled ones come round as often as their share needs)."""
        labelled = self.labelled_per_batch(batch_size) if semi_supervised else 0
        if 0 < labelled < batch_size:
            return math.ceil(self.parts()[1].numel() / (batch_size - labelled))
        return math.ceil(len(self) / batch_size)

    def mixed_order(self, epoch: int, batch_size: int) -> torch.Tensor:
        """The positions of a semi-supervised epoch's images in minibatch order: step ``s``
        takes ``order[s * batch_size : (s + 1) * batch_size]``, whose first
        :meth:`labelled_per_batch` positions are labelled images and the rest unlabelled.

        The unlabelled images come once each in a random order; the labelled ones as a
        stream of random permutations of them, one after another (a minibatch that spans
        two may hold an image twice; each position of the stream is still a uniform draw,
        so the estimate stays unbiased). Both are functions of ``(seed, epoch)``. Where all
        images are labelled, or none, it is :meth:`permutation`."""
        labelled, unlabelled = self.parts()
        b_l = self.labelled_per_batch(batch_size)
        if b_l in (0, batch_size):
            return self.permutation(epoch)
        b_u = batch_size - b_l
        steps = math.ceil(unlabelled.numel() / b_u)
        device = labelled.device
        unlabelled = unlabelled[self.permutation(epoch, unlabelled.numel())]
        gen = torch.Generator(device=device)
        gen.manual_seed(epoch_seed(self.seed, epoch, self.LABELLED))
        rounds = math.ceil(steps * b_l / labelled.numel())
        stream = labelled[torch.cat([torch.randperm(labelled.numel(), generator=gen, device=device)
                                     for _ in range(rounds)])]
        blocks = []
        for s in range(steps):
            blocks += [stream[s * b_l : (s + 1) * b_l], unlabelled[s * b_u : (s + 1) * b_u]]
        return torch.cat(blocks)


def test_set(data: ImageData, binary: bool) -> ImageData:
    """The test split as a program scores it: binarised once with a fixed seed when
    ``binary`` and the images are grey; else unchanged."""
    if data.binary or not binary:
        return data
    return ImageData(binarize(data.images, TEST_BINARIZATION_SEED), data.labels, True, data.classes)


def binary_test_set(data: ImageData) -> ImageData:
    """The test split binarised once with a fixed seed (unchanged if already binary)."""
    return test_set(data, True)


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
    lo, hi = (float(v) for v in torch.aminmax(images))  # one pass; NaN and infinities show in the extremes
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{what} contain NaN or infinite values")
    if lo < 0 or hi > 1:
        raise ValueError(f"{what} must lie in [0, 1], found values in [{lo:g}, {hi:g}]; scale pixels to [0, 1]")
