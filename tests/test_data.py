"""Data sets from the data directory, binarisation, and the errors when data is missing."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae.data import (
    DatasetNotFoundError,
    ImageData,
    TrainingSet,
    binarize,
    binary_test_set,
    check_images,
    epoch_seed,
    load_split,
    resolve_data_dir,
)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_grey_datasets_load_as_one_tensor(data_dir, name):
    test = load_split(name, "test", data_dir, download=False)
    assert test.images.shape == (10_000, 1, 28, 28) and test.images.dtype == torch.float32
    assert float(test.images.min()) == 0.0 and float(test.images.max()) == 1.0
    assert not test.binary and len(test.classes) == 10
    assert test.labels.shape == (10_000,) and set(test.labels.unique().tolist()) == set(range(10))


def test_binarized_mnist_reads_larochelle_files(data_dir):
    test = load_split("binarized-mnist", "test", data_dir, download=False)
    assert test.images.shape == (10_000, 1, 28, 28) and test.binary and test.labels is None
    assert set(test.images.unique().tolist()) == {0.0, 1.0}
    # the fast parser agrees with numpy's text parser on the first lines
    with gzip.open(data_dir / "binarized_mnist" / "binarized_mnist_test.amat.gz", "rt") as f:
        first = np.loadtxt([next(f) for _ in range(50)])
    assert np.array_equal(test.images[:50].reshape(50, -1).numpy(), first)
    assert len(load_split("binarized-mnist", "valid", data_dir, download=False)) == 10_000


def test_data_dir_comes_from_argument_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PYRO_VAE_DATA", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("PYRO_VAE_DATA")
    assert resolve_data_dir().name == "data"


@pytest.mark.parametrize("download", [True, False])
def test_missing_mnist_offline_names_folder_and_files(tmp_path, download):
    # with download=True this runs torchvision's real download, which fails offline
    with pytest.raises(DatasetNotFoundError) as info:
        load_split("mnist", "train", tmp_path, download=download)
    msg = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and "train-images-idx3-ubyte" in msg and "--data-dir" in msg


def test_missing_binarized_mnist_names_folder_and_files(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="binarized_mnist_train.amat.gz"):
        load_split("binarized-mnist", "train", tmp_path, download=False)


def test_unknown_dataset_and_split(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load_split("cifar", "train", tmp_path)
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        load_split("mnist", "valid", tmp_path)


def grey(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageData(torch.rand(n, 1, 4, 4, generator=g), torch.arange(n) % 10, binary=False)


def test_dynamic_binarization_is_fresh_each_epoch_and_reproducible():
    ts = TrainingSet(grey(), "dynamic", seed=3)
    e0, e1 = ts.images(0), ts.images(1)
    assert set(e0.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(e0, e1)
    assert torch.equal(e0, TrainingSet(grey(), "dynamic", seed=3).images(0))
    assert not torch.equal(e0, TrainingSet(grey(), "dynamic", seed=4).images(0))
    # Bernoulli(intensity): the binary mean over many epochs approaches the grey image
    mean = torch.stack([ts.images(e) for e in range(400)]).mean(0)
    se = (ts.data.images * (1 - ts.data.images) / 400).sqrt()
    assert ((mean - ts.data.images).abs() <= 4 * se + 1e-6).float().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_binarize_draws_what_torch_bernoulli_draws_bit_for_bit(dtype, layout):
    """The quicker CPU form (uniforms compared with the images) keeps the draws of
    ``torch.bernoulli`` with the same seed, so runs and their documented numbers stay put;
    pixels at exactly 0 and 1 included."""
    images = torch.rand(300, 1, 6, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    images[:3], images[3:6] = 0.0, 1.0
    if layout == "transposed":
        images = images.transpose(2, 3)
    for seed in (0, 17, epoch_seed(3, 1, 0)):
        expected = torch.bernoulli(images, generator=torch.Generator().manual_seed(seed))
        drawn = binarize(images, seed)
        assert drawn.dtype == dtype and drawn.shape == images.shape
        assert torch.equal(drawn, expected), (dtype, layout, seed)
    assert drawn[:3].eq(0).all() and drawn[3:6].eq(1).all()


def test_fixed_binarization_is_the_same_every_epoch_and_run():
    a, b = TrainingSet(grey(), "fixed", seed=3), TrainingSet(grey(), "fixed", seed=9)
    assert torch.equal(a.images(0), a.images(5)) and torch.equal(a.images(0), b.images(0))


def test_permutation_per_epoch():
    ts = TrainingSet(grey(), "dynamic", seed=3)
    p0 = ts.permutation(0)
    assert torch.equal(p0.sort().values, torch.arange(50))
    assert torch.equal(p0, ts.permutation(0)) and not torch.equal(p0, ts.permutation(1))


def test_test_set_binarized_once_with_fixed_seed():
    a, b = binary_test_set(grey()), binary_test_set(grey())
    assert a.binary and torch.equal(a.images, b.images)
    assert set(a.images.unique().tolist()) == {0.0, 1.0}


def with_value(n, c, h, w, value):
    images = torch.full((2, 1, 4, 4), 0.5)
    images[n, c, h, w] = value
    return images


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.full((2, 1, 4, 4), 1.5), r"must lie in \[0, 1\]"),
        (torch.full((2, 1, 4, 4), float("nan")), "NaN"),
        # one bad value among good ones, first or last, is found (by the extremes' one pass)
        (with_value(1, 0, 2, 2, float("nan")), "NaN or inf"),
        (with_value(0, 0, 0, 0, float("inf")), "NaN or inf"),
        (with_value(1, 0, 3, 3, -float("inf")), "NaN or inf"),
        (torch.zeros(0, 1, 4, 4), "empty"),
        (torch.zeros(2, 16), r"shape \(N, C, H, W\)"),
    ],
)
def test_bad_images_are_rejected(images, message):
    with pytest.raises(ValueError, match=message):
        check_images(images)


@pytest.fixture
def offline(monkeypatch):
    """Every download fails as it does offline, after torchvision has made its folder;
    ``offline(partial=True)``: after writing the first bytes of the file."""
    import urllib.error

    from torchvision.datasets import utils

    def refuse(url, fpath, *args, partial=False, **kwargs):
        if partial:
            Path(fpath).write_bytes(b"\x1f\x8b\x08 the first bytes")
        raise urllib.error.URLError("offline (simulated)")

    def failing(partial=False):
        monkeypatch.setattr(utils, "_get_redirect_url", lambda url, max_hops=3: url)  # (it would open the URL)
        monkeypatch.setattr(utils, "_urlretrieve", lambda url, fpath, *a, **kw: refuse(url, fpath, partial=partial))

    failing()
    return failing


@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "binarized-mnist", "frey"])
def test_a_failed_download_leaves_no_folder_it_made(tmp_path, offline, name, partial):
    offline(partial)
    (tmp_path / "keep").write_text("not ours")
    with pytest.raises(DatasetNotFoundError, match="the download failed"):
        load_split(name, "train", tmp_path / "new" / "data", download=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]  # no new/data/MNIST/raw


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("binarized-mnist", "binarized_mnist"),
                                          ("frey", "frey")])
def test_a_failed_download_keeps_what_was_there(tmp_path, offline, name, folder):
    offline(True)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DatasetNotFoundError):
        load_split(name, "train", tmp_path, download=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # the data folder stays, its new folder goes
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "notes.txt").write_text("mine too")
    with pytest.raises(DatasetNotFoundError):
        load_split(name, "train", tmp_path, download=True)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / folder / "notes.txt").read_text() == "mine too"
    if name == "mnist":  # only MNIST/raw was new
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == ["notes.txt"]


def test_train_with_a_data_dir_that_does_not_exist_leaves_it_absent(tmp_path, offline, capsys):
    from pyro_vae.cli import main

    data = tmp_path / "nonexistent"
    assert main(["train", "--data-dir", str(data), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--no-progress"]) == 1
    assert "the download failed" in capsys.readouterr().err
    assert not data.exists()


def test_frey_shuffled_is_the_protocols_1565_200_200_split_of_every_frame_once(data_dir):
    from pyro_vae.data import DATASETS

    parts = {split: DATASETS["frey-shuffled"](split, data_dir, False).images for split in ("train", "valid", "test")}
    assert [p.shape[0] for p in parts.values()] == [1565, 200, 200]
    frames = torch.cat([DATASETS["frey"](split, data_dir, False).images for split in ("train", "test")])
    flat = frames.reshape(frames.shape[0], -1)
    index = {tuple(row.tolist()): i for i, row in enumerate(flat)}  # (the video has no two equal frames)
    assert len(index) == 1965
    taken = [index[tuple(row.tolist())] for p in parts.values() for row in p.reshape(p.shape[0], -1)]
    assert sorted(taken) == list(range(1965))  # disjoint, and every frame once
    test_frames = [index[tuple(row.tolist())] for row in parts["test"].reshape(200, -1)]
    assert max(test_frames) - min(test_frames) > 1500  # shuffled: from all over the video, not its end
    again = DATASETS["frey-shuffled"]("test", data_dir, False).images
    assert torch.equal(again, parts["test"])  # the same split every time
    with pytest.raises(ValueError, match="'train', 'valid' and 'test'"):
        DATASETS["frey-shuffled"]("validation", data_dir, False)
