"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class ConfigError(ValueError):
    """Bad input from the user: a config field, a file or a folder. The message names it."""
