"""Tasks: everything that turns data into rows (prompt + verifier fields). No reward logic."""

from tasks.base import SPLITS, Task

__all__ = ["SPLITS", "Task"]
