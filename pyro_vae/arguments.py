"""The argument parser the ``pyro-vae`` command is built from: :class:`argparse.ArgumentParser`,
with usage errors that say where they happened and what was meant.

* A flag is spelled out: ``--epoch 2`` is an error, never silently ``--epochs``
  (``allow_abbrev=False`` on the parser and every subcommand's parser).
* An unknown flag is reported by the subcommand it was given to, with that subcommand's
  usage (``usage: pyro-vae train [-h] ...``), not the top level's.
* An unknown flag or choice comes with the nearest known one: ``--epcohs`` -> ``did you
  mean --epochs?``, ``--model vea`` -> ``did you mean 'vae'?``.

This module imports nothing beyond the standard library: these errors answer at once.
"""

from __future__ import annotations

import argparse
import difflib


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", Parser)
        return super().add_subparsers(**kwargs)

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self._command_parser(namespace)
            parser.error(f"unrecognized arguments: {' '.join(extras)}{parser._flag_hints(extras)}")
        return namespace

    def _command_parser(self, namespace) -> "Parser":
        """The subcommand's parser when one was chosen (argparse would blame the top level)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = getattr(namespace, action.dest, None)
                if chosen in action.choices:
                    return action.choices[chosen]._command_parser(namespace)
        return self

    def _flag_hints(self, extras: list[str]) -> str:
        """``"; did you mean --epochs?"`` for the unknown flags among ``extras`` that are near a known one."""
        hints = []
        for token in extras:
            flag = token.split("=", 1)[0]
            if not flag.startswith("--"):
                continue
            near = nearest(flag, self._option_string_actions)
            if near is not None:
                hints.append((flag, near))
        if not hints:
            return ""
        if len(hints) == 1:
            return f"; did you mean {hints[0][1]}?"
        return "; did you mean " + ", ".join(f"{near} (for {flag})" for flag, near in hints) + "?"

    def _check_value(self, action, value):
        # argparse's own check of a choice, with the nearest choice added to its message
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as err:
            near = nearest(value, action.choices) if isinstance(value, str) else None
            if near is None:
                raise
            raise argparse.ArgumentError(action, f"{err.message}; did you mean {near!r}?") from None


def nearest(word: str, known) -> str | None:
    """The known string most like ``word`` (a typo or a prefix of it), or None when none is close."""
    candidates = [k for k in known if isinstance(k, str)]
    prefixed = [k for k in candidates if k.startswith(word)]
    if len(prefixed) == 1:
        return prefixed[0]
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return close[0] if close else None
