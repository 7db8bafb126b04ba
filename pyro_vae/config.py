"""Run configuration: one frozen dataclass per concern.

Field names map 1:1 onto CLI flags (``z_dim`` <-> ``--z-dim``) and onto the keys of a
run's ``config.json``. Each field is declared with :func:`setting`, which carries its
help text, its lower bound, and the registry (or fixed list) its value must come from:
validation here and the CLI's flags, choices and help all read that one declaration.
Unknown keys are an error, so a typo never silently falls back to a default.

A run's ``model`` section is either a :class:`ModelConfig` (a registered model family,
rebuilt from its name) or a :class:`ProgramRecord` (a program the user built in code
and passed to :func:`pyro_vae.fit`; see docs/extending.md for how such a run loads back).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from . import catalog
from .registry import Registry


def setting(default, help: str, *, minimum: float | None = None, maximum: float | None = None,
            registry: Registry | None = None, choices: tuple[str, ...] | None = None, none_word: str | None = None,
            metavar: str | None = None):
    """A configuration field with what the CLI and validation need to know about it.

    :param registry: the :class:`pyro_vae.registry.Registry` (of :mod:`pyro_vae.catalog`)
        whose names are the valid values; it names its members without importing them, so
        config imports no model code.
    :param choices: a fixed list of valid values, with ``help`` saying what each means.
    :param minimum: the least valid value of a number (``0`` admits 0, ``1`` means positive).
    :param maximum: the greatest valid value of a number, when there is one.
    :param none_word: how the CLI spells the default ``None`` (``--train-limit all``).
    """
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "registry": registry, "choices": choices,
            "none_word": none_word, "metavar": metavar}
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


def registry_of(f: dataclasses.Field) -> Registry | None:
    """The registry a field's values come from, or None."""
    return f.metadata.get("registry")


def choices_of(f: dataclasses.Field) -> tuple[str, ...] | None:
    registry = registry_of(f)
    return registry.names() if registry is not None else f.metadata.get("choices")


