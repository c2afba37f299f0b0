"""Error classes: a user's mistake (bad data, bad hyperparameter) is told apart from our bugs."""


class UserError(Exception):
    """Something the user can fix: the message says what was wrong and what to do."""


class ConfigError(UserError):
    """A hyperparameter or setting is unknown or has a bad value."""


class DataError(UserError):
    """The dataset's layout or images are not usable."""


class TrainingStopped(Exception):  # noqa: N818 - a stop is not an error
    """Training was asked to stop (SIGTERM); the last epoch checkpoint is kept."""


def reason(exc: BaseException) -> str:
    """An exception in one line that is never empty: `MemoryError()` says "MemoryError"."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
