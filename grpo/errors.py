"""User-facing errors: one line, says what is wrong and what to do."""


class UserError(Exception):
    """A mistake in the user's input (config, data, model path, CLI arguments).

    The CLI prints ``error: <message>`` on one line and exits with status 2; no
    traceback. Library callers can catch it like any other exception.
    """
