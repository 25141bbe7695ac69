"""The project's own exception types: errors a user can cause, with a message that says what to do.

The CLI prints these without a traceback and exits with status 2.
"""


class TumorflowError(Exception):
    """Base class of every error a user can cause and fix."""


class ConfigError(TumorflowError):
    """The configuration file or an override is invalid."""


class SourceUnavailableError(TumorflowError):
    """A dataset source (Kaggle, GCS, a path) cannot be reached or does not exist."""


class UnsafeArchiveError(TumorflowError):
    """An archive holds an entry that would land outside its target, or a link."""


class DatasetError(TumorflowError):
    """The dataset cannot be used as it is (empty class, fewer than two classes, tiny split...)."""


class WeightsUnavailableError(TumorflowError):
    """Pretrained backbone weights cannot be fetched or found."""


class ModelError(TumorflowError):
    """A model or model directory is missing, corrupt or of the wrong shape."""


class GateError(TumorflowError):
    """The evaluation gate cannot be evaluated (missing metric, bad rule)."""
