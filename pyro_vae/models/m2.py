r"""The semi-supervised VAE M2 of Kingma, Rezende, Mohamed & Welling (2014), as in Pyro's
SS-VAE tutorial: a class y and a style z generate each image.

Generative story (``M2.model``), for each image:

.. math::

    y \sim \mathrm{Cat}(1/K), \qquad z \sim \mathcal N(0, I), \qquad
    x \mid y, z \sim \text{the likelihood}(f_\theta(y, z))

Guide (``M2.guide``): :math:`q(y \mid x)\, q(z \mid x, y)` with
:math:`q(y \mid x) = \mathrm{Cat}(\pi_\phi(x))` (the classifier) and
:math:`q(z \mid x, y) = \mathcal N(\mu_\phi(x, y), \operatorname{diag}\sigma_\phi(x, y)^2)`.

Where y is observed (a labelled image) the ELBO is that of :math:`\log p(x, y)`,

.. math::

    \mathcal L(x, y) = \mathbb E_{q(z|x,y)}\big[\log p(x \mid y, z) + \log p(y) + \log p(z) - \log q(z \mid x, y)\big],

and where it is not, the guide's ``"y"`` is marked for enumeration, so ``--estimator
traceenum`` (:class:`pyro.infer.TraceEnum_ELBO`) sums it out exactly:

.. math::

    \mathcal U(x) = \sum_y q(y \mid x) \big(\mathcal L(x, y) - \log q(y \mid x)\big).

Kingma et al.'s auxiliary classification loss adds :math:`\alpha \log q(y \mid x)` for each
labelled image (``aux_weight`` = alpha, per labelled image as in Pyro's tutorial, whose
default is 46): without it the labelled images never train the classifier, since
:math:`\mathcal L(x, y)` does not contain q(y|x). The objective of a data set with labelled
images :math:`\mathcal D_l` and unlabelled :math:`\mathcal D_u` is

.. math::

    J = \sum_{(x, y) \in \mathcal D_l} \big(\mathcal L(x, y) + \alpha \log q(y \mid x)\big)
        + \sum_{x \in \mathcal D_u} \mathcal U(x).

**Partially labelled minibatches.** A call ``model(x, y, num_data=N, num_labelled=N_l)``
says: the first ``len(y)`` images of ``x`` are labelled by ``y``, the rest are not; the
data set holds ``N`` images, ``N_l`` of them labelled. The two parts lie in two plates,
``"labelled"`` (told ``N_l``) and ``"data"`` (told ``N - N_l``), so Pyro scales the
labelled part's terms by :math:`N_l / b_l` and the unlabelled part's by
:math:`(N - N_l) / b_u`, and the minibatch's loss estimates :math:`-J` without bias
whatever the share of labelled images in it (:mod:`pyro_vae.data` chooses it). The
labelled part's sites are ``"y_labelled"``, ``"z_labelled"``, ``"x_labelled"`` and
``"aux"``; the unlabelled part's are ``"y"``, ``"z"``, ``"x"``, so a call without labels
(every evaluation: y is then a latent, and the numbers bound log p(x)) is an ordinary
program over the ``"data"`` plate. ``TraceEnum_ELBO`` scores the two plates as the sum
above: ``tests/test_m2.py`` checks it against the sum written by hand. (The alternative,
one plate with Pyro's ``obs_mask`` on y, scores a labelled image right only when the guide
masks its enumerated ``y_unobserved`` as well, else the ELBO gains the entropy of q(y|x);
and it still sums every labelled image over all K classes, K times the decoder's work
for an observed y, under one N / B for both parts: ``tests/test_m2.py`` shows both.)

The networks are Pyro's tutorial's, with one hidden layer of ``hidden_dims`` each by
default (its ``-hl 500``): the classifier x -> logits of K classes; the encoder [x, onehot(y)]
-> (loc, scale) of z; the decoder [z, onehot(y)] -> the likelihood's parameters. The
one-hot part of a first layer is a column of its weight picked by y (:class:`LabelledMLP`),
so the ten enumerated classes share one product with x instead of ten concatenations.
"""

from __future__ import annotations

import math
from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from ..distributions import DiagonalNormal, StandardNormal
from ..likelihoods import build_likelihood
from ..networks import GaussianHead, activation, mlp
from ..protocol import data_plate
from ..views import ViewUnavailable
from .vae import VAE


