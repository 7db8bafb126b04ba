"""Run configuration: one frozen dataclass per concern.

Field names map 1:1 onto CLI flags (``z_dim`` <-> ``--z-dim``) and onto the keys of a
run's ``config.json``. Unknown keys are an error, so a typo never silently falls back
to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

DATASETS = ("mnist", "fashion-mnist", "binarized-mnist")


@dataclass(frozen=True)
class ModelConfig:
    z_dim: int = 50
    hidden_dims: tuple[int, ...] = (400,)  # one hidden layer of 400, as in Pyro's VAE tutorial
    activation: str = "softplus"
    network: str = "mlp"  # "mlp" or "conv"
    likelihood: str = "bernoulli"

    def __post_init__(self):
        object.__setattr__(self, "hidden_dims", tuple(int(h) for h in self.hidden_dims))
        _positive("z_dim", self.z_dim)
        if not self.hidden_dims or any(h <= 0 for h in self.hidden_dims):
            raise ValueError(f"hidden_dims must be one or more positive sizes, got {self.hidden_dims}")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist"  # "mnist", "fashion-mnist" or "binarized-mnist"
    data_dir: str | None = None  # None: $PYRO_VAE_DATA, else ~/.cache/pyro_vae/data
    binarize: str = "dynamic"  # fresh Bernoulli sample each epoch, as in Burda et al. (2015)
    train_limit: int | None = None  # train on the first N training images only
    test_limit: int | None = None  # evaluate on the first N test images only
    download: bool = True  # try torchvision's download when files are missing

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if self.binarize not in ("dynamic", "fixed"):
            raise ValueError(f"binarize must be 'dynamic' or 'fixed', got {self.binarize!r}")
        for name in ("train_limit", "test_limit"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))


OBJECTIVES = ("elbo", "autoencoder", "kl-only")
ENGINES = ("captured", "module", "svi")  # pyro_vae.steps


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    elbo: str = "trace"  # "trace" (Monte Carlo KL) or "meanfield" (analytic KL)
    # "captured": "module" replaying a recorded forward pass (pyro_vae.capture);
    # "module": ELBO as torch module + one torch Adam; "svi": pyro.infer.SVI
    engine: str = "captured"
    num_particles: int = 1
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when available, else CPU
    eval_batch_size: int = 1000
    objective: str = "elbo"  # "elbo", "autoencoder" (point-mass encoder, no KL) or "kl-only"
    beta: float = 1.0  # weight of the KL term (beta-VAE, Higgins et al. 2017)
    kl_warmup_epochs: int = 0  # raise the KL weight linearly from ~0 to beta over this many epochs

    def __post_init__(self):
        for name in ("epochs", "batch_size", "num_particles", "eval_batch_size"):
            _positive(name, getattr(self, name))
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {self.engine!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not (isinstance(self.beta, (int, float)) and self.beta >= 0 and self.beta == self.beta):
            raise ValueError(f"beta must be a non-negative number, got {self.beta!r}")
        if isinstance(self.kl_warmup_epochs, bool) or not isinstance(self.kl_warmup_epochs, int) or self.kl_warmup_epochs < 0:
            raise ValueError(f"kl_warmup_epochs must be a non-negative integer, got {self.kl_warmup_epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.elbo not in ("trace", "meanfield"):
            raise ValueError(f"elbo must be 'trace' or 'meanfield', got {self.elbo!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a run configuration must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown configuration section(s) {sorted(unknown)}; expected model, data, train")
        parts = {}
        for f in dataclasses.fields(cls):
            sub = f.default_factory()  # type: ignore[misc]
            parts[f.name] = _build(type(sub), d.get(f.name, {}), f.name)
        return cls(**parts)


def _build(klass, values: dict[str, Any], section: str):
    if not isinstance(values, dict):
        raise ValueError(f"configuration section {section!r} must be an object, got {values!r}")
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {section} setting(s) {sorted(unknown)}; known: {sorted(names)}")
    return klass(**values)


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