class _Section:
    """Validation shared by the sections: types, bounds and choices from each field's metadata."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and (f.default is None or f.metadata.get("none_word")):
                continue
            _check_value(f, value)

    @classmethod
    def from_dict(cls, values: dict[str, Any], section: str):
        if not isinstance(values, dict):
            raise ValueError(f"configuration section {section!r} must be an object, got {values!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown {section} setting(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**values)


def _check_value(f: dataclasses.Field, value) -> None:
    kind = _field_kind(f)
    name = f.name
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return
    if kind is tuple:
        if not isinstance(value, tuple) or not value or any(isinstance(v, bool) or not isinstance(v, int)
                                                               or v < (f.metadata["minimum"] or 0) for v in value):
            raise ValueError(f"{name} must be one or more positive integers, got {value!r}")
        return
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ValueError(f"{name} must be a number, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    minimum, maximum = f.metadata.get("minimum"), f.metadata.get("maximum")
    if maximum is not None and not (minimum if minimum is not None else value) <= value <= maximum:
        raise ValueError(f"{name} must be {allowed_range(kind, minimum, maximum)} ({f.metadata['help']}), "
                         f"got {value!r}")
    if minimum is not None and value < minimum:
        bound = "positive" if minimum == 1 and kind is int else f"at least {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    choices = choices_of(f)
    if choices is not None and value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def allowed_range(kind: type, minimum, maximum) -> str:
    """``"1, 2 or 3"`` for a few integers, else ``"between a and b"`` (``"at most b"``)."""
    if minimum is None:
        return f"at most {maximum}"
    if kind is int and maximum - minimum < 5:
        return ", ".join(map(str, range(minimum, maximum))) + f" or {maximum}"
    return f"between {minimum} and {maximum}"


def _field_kind(f: dataclasses.Field) -> type:
    """int for 'int | None', tuple for 'tuple[int, ...]', and so on (annotations are strings here)."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    base = text.split("|")[0].strip().split("[")[0]
    return {"int": int, "float": float, "str": str, "bool": bool, "tuple": tuple}[base]


@dataclass(frozen=True)
class ModelConfig(_Section):
    model: str = setting("vae", "model family", registry=catalog.MODELS)
    z_dim: int = setting(50, "latent dimension", minimum=1)
    # one hidden layer of 400, as in Pyro's VAE tutorial
    hidden_dims: tuple[int, ...] = setting((400,), "hidden layer sizes of the encoder (the decoder mirrors them)",
                                           minimum=1, metavar="N")
    activation: str = setting("softplus", "activation between layers", registry=catalog.ACTIVATIONS)
    network: str = setting("mlp", "encoder and decoder networks", registry=catalog.NETWORKS)
    likelihood: str = setting("bernoulli", "observation model p(x|z)", registry=catalog.LIKELIHOODS)
    # the decoder's output bias: torch's initialisation, or (Burda et al. 2016) the
    # likelihood's parameter for the training set's mean image
    decoder_bias: str = setting("random", "initial output bias of the decoder: random (torch's default) | data-mean "
                                "(the training set's mean image, as Burda et al. 2016 initialised it)",
                                choices=("random", "data-mean"))
    # the upper stochastic layer of two-layer models (--model vae2): z2 -> z1 -> x
    z2_dim: int = setting(50, "two-layer models only: dimension of the top latent z2 (z1 has --z-dim)", minimum=1)
    z2_hidden_dims: tuple[int, ...] = setting((100, 100), "two-layer models only: hidden layer sizes of q(z2|z1) "
                                              "(p(z1|z2) mirrors them)", minimum=1, metavar="N")
    # the flow of flow guides (--model vae-iaf)
    flow_steps: int = setting(2, "flow guides only: inverse autoregressive transforms after the Gaussian", minimum=1)
    # quadrant completion (--model cvae, cvae-baseline), as in Pyro's CVAE tutorial: 1 shows the
    # bottom-left quadrant, 2 the left half, 3 all but the bottom-right quadrant
    quadrants: int = setting(1, "quadrant completion only: quadrants of each image shown to the program, 1 (bottom "
                             "left), 2 (left half) or 3 (all but bottom right); it predicts the others",
                             minimum=1, maximum=3)
    baseline: str | None = setting(None, "cvae only: a finished --model cvae-baseline run (same --quadrants, "
                                   "--hidden-dims, --activation, --likelihood) whose predictions of the hidden "
                                   "pixels the prior network reads beside the shown ones, as in Pyro's tutorial; "
                                   "its weights are copied into the new run, frozen (default: no baseline)",
                                   metavar="RUN_DIR")
    # Kingma et al.'s alpha, per labelled image as in Pyro's SS-VAE tutorial (its default, -alm 46)
    aux_weight: float = setting(46.0, "m2 only: weight alpha of the auxiliary loss alpha * log q(y|x) of each labelled "
                                "image (Kingma et al. 2014; 0: none)", minimum=0)

    def __post_init__(self):
        for name in ("hidden_dims", "z2_hidden_dims"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        super().__post_init__()

    # settings that only some families read: (what the setting sets, the model that reads it)
    FAMILY_SETTINGS = {"z2_dim": ("the upper stochastic layer of a two-layer model", "vae2"),
                       "z2_hidden_dims": ("the upper stochastic layer of a two-layer model", "vae2"),
                       "flow_steps": ("the inverse autoregressive flow of a flow guide", "vae-iaf"),
                       "quadrants": ("the quadrants shown to a quadrant-completion model", "cvae"),
                       "baseline": ("the baseline network whose guesses a conditional VAE's prior reads", "cvae"),
                       "aux_weight": ("the auxiliary classification loss of a semi-supervised model", "m2")}

    def refuse_unused(self, uses: tuple[str, ...] = ()) -> None:
        """For a family that reads only ``uses`` of :attr:`FAMILY_SETTINGS`: a setting of
        another family, given a non-default value, would be silently unused; refuse it."""
        default = ModelConfig()
        for name, (sets, family) in self.FAMILY_SETTINGS.items():
            if name not in uses and getattr(self, name) != getattr(default, name):
                raise ValueError(f"--{name.replace('_', '-')} sets {sets}; model {self.model!r} does not have one. "
                                 f"Use --model {family}, or drop the flag")


@dataclass(frozen=True)
class ProgramRecord:
    """The ``model`` section of a run whose program was built in code, not from a registry.

    ``program``: the class that trained (``module:QualName``), for the reader.
    ``factory``: an importable ``package.module:function`` (or ``path/to/file.py:function``)
    that returns the program when called without arguments; with it, every command can
    load the run. Without it, load the run in Python with ``load_run(RUN, program=...)``.
    ``likelihood``: the registered name of the program's likelihood, when it has one.
    """

    program: str
    factory: str | None = None
    likelihood: str | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any], section: str = "model") -> "ProgramRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown or "program" not in values:
            raise ValueError(f"a program record needs 'program' and may hold {sorted(names - {'program'})}; "
                             f"got {sorted(values)}")
        return cls(**values)