class LabelledMLP(nn.Module):
    """``[v, onehot(y)] -> hidden layers -> head``: the first layer is one ``nn.Linear`` over
    the concatenation, computed as ``W_v v + W_y[:, y] + b``, which is the same function
    without building ``onehot(y)`` or the concatenation. ``v`` has shape ``(..., D)`` and
    ``y`` (class indices) any shape that broadcasts with ``v``'s batch shape: an enumerated
    y of shape ``(K, 1)`` against ``v`` of ``(B, D)`` gives ``(K, B, ...)``."""

    def __init__(self, in_dim: int, classes: int, hidden_dims: Sequence[int], act: str, head: nn.Module):
        super().__init__()
        if not hidden_dims:
            raise ValueError("hidden_dims must name at least one hidden layer, e.g. (500,)")
        self.in_dim = int(in_dim)
        self.first = nn.Linear(self.in_dim + int(classes), hidden_dims[0])
        self.body = nn.Sequential(activation(act), *([mlp(list(hidden_dims), act), activation(act)]
                                                     if len(hidden_dims) > 1 else []))
        self.head = head

    def forward(self, v: torch.Tensor, y: torch.Tensor):
        weight = self.first.weight
        h = F.linear(v, weight[:, : self.in_dim], self.first.bias) + weight[:, self.in_dim :].t()[y]
        return self.head(self.body(h))


