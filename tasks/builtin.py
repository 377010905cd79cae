"""Imports the built-in task modules so their ``@TASKS.register`` decorators run."""

import tasks.arith  # noqa: F401
