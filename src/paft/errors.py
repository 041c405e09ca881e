"""User-facing errors: one line that names the file, row, field or config key at fault.

The CLI prints ``PaftError`` messages without a traceback and exits non-zero;
anything else is a bug and keeps its traceback.
"""


class PaftError(Exception):
    """A problem with the user's input (config, data, model), explained in one line."""


class ConfigError(PaftError):
    """An invalid or unknown config key or value."""


class DataError(PaftError):
    """A malformed data file or row."""


class ModelError(PaftError):
    """A model that cannot be loaded or does not match."""
