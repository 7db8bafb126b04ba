"""Registries: one per axis of choice (models, likelihoods, networks, data sets, ...).

A registry maps a name to what builds it, with a one-line description. Configuration
validation, CLI choices and CLI help all read from here. The built-in entries are declared
in :mod:`pyro_vae.catalog` as ``(name, "module:attribute", description)`` and imported
only when first used, so that ``pyro-vae --help`` and a mistyped flag answer without
importing torch; adding a built-in family is one line there::

    LIKELIHOODS.declare("bernoulli", "pyro_vae.likelihoods:BernoulliLikelihood",
                        "binary pixels, x ~ Bernoulli(logits)")

Code of one's own registers at import, with the decorator, beside its class (it is listed
once its module is imported, e.g. by the factory ``--program`` names)::

    @LIKELIHOODS.register("poisson", "counts, x ~ Poisson(exp(decoder output))")
    class PoissonLikelihood: ...
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator


class _Declared:
    """``"module:attribute"``: a builder not imported yet."""

    def __init__(self, target: str):
        module, _, attribute = target.partition(":")
        if not module or not attribute:
            raise ValueError(f"a declared builder is 'module:attribute', got {target!r}")
        self.module, self.attribute = module, attribute

    def resolve(self) -> Any:
        value = importlib.import_module(self.module)
        for part in self.attribute.split("."):
            value = getattr(value, part)
        return value


class Registry:
    """Names -> builders, each with a one-line description, in registration order."""

    def __init__(self, kind: str):
        self.kind = kind  # "model", "likelihood", ...: used in messages
        self._entries: dict[str, tuple[Any, str]] = {}

    def register(self, name: str, description: str) -> Callable[[Any], Any]:
        """Decorator: ``@REGISTRY.register("name", "what it is")`` on a class or function."""

        def add(builder):
            self.add(name, builder, description)
            return builder

        return add

    def add(self, name: str, builder: Any, description: str) -> None:
        if name in self._entries:
            raise ValueError(f"a {self.kind} named {name!r} is already registered")
        self._entries[name] = (builder, description)

    def declare(self, name: str, target: str, description: str) -> None:
        """Register ``name`` as the object at ``target`` (``"package.module:attribute"``),
        imported when the entry is first looked up."""
        self.add(name, _Declared(target), description)

    def __getitem__(self, name: str):
        self.check(name)
        builder, description = self._entries[name]
        if isinstance(builder, _Declared):
            builder = builder.resolve()
            self._entries[name] = (builder, description)
        return builder

    def check(self, name: str, flag: str | None = None) -> None:
        """Raise ``ValueError`` naming the choices unless ``name`` is registered."""
        if name not in self._entries:
            what = flag or self.kind
            raise ValueError(f"unknown {what} {name!r}; choose one of: {', '.join(self._entries)}")

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def description(self, name: str) -> str:
        return self._entries[name][1]

    def help(self) -> str:
        """``"a: what a is | b: what b is"``, for the CLI's help."""
        return " | ".join(f"{name}: {desc}" for name, (_, desc) in self._entries.items())
