"""Figures and the latent-usage diagnostics behind them.

The diagnostics (KL per dimension, active units, PCA, the manifold grid, slerp) are
checked against hand computations on constructed cases. Every figure kind is drawn for
a program on grey, non-square, unlabelled images (Frey Face's 28 x 20) and must be a PNG
of the size its figure function promises, its image grids shown with square pixels;
a program that lacks a view has the figures that need it skipped with a one-line
reason. ``pyro-vae plot`` is run end to end on one tiny trained MNIST run.
"""

import math
import sys
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from PIL import Image
from torch import nn

from pyro_vae import plots, views
from pyro_vae.config import DataConfig, ModelConfig, ProgramRecord, RunConfig, TrainConfig
from pyro_vae.data import ImageData
from pyro_vae.evaluate import active_units, batch_elbo_terms, kl_per_dimension
from pyro_vae.figures import canvas
from pyro_vae.models import data_plate
from pyro_vae.models.ae import Autoencoder
from pyro_vae.models.vae import VAE
from pyro_vae.networks import MLPDecoder, MLPEncoder

FACE = (1, 28, 20)  # Frey Face: grey, 28 pixels high and 20 wide, no labels

# Grey log-likelihoods are log-densities: positive here, as a continuous likelihood's often are.
DENSITY_METRICS = [
    {"epoch": 1, "train_elbo": 401.5, "test_elbo": 395.0, "train_log_lik": 422.0, "test_log_lik": 416.1,
     "train_kl": 20.5, "test_kl": 21.1, "kl_weight": 1.0, "train_objective": 401.5},
    {"epoch": 2, "train_elbo": 433.0, "test_elbo": 420.7, "train_log_lik": 456.2, "test_log_lik": 444.9,
     "train_kl": 23.2, "test_kl": 24.2, "kl_weight": 1.0, "train_objective": 433.0},
]


def faces(n: int = 40, seed: int = 0) -> ImageData:
    """Grey 28 x 20 images of one soft elliptic blob each, at random places; no labels."""
    gen = torch.Generator().manual_seed(seed)
    h, w = FACE[1:]
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    cy = torch.rand(n, 1, 1, generator=gen) * h
    cx = torch.rand(n, 1, 1, generator=gen) * w
    images = torch.exp(-((yy - cy) ** 2 / 50.0 + (xx - cx) ** 2 / 18.0))
    return ImageData(images.unsqueeze(1), None, binary=False)


def vae_on(image_shape=FACE, z_dim: int = 2, family=VAE, seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    d = math.prod(image_shape)
    return family(MLPEncoder(d, z_dim, (32,)), MLPDecoder(d, z_dim, (32,)), z_dim, image_shape).eval()


class MixturePriorVAE(VAE):
    """The VAE with p(z) = 1/2 N(-3, 0.5^2 I) + 1/2 N(3, 0.5^2 I): no KL per dimension from N(0, I)."""

    def prior(self):
        loc = torch.tensor([-3.0, 3.0]).to(self.prior_loc)[:, None].expand(2, self.z_dim)
        return dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(2).to(loc)),
                                      dist.Normal(loc, 0.5).to_event(1))


class ModelAndGuideOnly(nn.Module):
    """A program that trains (x | z ~ N(z_1 + b, 1) per pixel) and offers no view at all."""

    binary_data = False  # its likelihood is a density over grey pixels

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.loc = nn.Parameter(torch.zeros(2))

    def model(self, x, *, num_data=None):
        pyro.module("program", self)
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            mean = (z[:, :1] + self.bias).expand(x.shape[0], x[0].numel())
            pyro.sample("x", dist.Normal(mean, 1.0).to_event(1), obs=x.reshape(x.shape[0], -1))

    def guide(self, x, *, num_data=None):
        with data_plate(x, num_data):
            pyro.sample("z", dist.Normal(self.loc, 1.0).expand([x.shape[0], 2]).to_event(1))


@pytest.fixture
def drawn(monkeypatch):
    """The matplotlib figures a test draws, by file name, kept for inspection after saving."""
    figures = {}
    save = canvas.save  # (every figure module saves through it)

    def keep(fig, path, pdf):
        figures[Path(path).stem] = fig
        return save(fig, path, pdf)

    monkeypatch.setattr(canvas, "save", keep)
    return figures


def png_size(path):
    assert path.exists() and path.stat().st_size > 0, f"{path} was not written"
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def expected_pixels(kind, panels=1):
    w, h = plots.figure_size(kind, panels)
    return (round(w * plots.DPI), round(h * plots.DPI))


