"""Verifiers: everything that turns a completion into a number. No training code."""

from verifiers.base import FunctionVerifier, Score, Verifier, as_score, build_verifier

__all__ = ["FunctionVerifier", "Score", "Verifier", "as_score", "build_verifier"]
