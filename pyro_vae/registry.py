"""Registries: one per axis of choice (models, likelihoods, networks, data sets, ...).

A registry maps a name to what builds it, with a one-line description. Configuration
validation, CLI choices and CLI help all read from here, so adding a family is one
registration beside its class::

    @LIKELIHOODS.register("bernoulli", "binary pixels, x ~ Bernoulli(logits)")
    class BernoulliLikelihood: ...

The registries live in the modules that define their members (``MODELS`` in
:mod:`pyro_vae.models`, ``LIKELIHOODS`` in :mod:`pyro_vae.likelihoods`, ...); this
module only holds the class.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator


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

    def __getitem__(self, name: str):
        self.check(name)
        return self._entries[name][0]

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
