"""pyro_vae: the variational autoencoder as an explicit probabilistic program in Pyro.

``pyro_vae.fit(program, data, run_dir)`` trains any Pyro program (a ``torch.nn.Module``
with ``model`` and ``guide`` methods); ``pyro_vae.train.train(config, run_dir)`` trains
the registered program a :class:`RunConfig` describes; ``load_run`` loads either back.
"""

__version__ = "0.1.0"

from .config import DataConfig, ModelConfig, ProgramRecord, RunConfig, TrainConfig  # noqa: E402
from .models import MODELS, build_model, data_plate  # noqa: E402
from .models.vae import VAE  # noqa: E402
from .runs import Run, load_run  # noqa: E402
from .train import fit  # noqa: E402
from .evaluate import Estimate, elbo_terms, evaluate_model, log_px_importance  # noqa: E402

__all__ = [
    "VAE", "MODELS", "build_model", "data_plate", "ModelConfig", "DataConfig", "TrainConfig", "RunConfig",
    "ProgramRecord", "Run", "fit", "load_run", "Estimate", "elbo_terms", "evaluate_model", "log_px_importance",
]