class M2(VAE):
    """The M2 model and guide over sites ``"y"``, ``"z"``, ``"x"`` (see the module's docstring).

    :param classifier: ``x (..., D) -> logits (..., K)`` of q(y|x).
    :param encoder: :class:`LabelledMLP` ``(x, y) -> (loc, scale)`` of q(z|x, y).
    :param decoder: :class:`LabelledMLP` ``(z, y) -> (..., D)``, the likelihood's parameters.
    :param aux_weight: alpha of the auxiliary loss, per labelled image (0: none).
    """

    local_family = None  # q(y|x) q(z|x, y): gaps use pyro_vae.posterior.SiteFamily (one Gaussian for z)

    def __init__(self, classifier: nn.Module, encoder: nn.Module, decoder: nn.Module, z_dim: int, num_classes: int,
                 image_shape: Sequence[int] = (1, 28, 28), likelihood: nn.Module | None = None,
                 aux_weight: float = 0.0):
        super().__init__(encoder, decoder, z_dim, image_shape, likelihood)
        self.classifier = classifier
        self.num_classes = int(num_classes)
        self.aux_weight = float(aux_weight)
        self.register_buffer("prior_logits", torch.zeros(self.num_classes))

    # -- the probabilistic program -------------------------------------------------

    def model(self, x=None, y=None, *, num_data=None, num_labelled=0, kl_weight=1.0, batch_size=None):
        """p(x, y, z) = p(y) p(z) p(x | y, z), the first ``len(y)`` images labelled (module docstring)."""
        pyro.module("decoder", self.decoder)
        if self._likelihood_learns:
            pyro.module("likelihood", self.likelihood)
        if x is None:
            with self._plate(None, num_data, batch_size):
                return self._generate(None, y, kl_weight)
        x = self._flatten(x)
        labelled = self._labelled(x, y)
        if labelled:
            if self.aux_weight:
                pyro.module("classifier", self.classifier)
            with self._labelled_plate(x, labelled, num_labelled):
                self._generate(x[:labelled], y, kl_weight, "_labelled")
                if self.aux_weight:  # Kingma et al.'s alpha log q(y|x), as an observed site
                    with pyro.poutine.scale(scale=self.aux_weight):
                        pyro.sample("aux", dist.Categorical(logits=self.classifier(x[:labelled])), obs=y)
        if labelled < x.shape[0]:
            with self._unlabelled_plate(x, labelled, num_data, num_labelled):
                self._generate(x[labelled:], None, kl_weight)

    def _generate(self, x, y, kl_weight, suffix: str = ""):
        prior_y = dist.Categorical(logits=self.prior_logits)
        if y is not None:
            y = pyro.sample("y" + suffix, prior_y, obs=y)
        with self.latent_weight(kl_weight):
            if y is None:  # replayed from the guide (enumerated there), or drawn when generating
                y = pyro.sample("y" + suffix, prior_y)
            z = pyro.sample("z" + suffix, self.prior())
        out = self.decoder(z, y)
        pyro.sample("x" + suffix, self.likelihood(out), obs=x)
        return out

    def guide(self, x=None, y=None, *, num_data=None, num_labelled=0, kl_weight=1.0, batch_size=None):
        """q(y|x) q(z|x, y): y enumerated (``infer={"enumerate": "parallel"}``) where it is not observed."""
        if x is None:
            raise ValueError("the guide q(y, z|x) needs the images x it encodes")
        pyro.module("classifier", self.classifier)
        pyro.module("encoder", self.encoder)
        x = self._flatten(x)
        labelled = self._labelled(x, y)
        if labelled:
            with self._labelled_plate(x, labelled, num_labelled), self.latent_weight(kl_weight):
                pyro.sample("z_labelled", self.posterior(*self.encoder(x[:labelled], y)))
        if labelled < x.shape[0]:
            x = x[labelled:]
            with self._unlabelled_plate(x, 0, num_data, num_labelled), self.latent_weight(kl_weight):
                y = pyro.sample("y", dist.Categorical(logits=self.classifier(x)), infer={"enumerate": "parallel"})
                pyro.sample("z", self.posterior(*self.encoder(x, y)))

    def _labelled(self, x: torch.Tensor, y) -> int:
        if y is None:
            return 0
        if y.dim() != 1 or y.shape[0] > x.shape[0]:
            raise ValueError(f"y holds the labels of the first images of x, one each: got y of shape "
                             f"{tuple(y.shape)} for {x.shape[0]} images")
        return y.shape[0]

    @staticmethod
    def _labelled_plate(x, labelled: int, num_labelled):
        size = labelled if not num_labelled else int(num_labelled)
        if size < labelled:
            raise ValueError(f"num_labelled={size} is smaller than the {labelled} labelled images of the minibatch")
        subsample = torch.arange(labelled, device=x.device) if size != labelled else None
        return pyro.plate("labelled", size=size, subsample=subsample)

    @staticmethod
    def _unlabelled_plate(x, labelled: int, num_data, num_labelled):
        """The ``"data"`` plate over the images after the first ``labelled``, told the number of
        unlabelled images in the data set."""
        rest = x[labelled:]
        size = None if num_data is None else int(num_data) - int(num_labelled or 0)
        return data_plate(rest, size)

    # -- views (pyro_vae.views) --------------------------------------------------------

    @torch.no_grad()
    def predict_class(self, x: torch.Tensor) -> torch.Tensor:
        """argmax_y q(y|x) of each image: ``(B,)`` class indices."""
        return self.classifier(self._flatten(x, check=False)).argmax(-1)

    def class_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """q(y|x) of each image: ``(B, K)``."""
        return torch.softmax(self.classifier(self._flatten(x, check=False)), -1)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of q(z|x, y); without ``y``, of the most probable class argmax q(y|x)
        (q(z|x) itself is a mixture over the classes, not one Gaussian)."""
        flat = self._flatten(x, check=False)
        y = self.predict_class(x) if y is None else y
        return self.encoder(flat, y)

    def posterior_mean(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E_q[z|x, y]; without ``y``, E_q[z|x] = sum_y q(y|x) E_q[z|x, y] (the mixture's mean)."""
        flat = self._flatten(x, check=False)
        if y is not None:
            return self.encoder(flat, y)[0]
        classes = torch.arange(self.num_classes, device=flat.device).unsqueeze(-1)  # (K, 1)
        locs = self.encoder(flat, classes)[0]  # (K, B, z_dim)
        weights = self.class_probabilities(x).t().unsqueeze(-1)  # (K, B, 1)
        return (weights * locs).sum(0)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[x|z, y] as images; without ``y``, E[x|z] = (1/K) sum_y E[x|z, y] (y ~ Cat(1/K) is
        independent of z in the prior)."""
        if y is None:
            classes = torch.arange(self.num_classes, device=z.device).reshape(-1, *([1] * (z.dim() - 1)))
            mean = self.likelihood.mean(self.decoder(z, classes)).mean(0)
        else:
            mean = self.likelihood.mean(self.decoder(z, y))
        return mean.reshape(*z.shape[:-1], *self.image_shape)


def m2_from_config(config, image_shape: Sequence[int]) -> M2:
    config.refuse_unused(uses=("aux_weight",))
    if config.network != "mlp":
        raise ValueError(f"model 'm2' is built of fully connected layers, as Pyro's tutorial's; use --network mlp, "
                         f"not {config.network!r}")
    if config.decoder_bias != "random":
        raise ValueError("model 'm2' starts its decoder's output bias as torch does; leave out --decoder-bias")
    x_dim = math.prod(image_shape)
    classes = NUM_CLASSES
    likelihood = build_likelihood(config.likelihood, x_dim)
    outputs = x_dim * getattr(likelihood, "outputs_per_pixel", 1)
    hidden = tuple(config.hidden_dims)
    classifier = mlp([x_dim, *hidden, classes], config.activation)
    encoder = LabelledMLP(x_dim, classes, hidden, config.activation, GaussianHead(hidden[-1], config.z_dim))
    decoder = LabelledMLP(config.z_dim, classes, tuple(reversed(hidden)), config.activation,
                          nn.Linear(hidden[0], outputs))
    return M2(classifier, encoder, decoder, config.z_dim, classes, image_shape, likelihood, config.aux_weight)


NUM_CLASSES = 10  # MNIST's and Fashion-MNIST's classes (the data sets with labels)
