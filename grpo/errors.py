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


def state_dict_error_line(exc: BaseException) -> str:
    """The line of a ``load_state_dict`` error that says what does not fit ("size mismatch for
    ...: copying a param with shape [4, 64] ..."); its first line only says that errors follow."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("size mismatch", "Missing key", "Unexpected key")):
            return line
    return lines[0] if lines else type(exc).__name__
