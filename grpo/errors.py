"""User-facing errors: one line, says what is wrong and what to do."""


class UserError(Exception):
    """A mistake in the user's input (config, data, model path, CLI arguments).

    The CLI prints ``error: <message>`` on one line and exits with status 2; no
    traceback. Library callers can catch it like any other exception.
    """


class PeerFailed(Exception):
    """Under a launcher: this rank stopped because another rank failed (a collective lost its peer).
    That rank printed its own error; this one prints one line saying so (``grpo.dist.fail``) and
    exits non-zero without a traceback of its own."""