def grey_levels(path) -> int:
    """How many grey levels the PNG holds: 1 for a blank page."""
    with Image.open(path) as image:
        return len(np.unique(np.asarray(image.convert("L"))))


def titles(fig) -> str:
    parts = [ax.get_title() for ax in fig.axes] + [fig._suptitle.get_text() if fig._suptitle else ""]
    return "\n".join(parts)


# -- every figure, for grey non-square images without labels ------------------------------------

GRIDS = {  # (rows, columns) of images in each image-grid figure, at its defaults
    "manifold": (20, 20),
    "samples": (8, 8),
    "reconstructions": (6, 12),  # 3 rows of 12 test images, each above its reconstructions
    "interpolation": (4, 12),  # 4 pairs: x_a, 10 steps, x_b
}


@pytest.mark.parametrize("kind", plots.KINDS)
def test_every_figure_of_a_program_on_unlabelled_non_square_images(kind, tmp_path, drawn):
    paths = plots.draw_figures([kind], vae_on(FACE, z_dim=2), faces(), DENSITY_METRICS, tmp_path,
                               log=lambda line: None)
    assert paths == [tmp_path / f"{kind}.png"]
    assert png_size(paths[0]) == expected_pixels(kind)
    assert grey_levels(paths[0]) > 16
    if kind in GRIDS:
        rows, cols = GRIDS[kind]
        [image] = [im for ax in drawn[kind].axes for im in ax.get_images()]
        pixels = np.asarray(image.get_array())
        pad = 0 if kind == "manifold" else 2  # make_grid's padding between images
        assert pixels.shape[:2] == (rows * (FACE[1] + pad) + pad, cols * (FACE[2] + pad) + pad)
        assert pixels.std() > 0.01
        box = image.axes.get_window_extent()
        assert box.width / box.height == pytest.approx(pixels.shape[1] / pixels.shape[0], rel=0.02)  # square pixels


@pytest.mark.slow
def test_posterior_figure_draws_nuts_draws_and_both_guides(tmp_path, drawn):
    lines = []
    program = vae_on(FACE, z_dim=2)
    binary = torch.bernoulli(faces().images, generator=torch.Generator().manual_seed(0))
    path = plots.posterior_figure(program, binary, tmp_path / "posterior.png", num_images=2, nuts_samples=60,
                                  warmup=30, log=lines.append)
    assert png_size(path) == expected_pixels("posterior", 2)
    fig = drawn["posterior"]
    panels = [ax for ax in fig.axes if ax.get_title().startswith("test image")]
    assert len(panels) == 2
    for ax in panels:
        [points] = [c for c in ax.collections if len(c.get_offsets()) == 60]  # the NUTS draws
        contour_colours = {tuple(np.round(c.get_edgecolor()[0][:3], 3)) for c in ax.collections if c is not points}
        assert len(contour_colours) == 2  # q and q*, one colour each
        assert ax.get_xlabel() == "$z_1$" and ax.get_ylabel() == "$z_2$"
    assert lines[0].startswith("q* took") and lines[1:] == ["NUTS on test image 1 of 2", "NUTS on test image 2 of 2"]
    assert "posterior" not in plots.KINDS  # minutes of NUTS: drawn when asked for, never by "all"


def test_latent_figure_without_labels_has_no_class_colours_and_says_so(tmp_path, drawn):
    plots.draw_figures(["latent"], vae_on(FACE, z_dim=2), faces(), [], tmp_path)
    fig = drawn["latent"]
    assert len(fig.axes) == 1  # no colour bar of classes
    assert "no class labels" in titles(fig)
    [points] = fig.axes[0].collections
    assert len(np.unique(points.get_facecolors(), axis=0)) == 1


@pytest.mark.slow
def test_all_draws_every_figure_with_pdfs_and_logs_active_units(tmp_path):
    lines = []
    program = vae_on(FACE, z_dim=2)
    paths = plots.draw_figures(["all"], program, faces(), DENSITY_METRICS, tmp_path, spherical=True, pdf=True,
                               log=lines.append)
    assert paths == [tmp_path / f"{kind}.png" for kind in plots.KINDS]
    for kind in plots.KINDS:
        panels = 2 if kind == "interpolation" else 1  # linear and spherical
        assert png_size(tmp_path / f"{kind}.png") == expected_pixels(kind, panels)
        assert (tmp_path / f"{kind}.pdf").read_bytes().startswith(b"%PDF")
    count, _ = active_units(program, faces().images)
    assert lines == [f"active units: {count} of 2"]


