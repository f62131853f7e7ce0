"""The project's user-error types: bad input, explained in one line.

Command-line entry points print an AdaspkvError as one line, without a traceback (`adaspkv --debug`
shows it); any other exception is a bug or an unexpected failure and keeps its traceback. Both are
ValueErrors, so Python callers that catch ValueError keep working. No imports: every layer uses them.
"""


class AdaspkvError(ValueError):
    """Bad input or an explained failure: the message says what is wrong and what is allowed."""


class ConfigError(AdaspkvError):
    """A configuration, an option or an input file that cannot run."""
