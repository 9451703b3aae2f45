"""The errors a user can fix, in one place: `UserError` and its subclasses (the CLI prints them as one line, exit 2).

Every error the package raises for a user's mistake or environment (a setting, a path, a file, a cluster) is a
`UserError`; anything else that escapes is a bug and keeps its traceback. The modules that raise these classes
re-export them under their old names (`store.CheckpointError`, `data.DatasetNotFoundError`, ...). This module
imports nothing from jax or the package, so `cli` and layer-1 modules can use it.
"""

from typing import Optional, Sequence

__all__ = [
    "UserError", "ConfigError", "ConfigChangedError", "WorkdirLockedError", "DatasetNotFoundError",
    "DatasetFormatError", "DownloadError", "CheckpointError", "CheckpointWriteError", "NonFiniteLossError",
    "ConversionError", "ExportError", "DistributedStartError",
]


class UserError(ValueError):
    """An error the user can fix (a flag, a path, a setting): the CLI prints its message as one line, status 2."""


class ConfigError(UserError):
    """A setting of a config (file, override or a workdir's saved config.json) that cannot be used as given."""


class ConfigChangedError(ConfigError):
    """A resume with settings the run was not started with (the message lists each refused key, old -> new)."""

    def __init__(self, message: str, refused: Sequence = (), workdir: Optional[str] = None):
        super().__init__(message)
        self.refused = list(refused)
        self.workdir = workdir


class WorkdirLockedError(UserError):
    """Another run holds the workdir's lock (the message names its host, PID, start time and what to do)."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """No usable copy of a dataset was found (the message says what to download and where to put it)."""


class DatasetFormatError(UserError):
    """A data file exists but its content is not what its official format promises (names the file and the key)."""


class DownloadError(UserError, OSError):
    """A download failed or its md5 did not match; nothing was left at the destination."""


class CheckpointError(UserError):
    """A directory that is not a usable model directory or training workdir (the message says what is wrong)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (read-only or full disk); the previous one is intact."""


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss or a gradient became NaN/inf; the run stopped and kept its last good checkpoint (a setting to fix)."""


class ConversionError(UserError):
    """A checkpoint that cannot be read safely or does not fit the chosen architecture."""


class ExportError(UserError):
    """A source that cannot be exported as asked."""


class DistributedStartError(UserError):
    """A multi-process run that cannot start: flags, cluster detection, coordinator, or a workdir not shared."""