def test_all_skips_what_a_program_without_views_cannot_draw(tmp_path, drawn):
    lines = []
    program = ModelAndGuideOnly()
    paths = plots.draw_figures(["all"], program, faces(), DENSITY_METRICS, tmp_path, log=lines.append)
    assert paths == [tmp_path / "curves.png"]
    assert lines[0] == "skipped latent: ModelAndGuideOnly has no posterior_mean (E_q[z|x] from an encoder)"
    assert [line.split(":")[0] for line in lines] == [f"skipped {kind}" for kind in plots.KINDS if kind != "curves"]
    assert all("\n" not in line and "has no" in line for line in lines)
    assert "log-density" in drawn["curves"].axes[0].get_ylabel()  # grey pixels: densities, not probabilities


@pytest.mark.slow
def test_all_skips_what_needs_a_standard_normal_prior_or_two_dimensions(tmp_path, drawn):
    lines = []
    program = vae_on(FACE, z_dim=3, family=MixturePriorVAE)
    paths = plots.draw_figures(["all"], program, faces(), DENSITY_METRICS, tmp_path, log=lines.append)
    assert [p.stem for p in paths] == ["latent", "samples", "reconstructions", "interpolation", "curves"]
    assert lines == [
        "skipped manifold: it needs z_dim = 2, this run has z_dim = 3",
        "skipped dims: the KL per dimension needs a N(0, I) prior; MixturePriorVAE's prior is another",
    ]
    assert "z \\sim p(z)" in titles(drawn["samples"])  # not N(0, I)


@pytest.mark.slow
def test_the_autoencoder_has_no_kl_per_dimension(tmp_path):
    lines = []
    plots.draw_figures(["all"], vae_on(FACE, z_dim=2, family=Autoencoder), faces(), DENSITY_METRICS, tmp_path,
                       log=lines.append)
    assert [line.split(":")[0] for line in lines] == ["skipped dims"]
    assert "Autoencoder has no encode" in lines[0]


@pytest.mark.parametrize("kind, reason", [("manifold", "needs z_dim = 2, this run has z_dim = 3"),
                                          ("dims", "needs a N\\(0, I\\) prior")])
def test_a_kind_asked_for_by_name_that_cannot_be_drawn_raises(tmp_path, kind, reason):
    program = vae_on(FACE, z_dim=3, family=MixturePriorVAE)
    with pytest.raises(views.ViewUnavailable, match=f"cannot draw {kind}: .*{reason}"):
        plots.draw_figures(["latent", kind], program, faces(), DENSITY_METRICS, tmp_path)
    assert not list(tmp_path.iterdir())  # checked before anything is drawn


def test_draw_figures_rejects_unknown_and_multi_run_kinds(tmp_path):
    with pytest.raises(ValueError, match="unknown figure kind 'histogram'"):
        plots.draw_figures(["histogram"], vae_on(), faces(), [], tmp_path)
    with pytest.raises(ValueError, match="draw_comparison"):
        plots.draw_figures(["comparison"], vae_on(), faces(), [], tmp_path)


def test_manifold_of_a_mixture_prior_spans_its_components(tmp_path, drawn):
    program = vae_on(FACE, z_dim=2, family=MixturePriorVAE)
    grid, how = plots.prior_quantiles(program, 20)
    q = grid[:20, 0]
    assert (q[:10] < -1.5).all() and (q[10:] > 1.5).all()  # half the prior mass near -3, half near +3
    plots.manifold_figure(program, tmp_path / "manifold.png")
    assert drawn["manifold"].axes[0].get_xlabel() == f"$z_1$ ({how})"
    assert "prior quantiles" in how


def test_curves_follow_positive_log_densities_and_runs_without_an_elbo(tmp_path, drawn):
    plots.curves_figure(DENSITY_METRICS, tmp_path / "curves.png", density=True)
    elbo, log_lik, kl = drawn["curves"].axes[:3]
    low, high = log_lik.get_ylim()
    assert 0 < low <= 416.1 and high >= 456.2
    assert "log-density" in elbo.get_ylabel() and "log-density" not in kl.get_ylabel()
    only_log_lik = [{"epoch": r["epoch"], "train_log_lik": r["train_log_lik"], "test_log_lik": r["test_log_lik"]}
                    for r in DENSITY_METRICS]
    plots.curves_figure(only_log_lik, tmp_path / "ae.png")
    elbo, log_lik, kl = drawn["ae"].axes[:3]
    assert not elbo.get_lines() and not kl.get_lines() and log_lik.get_lines()
    assert "not reported" in elbo.texts[0].get_text()


