"""The oracle: pyro_vae scores, trains and reloads the programs of tests/oracle_programs.py
as Pyro itself would, or refuses them at once with the reason.

The rule these tests prove: any program that Pyro's ELBO accepts is trained and scored
as Pyro would, or refused with the reason; never silently wrong.
"""

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO

from pyro_vae.evaluate import batch_elbo_terms
from pyro_vae.scoring import Scorer, ScoringError

from oracle_programs import ESTIMATOR, PROGRAMS, REFUSED, SHAPE, labels_of

N = 24
PYRO_ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO, "traceenum": TraceEnum_ELBO,
              "tracegraph": TraceGraph_ELBO}


def images(n=N, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, *SHAPE), 0.4), generator=gen)


def call_args(program, x):
    """The arguments the training loop gives this program for the whole data set as one batch."""
    from pyro_vae.models import ProgramCall

    call = ProgramCall(program)
    return call.kwargs({"x": x, "y": labels_of(x), "index": torch.arange(x.shape[0])}, num_data=x.shape[0])


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_the_reported_elbo_is_pyros_elbo_of_the_data_set(name):
    """On the whole data as one batch, with the same draws, the per-image ELBO times N is
    minus the loss of Pyro's own ELBO (the estimator the scorer splits), to float rounding."""
    program = PROGRAMS[name]()
    x = images()
    kwargs = call_args(program, x)
    scorer = Scorer()
    pyro.set_rng_seed(7)
    terms = scorer.terms(program.model, program.guide, **kwargs)
    elbo = PYRO_ELBOS[scorer.estimator](max_plate_nesting=scorer.max_plate_nesting)
    pyro.set_rng_seed(7)
    assert terms["elbo"].shape == (N,)
    if scorer.model_enumerates:  # scored image by image (one scale per image): Pyro's loss of each image
        for i in range(N):
            one = {k: v[i : i + 1] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            loss = elbo.loss(program.model, program.guide, **one)
            assert float(terms["elbo"][i]) * N == pytest.approx(-loss, rel=1e-5)
        assert "log_lik" not in terms  # summed out with the latent: no split
        return
    loss = elbo.loss(program.model, program.guide, **kwargs)
    assert float(terms["elbo"].double().sum()) == pytest.approx(-loss, rel=1e-5, abs=1e-3)
    if "log_lik" in terms:  # the two terms add up to the ELBO, image by image
        torch.testing.assert_close(terms["log_lik"] - terms["kl"], terms["elbo"])


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_program_that_cannot_be_scored_is_refused_with_the_reason(name):
    build, reason = REFUSED[name]
    program = build()
    with pytest.raises(ScoringError, match=reason):
        batch_elbo_terms(program.model, program.guide, **call_args(program, images()))
