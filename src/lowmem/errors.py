"""Errors that reach a user: each message names the problem and the fix.

The CLI prints a LowmemError's message without a traceback and exits with status 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Iterable


class LowmemError(Exception):
    """An error caused by input or environment, with a message that says how to fix it."""


class ConfigError(LowmemError, ValueError):
    """A bad option, preset name or combination of settings."""


class DataError(LowmemError, ValueError):
    """A data source that cannot be read: no files, empty corpus, malformed lines, missing field."""


class CheckpointError(LowmemError):
    """A checkpoint that cannot be loaded or resumed from."""


def check_choice(name: str, value: object, choices: Iterable[object], error: type[Exception] = ValueError) -> None:
    """Refuse `value` unless it is one of `choices`: `error` naming the value and the choices.

    The one "choose one of" check of lowmem (optimizers raise ValueError, which lowmem.optim.build
    turns into a ConfigError naming the method; configs, registries and structures pass ConfigError).
    """
    choices = tuple(choices)  # a dict's keys; membership by ==, so an unhashable value is refused, not a TypeError
    if value not in choices:
        raise error(f"unknown {name} {value!r}; choose one of: {', '.join(map(str, choices)) or '(none)'}")