@dataclass(frozen=True)
class DataConfig(_Section):
    dataset: str = setting("mnist", "data set", registry=catalog.DATASETS)
    data_dir: str | None = setting(None, "data folder (default: $PYRO_VAE_DATA, else ~/.cache/pyro_vae/data)",
                                   metavar="FOLDER")
    # a fresh Bernoulli sample each epoch, as in Burda et al. (2015)
    binarize: str = setting("dynamic", "how grey images become binary, for binary likelihoods only: dynamic "
                            "(a fresh Bernoulli sample each epoch) | fixed (one sample)", choices=("dynamic", "fixed"))
    train_limit: int | None = setting(None, "train on the first N training images only", minimum=1,
                                      none_word="all", metavar="N")
    test_limit: int | None = setting(None, "evaluate on the first N test images only", minimum=1,
                                     none_word="all", metavar="N")
    download: bool = setting(True, "try the download when the files are missing")
    # semi-supervised training (--model m2): the rest of the labels never reach the program
    labels: int | None = setting(None, "keep the labels of N training images, the same number of each class, chosen "
                                 "by --seed and recorded in the run; the others are hidden from the program "
                                 "(semi-supervised models only)", minimum=0, none_word="all", metavar="N")


@dataclass(frozen=True)
class TrainConfig(_Section):
    epochs: int = setting(10, "passes over the training set", minimum=1)
    batch_size: int = setting(128, "images per SVI step", minimum=1)
    lr: float = setting(1e-3, "Adam's learning rate", minimum=0)
    estimator: str = setting("trace", "ELBO estimator", registry=catalog.ESTIMATORS)
    engine: str = setting("captured", "how a step runs", registry=catalog.ENGINES)
    num_particles: int = setting(1, "samples of z per image in each ELBO estimate", minimum=1)
    seed: int = setting(0, "seed of every random choice of the run", minimum=0)
    device: str = setting("auto", "auto | cpu | cuda[:N]  (auto: CUDA when available)")
    eval_batch_size: int = setting(1000, "images per batch when evaluating", minimum=1)
    objective: str = setting("elbo", "what training maximises", registry=catalog.OBJECTIVES)
    beta: float = setting(1.0, "weight of the KL term (beta-VAE, Higgins et al. 2017)", minimum=0)
    kl_warmup_epochs: int = setting(0, "raise the KL weight linearly from ~0 to beta over this many epochs",
                                    minimum=0)
    lr_schedule: str = setting("constant", "the learning rate over the epochs: constant | burda (Burda et al. 2016: "
                               "stage i = 0..7 lasts 3^i epochs at lr * 10^(-i/7), 3280 epochs in all)",
                               choices=("constant", "burda"))

    def __post_init__(self):
        super().__post_init__()
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig | ProgramRecord = field(default_factory=ModelConfig)
    data: DataConfig | None = field(default_factory=DataConfig)  # None: data passed to fit() as tensors
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a run configuration must be a JSON object, got {type(d).__name__}")
        d = _upgrade(d)
        unknown = set(d) - set(SECTIONS)
        if unknown:
            raise ValueError(f"unknown configuration section(s) {sorted(unknown)}; expected model, data, train")
        model = d.get("model", {})
        if isinstance(model, dict) and "program" in model:
            model = ProgramRecord.from_dict(model)
        else:
            model = ModelConfig.from_dict(model, "model")
        data = d.get("data", {})
        data = None if data is None else DataConfig.from_dict(data, "data")
        return cls(model, data, TrainConfig.from_dict(d.get("train", {}), "train"))

    @property
    def registered(self) -> bool:
        """Whether the model is a registered family (rebuilt from this configuration)."""
        return isinstance(self.model, ModelConfig)


def _upgrade(d: dict[str, Any]) -> dict[str, Any]:
    """Configurations written before models were a registry: ``train.elbo`` became
    ``train.estimator``, and ``objective: autoencoder`` became ``model: ae``."""
    train = d.get("train")
    if not isinstance(train, dict) or not ({"elbo"} & set(train) or train.get("objective") == "autoencoder"):
        return d
    train = dict(train)
    model = dict(d.get("model", {}))
    if "elbo" in train:
        train["estimator"] = train.pop("elbo")
    if train.get("objective") == "autoencoder":
        train["objective"] = "elbo"
        model["model"] = "ae"
    return {**d, "model": model, "train": train}
