"""Imports the built-in task modules so their ``@TASKS.register`` decorators run."""

import tasks.arith  # noqa: F401
import tasks.countdown  # noqa: F401
import tasks.textmath  # noqa: F401
import tasks.code  # noqa: F401
import tasks.tooluse  # noqa: F401
