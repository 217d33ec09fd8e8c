"""Errors that reach a user: each message names the problem and the fix.

The CLI prints a LowmemError's message without a traceback and exits with status 2; anything else
is a bug and keeps its traceback.
"""


class LowmemError(Exception):
    """An error caused by input or environment, with a message that says how to fix it."""


class ConfigError(LowmemError, ValueError):
    """A bad option, preset name or combination of settings."""


class DataError(LowmemError, ValueError):
    """A data source that cannot be read: no files, empty corpus, malformed lines, missing field."""


class CheckpointError(LowmemError):
    """A checkpoint that cannot be loaded or resumed from."""
