"""Exceptions that entry points turn into a clear one-line message and a non-zero exit."""


class DetflowError(Exception):
    """A user-facing error: bad params, a missing asset, a failed gate. The message says what to do."""


class ConfigError(DetflowError):
    """params.yaml or a --set override is invalid."""


class AssetError(DetflowError):
    """An asset could not be resolved or failed its checksum.

    ``summary``: the failure on one line, for places that can only show one (a warning in a report); by default
    the message's first line.
    """

    def __init__(self, message: str, summary: str | None = None) -> None:
        super().__init__(message)
        self.summary = summary or (message.splitlines() or [""])[0]


class DataError(DetflowError):
    """The dataset cannot be prepared (too many bad samples, nothing readable, leakage)."""
