"""The one exception type users see for bad input."""


class FlaxdoseError(Exception):
    """Bad input or an unusable setting; the message says what was wrong and how to fix it."""
