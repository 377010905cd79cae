"""Built-in tools: ``calculator`` (exact arithmetic) and ``python`` (sandboxed code).

Both are safe to run in the trainer's process (``isolation = "inline"``): the
calculator parses with ``verifiers.mathcheck``'s bounded parser and evaluates with
exact fractions under a size guard (no ``eval``); the python tool hands the code to
``verifiers.sandbox`` (a fresh sandboxed process per call with wall, CPU, memory,
process and output limits).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from grpo.registry import TOOLS

MAX_EXPRESSION_CHARS = 500
MAX_RESULT_BITS = 4096  # about 1200 decimal digits: larger intermediate values are refused


class CalculatorError(ValueError):
    """The expression is outside the calculator's grammar or too large."""


@TOOLS.register("calculator")
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly (+, -, *, /, ^, parentheses).

    Args:
        expression: the arithmetic expression, e.g. "23*47 + 12*34"
    """
    from verifiers.mathcheck import ParseError, normalize, parse

    text = expression.strip()
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        node = parse(normalize(text.replace("**", "^")))
    except ParseError as exc:
        raise CalculatorError(f"cannot parse {text[:60]!r}: {exc}") from None
    value = _exact(node)
    if value.denominator == 1:
        return str(value.numerator)
    return f"{value.numerator}/{value.denominator} (= {float(value):.6g})"


calculator.tag = "calc"  # the tagged call format: <calc>23*47</calc>
calculator.isolation = "inline"


def _guard(x: Fraction) -> Fraction:
    if max(x.numerator.bit_length(), x.denominator.bit_length()) > MAX_RESULT_BITS:
        raise CalculatorError("number too large")
    return x


def _exact(node: Any) -> Fraction:
    """Exact value of a parsed arithmetic node (mathcheck's ``Node``); CalculatorError otherwise."""
    kind, args = node.kind, node.args
    if kind == "num":
        return node.value[0]
    if kind == "paren":
        return _exact(args[0])
    if kind == "neg":
        return -_exact(args[0])
    if kind == "add":
        total = Fraction(0)
        for a in args:
            total = _guard(total + _exact(a))
        return total
    if kind == "mul":
        product = Fraction(1)
        for a in args:
            product = _guard(product * _exact(a))
        return product
    if kind == "recip":
        x = _exact(args[0])
        if x == 0:
            raise CalculatorError("division by zero")
        return 1 / x
    if kind == "pct":
        return _exact(args[0]) / 100
    if kind == "pow":
        base, exp = _exact(args[0]), _exact(args[1])
        if exp.denominator != 1:
            raise CalculatorError("only whole-number powers")
        bits = max(base.numerator.bit_length(), base.denominator.bit_length())
        if abs(exp.numerator) * max(1, bits) > MAX_RESULT_BITS:
            raise CalculatorError("number too large")
        if base == 0 and exp < 0:
            raise CalculatorError("division by zero")
        return base ** exp.numerator
    raise CalculatorError(f"unsupported in the calculator: {kind}")


# The program runs inside this wrapper, so an exception's last line reaches the model on
# stdout; a run that prints no end marker was killed (limits) or left through os._exit.
_WRAPPER = """import sys as _sys
_code = {code!r}
try:
    exec(compile(_code, "<tool>", "exec"), {{"__name__": "__main__"}})
except BaseException as _exc:
    _sys.stdout.write(f"\\n{{type(_exc).__name__}}: {{_exc}}\\n")
    _sys.stdout.write({marker!r} + "error\\n")
else:
    _sys.stdout.write({marker!r} + "ok\\n")
"""
_MARKER = "\x00grpo-tool-end:"


@TOOLS.register("python")
class PythonTool:
    """Run Python code in the sandbox and return what it prints (or its error).

    One fresh sandboxed process per call (``verifiers.sandbox``): no network, a private
    working directory, wall-clock, CPU, memory, process-count and output limits.
    """

    tag = "python"  # <python>print(2**10)</python>
    isolation = "inline"  # the sandbox isolates and times the code itself

    def __init__(self, timeout_s: float = 5.0, max_output_bytes: int = 64 * 1024, memory_mb: int = 512):
        from verifiers.sandbox import Limits, Sandbox

        self.sandbox = Sandbox(Limits(wall_s=timeout_s, cpu_s=timeout_s, memory_mb=memory_mb,
                                      max_output_bytes=max_output_bytes), workers=2)
        self.timeout_s = timeout_s

    def __call__(self, code: str) -> str:
        """Run Python code and return its printed output.

        Args:
            code: a Python program; print() what you want to see
        """
        from verifiers.sandbox import IOJob

        result = self.sandbox.run(IOJob(_WRAPPER.format(code=code, marker=_MARKER), [{"input": "", "output": ""}]))
        stdout = result.isolation.get("stdout", "") or ""
        if result.status == "timeout":
            raise TimeoutError(f"the code ran past the {self.timeout_s:g} s limit")
        body, marker, status = stdout.rpartition(_MARKER)
        if not marker:
            why = result.reason.split(": ", 1)[-1] if result.status != "passed" else "it exited early"
            raise RuntimeError(f"the program was stopped ({why})")
        if status.strip() == "error":
            raise RuntimeError(body.strip().splitlines()[-1] if body.strip() else "error")
        return body

    def close(self) -> None:
        self.sandbox.close()
