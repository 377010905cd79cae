"""How a stdin/stdout program's output is compared with the expected output.

Used by the sandbox's caller side (``verifiers/sandbox/runner.py``), which compares the
captured output outside the sandbox, and re-exported by ``verifiers.code``.
"""

from __future__ import annotations


def output_lines(text: str) -> list[str]:
    """Lines of program output as compared: trailing spaces and trailing blank lines dropped."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def compare_output(expected: str, actual: str) -> tuple[bool, str]:
    """Full line-list equality (no credit for a prefix or extra lines), with a short reason."""
    want, got = output_lines(expected), output_lines(actual)
    if want == got:
        return True, "ok"
    for i, (w, g) in enumerate(zip(want, got)):
        if w != g:
            return False, f"line {i + 1}: expected {w[:40]!r}, got {g[:40]!r}"
    if len(got) < len(want):
        return False, f"output ended after {len(got)} of {len(want)} lines"
    return False, f"{len(got) - len(want)} extra line(s) after the expected {len(want)}"
