"""Figures and the latent-usage diagnostics behind them.

The diagnostics (KL per dimension, active units, PCA, the manifold grid, slerp) are
checked against hand computations on constructed cases; every figure kind is drawn from
one tiny trained run and must be a PNG of the size its figure function promises.
"""

import math

import sys

import pytest
import torch
from PIL import Image
from torch import nn

from pyro_vae import plots
from pyro_vae.cli import main as pyro_vae
from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.evaluate import active_units, batch_elbo_terms, kl_per_dimension
from pyro_vae.networks import MLPDecoder
from pyro_vae.train import train
from pyro_vae.vae import VAE

# -- a tiny trained run, shared by the figure tests ----------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    config = RunConfig(
        model=ModelConfig(z_dim=2, hidden_dims=(64,)),
        data=DataConfig(data_dir=str(data_dir), train_limit=500, test_limit=200, download=False),
        train=TrainConfig(epochs=1, batch_size=100, device="cpu"),
    )
    run_dir = tmp_path_factory.mktemp("tiny-run")
    train(config, run_dir, progress=False, log=lambda line: None)
    return run_dir


def png_size(path):
    assert path.exists() and path.stat().st_size > 0, f"{path} was not written"
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def expected_pixels(kind, panels=1):
    w, h = plots.figure_size(kind, panels)
    return (round(w * plots.DPI), round(h * plots.DPI))


@pytest.mark.parametrize("kind", plots.KINDS)
def test_every_plot_kind_writes_a_png_of_the_promised_size(tiny_run, tmp_path, kind):
    assert pyro_vae(["plot", str(tiny_run), "--kind", kind, "--out", str(tmp_path)]) == 0
    assert png_size(tmp_path / f"{kind}.png") == expected_pixels(kind)


def test_kind_all_draws_every_figure_and_pdfs(tiny_run, tmp_path):
    assert pyro_vae(["plot", str(tiny_run), "--kind", "all", "--out", str(tmp_path), "--pdf", "--spherical"]) == 0
    for kind in plots.KINDS:
        panels = 2 if kind == "interpolation" else 1  # linear and spherical
        assert png_size(tmp_path / f"{kind}.png") == expected_pixels(kind, panels)
        assert (tmp_path / f"{kind}.pdf").read_bytes().startswith(b"%PDF")


@pytest.mark.parametrize("kind, name", [("comparison", "comparison.png"), ("kl-profile", "kl-profile.png")])
def test_multi_run_figures(tiny_run, tmp_path, kind, name):
    runs = [str(tiny_run)] * 3
    argv = ["plot", *runs, "--kind", kind, "--out", str(tmp_path), "--names", "a", "b", "c"]
    assert pyro_vae(argv) == 0
    assert png_size(tmp_path / name) == expected_pixels(kind, 3 if kind == "comparison" else 1)


def test_plot_refuses_several_runs_for_a_single_run_kind(tiny_run, tmp_path, capsys):
    assert pyro_vae(["plot", str(tiny_run), str(tiny_run), "--kind", "latent", "--out", str(tmp_path)]) == 1
    assert "draws one run" in capsys.readouterr().err


def test_manifold_needs_a_2d_latent_space(tmp_path):
    vae = VAE(*_networks(x_dim=4, z_dim=3), z_dim=3, image_shape=(1, 2, 2))
    with pytest.raises(ValueError, match="z_dim = 3"):
        plots.manifold_figure(vae, tmp_path / "m.png")


# -- the arrays behind the figures -----------------------------------------------------------


def test_pca_projects_onto_the_principal_axes():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2000, generator=gen, dtype=torch.float64) * 3.0
    b = torch.randn(2000, generator=gen, dtype=torch.float64) * 0.5
    a, b = a - a.mean(), b - b.mean()
    b = b - (a @ b) / (a @ a) * a  # uncorrelated in the sample, so the principal axes are exactly the basis
    # Data on a rotated 2-D plane inside 5 dimensions: the components are the plane's axes.
    basis, _ = torch.linalg.qr(torch.randn(5, 2, generator=gen, dtype=torch.float64))
    z = a[:, None] * basis[:, 0] + b[:, None] * basis[:, 1] + 7.0
    proj, explained = plots.pca(z, 2)
    assert proj.shape == (2000, 2) and explained.shape == (2,)
    va, vb = a.pow(2).sum(), b.pow(2).sum()
    torch.testing.assert_close(explained, torch.stack([va, vb]) / (va + vb))
    torch.testing.assert_close(proj[:, 0].abs(), a.abs())
    torch.testing.assert_close(proj[:, 1].abs(), b.abs())


def test_projection_of_many_dimensions_is_2d_with_labelled_axes():
    z = torch.randn(300, 50)
    xy, (x_label, y_label) = plots.project_latents(z)
    assert xy.shape == (300, 2)
    assert x_label.startswith("PC 1") and y_label.startswith("PC 2")


