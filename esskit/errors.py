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
