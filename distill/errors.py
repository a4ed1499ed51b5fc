"""User-facing errors.

Anything raised from here is a problem with the user's input (data, recipe, checkpoint, command
line), not a bug: the CLI prints ``str(exc)`` as one line and exits with code 2.
"""


class DetkdError(Exception):
    """Bad user input. The message must name what is wrong and where (file, image id, key)."""


class DataError(DetkdError):
    """A dataset file, image or annotation is unusable."""


class ConfigError(DetkdError):
    """A recipe or ``--set`` override is invalid."""


class CheckpointError(DetkdError):
    """A checkpoint or cache is missing, corrupt, or does not fit."""


class OutputError(DetkdError):
    """An output file cannot be written (disk full, read-only folder); the previous file is kept."""
