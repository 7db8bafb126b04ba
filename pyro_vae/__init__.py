"""pyro_vae: the variational autoencoder as an explicit probabilistic program in Pyro."""

__version__ = "0.1.0"

from .config import DataConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from .vae import VAE, build_vae  # noqa: E402
from .train import Run, load_run, train  # noqa: E402
from .evaluate import Estimate, elbo_terms, log_px_importance  # noqa: E402

__all__ = [
    "VAE", "build_vae", "ModelConfig", "DataConfig", "TrainConfig", "RunConfig",
    "Run", "train", "load_run", "Estimate", "elbo_terms", "log_px_importance",
]
