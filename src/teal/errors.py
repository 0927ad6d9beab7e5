"""Errors a user can act on. The CLI prints their message on one line and exits 2."""


class TealError(Exception):
    """Base class: bad input that the user can fix (exit status 2 in the CLI)."""


class ModelNotFoundError(TealError):
    """A path, file or model id that does not exist or cannot be fetched."""


class CorruptCheckpointError(TealError):
    """A checkpoint file that exists but cannot be read (truncated, wrong format)."""


class UnsupportedModelError(TealError):
    """An architecture, activation, dtype or feature this project does not implement."""


class CalibrationMismatchError(TealError):
    """A calibration artifact made for another model, or unreadable."""


class ContextLengthError(TealError):
    """A prompt or window longer than the model (or its sliding window) allows."""


class NetworkError(TealError):
    """Something had to be downloaded and the network could not provide it."""


class SettingError(TealError, ValueError):
    """An environment variable or setting with a value it does not accept."""