def test_manifold_grid_sits_at_gaussian_quantiles():
    n = 20
    grid = plots.manifold_grid(n)
    assert grid.shape == (n * n, 2)
    q = [math.sqrt(2) * torch.erfinv(torch.tensor(2 * (i + 0.5) / n - 1, dtype=torch.float64)).item() for i in range(n)]
    torch.testing.assert_close(grid[:n, 0].double(), torch.tensor(q, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(grid[::n, 1].double(), torch.tensor(q[::-1], dtype=torch.float64), atol=1e-6, rtol=0)
    assert abs(grid[0, 1].item() - 1.959964) < 1e-5  # Phi^{-1}(0.975): the top row


def test_slerp_keeps_the_norm_and_turns_at_a_constant_rate():
    z_a = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    z_b = torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64)
    path = plots.interpolate(z_a, z_b, 5, spherical=True)
    torch.testing.assert_close(path[0], z_a)
    torch.testing.assert_close(path[-1], z_b)
    torch.testing.assert_close(path.norm(dim=1), torch.full((5,), 2.0, dtype=torch.float64))
    angles = torch.atan2(path[:, 1], path[:, 0])
    torch.testing.assert_close(angles, torch.linspace(0, math.pi / 2, 5, dtype=torch.float64))
    linear = plots.interpolate(z_a, z_b, 5)
    torch.testing.assert_close(linear[2], (z_a + z_b) / 2)


def test_interpolation_pairs_join_different_classes():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    pairs = plots.interpolation_pairs(labels, 3, len(labels), seed=1)
    assert len(pairs) == 3
    assert all(labels[i] != labels[j] for i, j in pairs)
    assert len({k for pair in pairs for k in pair}) == 6  # no image used twice


def test_tsne_without_scikit_learn_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)  # as if scikit-learn were missing
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        plots.tsne(torch.randn(20, 5))


def test_tsne_keeps_separated_clusters_apart():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 10, generator=g)
    b = torch.randn(30, 10, generator=g) + 20.0
    emb = plots.tsne(torch.cat([a, b]))
    assert emb.shape == (60, 2)
    ea, eb = emb[:30], emb[30:]
    gap = (ea.mean(0) - eb.mean(0)).norm()
    spread = max(ea.std(0).norm(), eb.std(0).norm())
    assert gap > 3 * spread


# -- KL per dimension and active units on constructed encoders ---------------------------------


class KnownEncoder(nn.Module):
    """An encoder whose posterior is a known function of the image (4 pixels, 5 latents).

    loc: dim 0 = 2 x_0 (varies), dim 1 = 0.05 x_1 (varies, but by less than the threshold),
    dim 3 = x_2 - x_3 (varies), dims 2 and 4 constant. scale: fixed per dimension.
    """

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([0.5, 1.0, 2.0, 0.1, 1.0], dtype=torch.float64))

    def forward(self, x):
        x = x.double()
        const = torch.ones_like(x[..., 0])
        loc = torch.stack([2 * x[..., 0], 0.05 * x[..., 1], 0.3 * const, x[..., 2] - x[..., 3], -1.5 * const], -1)
        return loc, self.scale.expand(loc.shape)


def _networks(x_dim=4, z_dim=5):
    return KnownEncoder(), MLPDecoder(x_dim, z_dim, (8,)).double()


@pytest.fixture
def known():
    gen = torch.Generator().manual_seed(0)
    images = torch.bernoulli(torch.full((1000, 1, 2, 2), 0.3, dtype=torch.float64), generator=gen)
    vae = VAE(*_networks(), z_dim=5, image_shape=(1, 2, 2))
    return vae, images


def test_active_units_on_a_constructed_encoder(known):
    vae, images = known
    x = images.reshape(-1, 4)
    count, activity = active_units(vae, images, batch_size=128)

    def pop_var(v):
        return ((v - v.mean()) ** 2).mean()

    expected = torch.stack([pop_var(2 * x[:, 0]), pop_var(0.05 * x[:, 1]), torch.tensor(0.0, dtype=torch.float64),
                            pop_var(x[:, 2] - x[:, 3]), torch.tensor(0.0, dtype=torch.float64)])
    torch.testing.assert_close(activity, expected)
    assert count == 2  # dims 0 and 3; dim 1 varies by about 5e-4 < 0.01
    assert active_units(vae, images, threshold=1e-4)[0] == 3


def test_kl_per_dimension_matches_a_hand_computation(known):
    vae, images = known
    x = images.reshape(-1, 4)
    scale = vae.encoder.scale.detach()
    loc = torch.stack([2 * x[:, 0], 0.05 * x[:, 1], torch.full_like(x[:, 0], 0.3), x[:, 2] - x[:, 3],
                       torch.full_like(x[:, 0], -1.5)], 1)
    # KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1) / 2 - log s, averaged over the images
    hand = ((loc**2 + scale**2 - 1) / 2 - scale.log()).mean(0)
    kl = kl_per_dimension(vae, images, batch_size=300)
    torch.testing.assert_close(kl, hand)
    # the unused constant dims with scale 1 are exactly at the prior... up to their offset
    assert kl[4].item() == pytest.approx(1.5**2 / 2)
    # and the dimensions add up to the KL term of the ELBO, from the guide's and model's "z" sites
    terms = batch_elbo_terms(vae.model, vae.guide, images)
    torch.testing.assert_close(kl.sum(), terms["kl"].double().mean())
