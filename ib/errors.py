"""The error types the CLI turns into a one-line message and a non-zero exit."""


class ConfigError(ValueError):
    """Bad input from the user: a config field, a file or a folder. The message names it. Exit code 2."""

    def __init__(self, message: str = ""):
        # Raised in a DataLoader worker, it comes back as "Caught ConfigError in DataLoader worker process 0.
        # Original Traceback ... ib.errors.ConfigError: <message>": keep the message alone.
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class StorageError(ConfigError):
    """A write the file system refused (full disk, quota, read-only); the previous file is kept. Exit code 2."""


class NonFiniteLossError(RuntimeError):
    """Training stopped by the NaN / inf guard (ib.nonfinite) after a checkpoint of the last good state. Exit 1."""


def one_line(e: BaseException) -> str:
    """An exception's message as one line: its first non-empty line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
