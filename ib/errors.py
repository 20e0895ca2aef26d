"""The error types the CLI turns into a one-line message and a non-zero exit."""


class ConfigError(ValueError):
    """Bad input from the user: a config field, a file or a folder. The message names it. Exit code 2."""


class NonFiniteLossError(RuntimeError):
    """Training stopped by the NaN / inf guard (ib.nonfinite) after a checkpoint of the last good state. Exit 1."""
