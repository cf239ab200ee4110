"""Errors that the CLI reports as one line (exit code 2) instead of a traceback."""


class EsskitError(Exception):
    """Bad input: the message names the file/key/value and how to fix it."""


class ConfigError(EsskitError):
    pass


class DataError(EsskitError):
    pass


class ModelError(EsskitError):
    pass


class TrainingError(EsskitError):
    pass


def is_batchnorm_one_value(error: BaseException) -> bool:
    """torch's refusal to train BatchNorm on one value per channel (batch 1 at a small crop)."""
    return isinstance(error, ValueError) and "more than 1 value per channel" in str(error)
