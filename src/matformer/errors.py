"""Our exception types. The CLI catches `MatFormerError` and prints its message in one or two
lines with a non-zero exit; everything else is a bug and keeps its traceback."""

from __future__ import annotations


class MatFormerError(Exception):
    """Base class of every error matformer raises on bad input."""


class ConfigError(MatFormerError, ValueError):
    """An invalid configuration value; the message names the key."""


class TierError(MatFormerError, ValueError):
    """A tier or width that the model or checkpoint cannot run."""


class CheckpointError(MatFormerError):
    """A checkpoint that cannot be read or written; the message names the file and the problem."""


class DataError(MatFormerError):
    """Training or evaluation data that cannot be used."""


class CheckpointChanged(CheckpointError):
    """A checkpoint was replaced or removed while it was being read (a save ran at the same
    time). Nothing of the two versions was mixed; reading again sees the new one."""


class TrainingDiverged(MatFormerError):
    """A training run whose loss, gradients or weights stopped being finite: stopped before
    anything non-finite was saved (the last good checkpoint is kept)."""
