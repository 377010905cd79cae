"""The earlier import path of the ``math`` verifier, kept so ``verifiers.mathcheck`` imports keep working.

The code lives in the ``verifiers.math`` package (one module per concern); its docstring
states the extraction, normalisation, parsing and equivalence policy.
"""

from verifiers.math import (DEFAULT_FALLBACKS, DEFAULT_MAX_ANSWER_CHARS, DEFAULT_MAX_COMPLETION_CHARS,
                            DEFAULT_MAX_DEPTH, DEFAULT_REL_TOL, FALLBACKS, MathVerifier, Node, ParseError, check,
                            equivalent, extract_answer, extract_boxed, normalize, parse)

__all__ = ["DEFAULT_FALLBACKS", "DEFAULT_MAX_ANSWER_CHARS", "DEFAULT_MAX_COMPLETION_CHARS", "DEFAULT_MAX_DEPTH",
           "DEFAULT_REL_TOL", "FALLBACKS", "MathVerifier", "Node", "ParseError", "check", "equivalent",
           "extract_answer", "extract_boxed", "normalize", "parse"]
