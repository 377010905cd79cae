"""Imports the built-in verifier modules so their ``@VERIFIERS.register`` decorators run."""

import verifiers.format  # noqa: F401
import verifiers.countdown  # noqa: F401
import verifiers.math  # noqa: F401
import verifiers.code  # noqa: F401