def test_manifold_needs_a_2d_latent_space(tmp_path):
    vae = VAE(*_networks(x_dim=4, z_dim=3), z_dim=3, image_shape=(1, 2, 2))
    with pytest.raises(ValueError, match="z_dim = 3"):
        plots.manifold_figure(vae, tmp_path / "m.png")


def test_interpolation_pairs_without_labels_use_each_image_once():
    pairs = plots.interpolation_pairs(None, 4, 10, seed=0)
    assert len(pairs) == 4
    assert len({k for pair in pairs for k in pair}) == 8


# -- several runs in one figure -------------------------------------------------------------------


def test_comparison_of_unlabelled_runs(tmp_path, drawn):
    runs = [("VAE", vae_on(seed=0)), ("autoencoder", vae_on(family=Autoencoder, seed=1))]
    path = plots.draw_comparison("comparison", runs, faces(), tmp_path)
    assert path == tmp_path / "comparison.png"
    assert png_size(path) == expected_pixels("comparison", 2)
    fig = drawn["comparison"]
    assert len(fig.axes) == 2  # two panels, no colour bar of classes
    assert "no class labels" in titles(fig)


def test_kl_profile_of_two_runs(tmp_path):
    runs = [("a", vae_on(z_dim=5, seed=0)), ("b", vae_on(z_dim=5, seed=1))]
    path = plots.draw_comparison("kl-profile", runs, faces(), tmp_path)
    assert png_size(path) == expected_pixels("kl-profile")


def test_comparison_names_the_run_it_cannot_draw(tmp_path):
    runs = [("two", vae_on(z_dim=2)), ("five", vae_on(z_dim=5))]
    with pytest.raises(views.ViewUnavailable, match="run 'five': it needs z_dim = 2"):
        plots.draw_comparison("comparison", runs, faces(), tmp_path)
    with pytest.raises(views.ViewUnavailable, match="run 'mixture': the KL per dimension needs a N\\(0, I\\) prior"):
        plots.draw_comparison("kl-profile", [("mixture", vae_on(family=MixturePriorVAE))], faces(), tmp_path)


@pytest.mark.parametrize("model, train, name", [
    ({}, {}, "VAE (ELBO)"),
    ({"model": "ae"}, {}, "Autoencoder (reconstruction only)"),
    ({}, {"objective": "kl-only"}, "KL term only"),
    ({}, {"beta": 4.0, "kl_warmup_epochs": 10}, "VAE (ELBO), beta = 4, KL warm-up 10 epochs"),
    ({"program": "mypackage.priors:MixturePriorVAE"}, {"beta": 0.5}, "MixturePriorVAE, beta = 0.5"),
])
def test_default_run_names(model, train, name):
    model = ProgramRecord(**model) if "program" in model else ModelConfig(**model)
    config = RunConfig(model=model, train=TrainConfig(**train))
    assert plots.default_run_name(config) == name


# -- the torchvision grids of pyro-vae sample / reconstruct ---------------------------------------


def test_sample_and_reconstruction_grids_keep_the_image_shape(tmp_path):
    program = vae_on(FACE)
    h, w = FACE[1] + 2, FACE[2] + 2  # each image and its padding
    assert png_size(plots.save_sample_grid(program, tmp_path / "s.png", num=64, nrow=8)) == (8 * w + 2, 8 * h + 2)
    path = plots.save_reconstruction_grid(program, faces().images[:16], tmp_path / "r.png", nrow=8)
    assert png_size(path) == (8 * w + 2, 4 * h + 2)  # two rows of images, each above its reconstructions


# -- pyro-vae plot, end to end on a tiny trained run ----------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    from pyro_vae.train import train

    config = RunConfig(
        model=ModelConfig(z_dim=2, hidden_dims=(64,)),
        data=DataConfig(data_dir=str(data_dir), train_limit=500, test_limit=200, download=False),
        train=TrainConfig(epochs=1, batch_size=100, device="cpu"),
    )
    run_dir = tmp_path_factory.mktemp("tiny-run")
    train(config, run_dir, progress=False, log=lambda line: None)
    return run_dir


def pyro_vae(argv):
    from pyro_vae.cli import main

    return main(argv)


@pytest.mark.slow
@pytest.mark.parametrize("kind", plots.KINDS)
def test_every_plot_kind_writes_a_png_of_the_promised_size(tiny_run, tmp_path, kind):
    assert pyro_vae(["plot", str(tiny_run), "--kind", kind, "--out", str(tmp_path)]) == 0
    assert png_size(tmp_path / f"{kind}.png") == expected_pixels(kind)


@pytest.mark.slow
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


@pytest.mark.slow
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
