"""The exceptions a user sees: bad params or bad data, each message saying what to do.

Anything raised as one of ``USER_ERRORS`` is shown as one clear line (exit code 2) by
every entry point; other exceptions are bugs and keep their traceback.
"""


class ConfigError(ValueError):
    """A params file that cannot be used; the message says which key and what to do."""


class DataError(ValueError):
    """A dataset or stage output that cannot be used as it is; the message says what to do."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, FileNotFoundError)
