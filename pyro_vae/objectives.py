"""Training objectives: which Pyro ELBO estimator turns (model, guide) into a loss.

``trace``: :class:`pyro.infer.Trace_ELBO`, the Monte Carlo estimate
``log p(x|z) + log p(z) - log q(z|x)`` at reparameterised samples ``z ~ q(z|x)``.

``meanfield``: :class:`pyro.infer.TraceMeanField_ELBO`, the same expected
log-likelihood with ``KL(q(z|x) || p(z))`` computed in closed form (lower variance).

Both have the same expectation; ``num_particles`` > 1 averages that many samples per
image, drawn in one vectorised batch through an outer particles plate.
"""

from __future__ import annotations

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
