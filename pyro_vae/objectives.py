"""Training objectives: which Pyro ELBO estimator turns (model, guide) into a loss.

``trace``: :class:`pyro.infer.Trace_ELBO`, the Monte Carlo estimate
``log p(x|z) + log p(z) - log q(z|x)`` at reparameterised samples ``z ~ q(z|x)``.

``meanfield``: :class:`pyro.infer.TraceMeanField_ELBO`, the same expected
log-likelihood with ``KL(q(z|x) || p(z))`` computed in closed form (lower variance).

Both have the same expectation; ``num_particles`` > 1 averages that many samples per
image, drawn in one vectorised batch through an outer particles plate.
"""

from __future__ import annotations

from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}
MAX_PLATE_NESTING = 1  # the VAE has one plate, "data"


def build_elbo(name: str = "trace", num_particles: int = 1) -> ELBO:
    try:
        klass = ELBOS[name]
    except KeyError:
        raise ValueError(f"unknown ELBO {name!r}; choose one of {sorted(ELBOS)}") from None
    return klass(
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=MAX_PLATE_NESTING,
    )


def kl_weight(beta: float, warmup_epochs: int, progress: float) -> float:
    """Weight of the KL term after ``progress`` epochs (a float: 2.5 is half-way through epoch 3).

    Without warm-up it is ``beta`` throughout. With ``warmup_epochs = W`` it rises linearly,
    ``beta * min(1, progress / W)``, from ``beta / (W * steps_per_epoch)`` at the first step
    to ``beta`` at the end of epoch W (the annealing of Bowman et al. 2016; Sønderby et al. 2016).
    """
    if warmup_epochs <= 0:
        return float(beta)
    return float(beta) * min(1.0, progress / warmup_epochs)


def training_program(vae, objective: str):
    """The (model, guide) pair that SVI optimises for ``objective``.

    ``elbo`` and ``autoencoder`` train the pair as it is (the autoencoder's guide is a
    point mass and its KL weight is 0). ``kl-only`` hides the observation site ``"x"``
    with :func:`pyro.poutine.block`, so the ELBO estimator sees the KL term alone.
    """
    if objective in ("elbo", "autoencoder"):
        return vae.model, vae.guide
    if objective == "kl-only":
        return poutine.block(vae.model, hide=["x"]), vae.guide
    raise ValueError(f"unknown objective {objective!r}")
