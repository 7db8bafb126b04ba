"""pyro_vae: the variational autoencoder as an explicit probabilistic program in Pyro.

``pyro_vae.fit(program, data, run_dir)`` trains any Pyro program (a ``torch.nn.Module``
with ``model`` and ``guide`` methods); ``pyro_vae.train.train(config, run_dir)`` trains
the registered program a :class:`RunConfig` describes; ``load_run`` loads either back.

The names below are imported on first use (PEP 562), so that ``import pyro_vae.cli``
(``pyro-vae --help``, a mistyped flag) does not pay for importing torch and Pyro.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "VAE": "models.vae", "MODELS": "models", "build_model": "models", "data_plate": "models",
    "ModelConfig": "config", "DataConfig": "config", "TrainConfig": "config", "RunConfig": "config",
    "ProgramRecord": "config", "Run": "runs", "load_run": "runs", "fit": "train", "Estimate": "evaluate",
    "elbo_terms": "evaluate", "evaluate_model": "evaluate", "log_px_importance": "evaluate",
}

__all__ = [
    "VAE", "MODELS", "build_model", "data_plate", "ModelConfig", "DataConfig", "TrainConfig", "RunConfig",
    "ProgramRecord", "Run", "fit", "load_run", "Estimate", "elbo_terms", "evaluate_model", "log_px_importance",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    try:  # a submodule, as `import pyro_vae; pyro_vae.train.train(...)` has always found it
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
