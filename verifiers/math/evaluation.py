"""Evaluation: exact rational arithmetic, then 50-digit numeric values (mpmath) at sample points.

Every power, factorial, exp and trigonometric call is guarded (``limits``) and each comparison
has a wall-clock budget (``_Ctx``), so no answer can make a comparison run away.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from fractions import Fraction
from typing import Any

from verifiers.math.limits import (_ABS_FLOOR, _EXACT_TOL, _MAX_EXACT_BITS, _MAX_FACTORIAL_EXACT,
                                   _MAX_FACTORIAL_NUMERIC, _MAX_LOG_MAGNITUDE, _MAX_SECONDS, _MAX_TRIG_ARG)
from verifiers.math.nodes import (Node, _free_symbols, _has_decimal, _Incomparable, _TooLarge, _Undefined,
                                  _written_place)


_SAMPLE_POINTS = 3               # points per identity test when free variables appear, in (0.35, 1.65)
_WIDE_POINTS = 2                 # and in (1.65, 9), where both sides are real and in range


class _NotExact(Exception):
    """The value is not rational (or too large to keep exact): evaluate numerically."""


class _Ctx:
    """Per-comparison state: tolerance, the mpmath context (private, so the global
    ``mpmath.mp`` precision is never touched and threads do not interfere) and a deadline."""

    def __init__(self, rel_tol: float):
        import mpmath  # heavy-ish import at call time

        self.rel_tol = rel_tol
        self.rel_tol_exact = Fraction(repr(rel_tol))  # 1e-6 as 1/10**6, not a binary float
        self.mp = _mp_context(mpmath)
        self.deadline = time.monotonic() + _MAX_SECONDS
        self.steps = 0

    def tick(self) -> None:
        self.steps += 1
        if self.steps % 64 == 0 and time.monotonic() > self.deadline:
            raise _OutOfTime(f"comparison took over {_MAX_SECONDS:g}s")


class _OutOfTime(_TooLarge):
    """The comparison's deadline passed: never skipped like a wide point's value out of range
    (the outcome would depend on the machine's load)."""


_THREAD = threading.local()


def _mp_context(mpmath):
    ctx = getattr(_THREAD, "mp", None)
    if ctx is None:
        ctx = mpmath.MPContext()
        ctx.dps = 50
        _THREAD.mp = ctx
    return ctx


def _bits(x: Fraction) -> int:
    return max(x.numerator.bit_length(), x.denominator.bit_length())


def _exact_guard(x: Fraction) -> Fraction:
    if _bits(x) > _MAX_EXACT_BITS:
        raise _NotExact("too many digits")
    return x


def _iroot(n: int, q: int) -> int:
    """Floor of the q-th root of a non-negative integer (Newton's method on integers)."""
    if n < 2:
        return n
    x = 1 << -(-n.bit_length() // q)
    while True:
        y = ((q - 1) * x + n // x ** (q - 1)) // q
        if y >= x:
            return x
        x = y


def _exact_root(x: Fraction, q: int) -> Fraction:
    """The exact q-th root of x when it is rational (odd roots of negatives are real)."""
    if q < 1 or q > 64:
        raise _NotExact("root index")
    if x < 0:
        if q % 2 == 0:
            raise _NotExact("even root of a negative")
        return -_exact_root(-x, q)
    p, d = _iroot(x.numerator, q), _iroot(x.denominator, q)
    if p ** q != x.numerator or d ** q != x.denominator:
        raise _NotExact("irrational root")
    return Fraction(p, d)


def _exact_pow(base: Fraction, exp: Fraction) -> Fraction:
    if exp.denominator != 1:
        if base < 0:
            raise _NotExact("fractional power of a negative")
        return _exact_pow(_exact_root(base, exp.denominator), Fraction(exp.numerator))
    n = exp.numerator
    if base == 0:
        if n < 0:
            raise _Undefined("0 to a negative power")
        return Fraction(1) if n == 0 else Fraction(0)
    if base in (1, -1):
        return base ** (n % 2) if base == -1 else Fraction(1)
    if _bits(base) * abs(n) > _MAX_EXACT_BITS:
        raise _NotExact("power too large to keep exact")
    return base ** n


def _exact(node: Node, ctx: _Ctx) -> Fraction:
    """The exact rational value of a variable-free node, or ``_NotExact``."""
    ctx.tick()
    k, a = node.kind, node.args
    if k == "num":
        return node.value[0]
    if k == "paren":
        return _exact(a[0], ctx)
    if k == "neg":
        return -_exact(a[0], ctx)
    if k == "add":
        total = Fraction(0)
        for x in a:
            total = _exact_guard(total + _exact(x, ctx))
        return total
    if k == "mul":
        prod = Fraction(1)
        for x in a:
            prod = _exact_guard(prod * _exact(x, ctx))
        return prod
    if k == "recip":
        x = _exact(a[0], ctx)
        if x == 0:
            raise _Undefined("division by zero")
        return 1 / x
    if k == "pct":
        return _exact(a[0], ctx) / 100
    if k == "pow":
        return _exact_guard(_exact_pow(_exact(a[0], ctx), _exact(a[1], ctx)))
    if k == "fact":
        x = _exact(a[0], ctx)
        if x.denominator != 1 or x < 0 or x > _MAX_FACTORIAL_EXACT:
            raise _NotExact("factorial")
        return Fraction(math.factorial(int(x)))
    if k == "func":
        name = node.value
        if name == "sqrt":
            q = _exact(a[1], ctx) if len(a) > 1 else Fraction(2)
            if q.denominator != 1:
                raise _NotExact("root index")
            return _exact_root(_exact(a[0], ctx), int(q))
        if name == "abs":
            return abs(_exact(a[0], ctx))
        if name in ("floor", "ceil"):
            x = _exact(a[0], ctx)
            return Fraction(math.floor(x) if name == "floor" else math.ceil(x))
        if name == "binom":
            n, r = _exact(a[0], ctx), _exact(a[1], ctx)
            if n.denominator != 1 or r.denominator != 1 or not 0 <= r <= n or n > 10 ** 6 \
                    or min(r, n - r) > _MAX_FACTORIAL_EXACT:
                raise _NotExact("binomial")
            return _exact_guard(Fraction(math.comb(int(n), int(r))))
    raise _NotExact(k)


def _sample(mp, name: str, point: int):
    """Deterministic pseudo-random value for a variable at a sample point: in (0.35, 1.65)
    for the first ``_SAMPLE_POINTS``, in (1.65, 9) for the wide ones after them (so that
    ``|x-2|`` is not ``2-x``). Every point is positive: ``\\sqrt{x^2}`` is ``x``."""
    h = int.from_bytes(hashlib.blake2b(f"{name}:{point}".encode(), digest_size=24).digest(), "big")
    low, width = ("0.35", "1.3") if point < _SAMPLE_POINTS else ("1.65", "7.35")
    return mp.mpf(low) + mp.mpf(width) * (mp.mpf(h) / mp.mpf(2) ** 192)


def _sampled_values(a: Node, b: Node, free: list[str], ctx: "_Ctx"):
    """``(x, y)``: both sides' values at each sample point where both are defined; at the
    wide points only where both are real and within the size guards."""
    mp = ctx.mp
    for point in range(_SAMPLE_POINTS + _WIDE_POINTS if free else 1):
        env = {name: _sample(mp, name, point) for name in free}
        wide = point >= _SAMPLE_POINTS
        try:
            x, y = _numeric(a, env, ctx), _numeric(b, env, ctx)
        except _Undefined:
            continue
        except _OutOfTime:
            raise
        except _TooLarge:
            if wide:
                continue
            raise
        if wide and not (_is_real(mp, x) and _is_real(mp, y)):
            continue
        yield x, y


def _checked(mp, v):
    """Reject NaN (undefined) and magnitudes beyond the guard (about 10**300000)."""
    if mp.isnan(v):
        raise _Undefined("not a number")
    if not mp.isinf(v) and v != 0 and abs(mp.mag(v)) > _MAX_LOG_MAGNITUDE * 1.45:
        raise _TooLarge("value out of range")
    return v


def _is_real(mp, v) -> bool:
    return not isinstance(v, mp.mpc) or v.imag == 0


def _real(mp, v, what: str):
    if not _is_real(mp, v):
        raise _Undefined(f"{what} of a complex number")
    return mp.mpf(v.real) if isinstance(v, mp.mpc) else v


def _numeric(node: Node, env: dict[str, Any], ctx: _Ctx):
    """High-precision value of a node (mpmath, 50 digits) with variables bound in ``env``."""
    ctx.tick()
    mp = ctx.mp
    k, a = node.kind, node.args
    if k == "num":
        f = node.value[0]
        return mp.mpf(f.numerator) / f.denominator
    if k == "const":
        return {"pi": mp.pi, "e": mp.e, "inf": mp.inf}.get(node.value) if node.value != "i" else mp.mpc(0, 1)
    if k == "sym":
        return env[node.value]
    if k == "letters":
        prod = mp.mpf(1)
        for c in node.value:
            prod *= mp.e if c == "e" else mp.mpc(0, 1) if c == "i" else env[c]
        return prod
    if k == "paren":
        return _numeric(a[0], env, ctx)
    if k == "neg":
        return -_numeric(a[0], env, ctx)
    if k == "add":
        total = mp.mpf(0)
        for x in a:
            total = _checked(mp, total + _numeric(x, env, ctx))
        return total
    if k == "mul":
        prod = mp.mpf(1)
        for x in a:
            prod = _checked(mp, prod * _numeric(x, env, ctx))
        return prod
    if k == "recip":
        x = _numeric(a[0], env, ctx)
        if x == 0:
            raise _Undefined("division by zero")
        return 1 / x
    if k == "pct":
        return _numeric(a[0], env, ctx) / 100
    if k == "pow":
        return _numeric_pow(mp, _numeric(a[0], env, ctx), _numeric(a[1], env, ctx))
    if k == "fact":
        x = _numeric(a[0], env, ctx)
        if not _is_real(mp, x) or mp.isinf(x):
            raise _Undefined("factorial")
        x = _real(mp, x, "factorial")
        if x > _MAX_FACTORIAL_NUMERIC or x < -_MAX_FACTORIAL_NUMERIC:
            raise _TooLarge("factorial too large")
        if x < 0 and x == mp.floor(x):
            raise _Undefined("factorial of a negative integer")
        return _checked(mp, mp.gamma(x + 1))
    if k == "func":
        return _numeric_func(node.value, [_numeric(x, env, ctx) for x in a], mp)
    raise _Incomparable(f"{k} has no numeric value")


def _numeric_pow(mp, base, exp):
    if mp.isinf(base) or mp.isinf(exp):
        raise _Undefined("power of infinity")
    if base == 0:
        if mp.re(exp) <= 0:
            raise _Undefined("0 to a non-positive power")
        return mp.mpf(0)
    # |base**exp| = exp(re(exp)*ln|base| - im(exp)*arg(base)): bound it before computing.
    size = abs(mp.re(exp) * mp.log(abs(base))) + abs(mp.im(exp)) * 4
    if size > _MAX_LOG_MAGNITUDE:
        raise _TooLarge("power too large")
    positive = _is_real(mp, base) and mp.re(base) > 0
    if abs(exp) > _MAX_TRIG_ARG and not positive:
        # (-1)^(10^100000): the phase needs argument reduction as costly as sin(10^100000).
        raise _TooLarge("power with a huge exponent")
    if _is_real(mp, exp) and exp == mp.floor(exp) and _is_real(mp, base) and abs(exp) <= _MAX_TRIG_ARG:
        return _checked(mp, mp.power(_real(mp, base, "power"), int(exp)))
    return _checked(mp, mp.power(base, exp))  # exp(exp * log(base)): cost independent of exp


def _numeric_func(name: str, args: list, mp):
    x = args[0]
    if mp.isinf(x):
        raise _Undefined(f"{name} of infinity")
    if name in ("sin", "cos", "tan", "cot", "sec", "csc"):
        if abs(x) > _MAX_TRIG_ARG:
            raise _TooLarge("trigonometric argument too large")
        v = {"sin": mp.sin, "cos": mp.cos, "tan": mp.tan, "cot": mp.tan, "sec": mp.cos, "csc": mp.sin}[name](x)
        if name in ("cot", "sec", "csc"):
            if abs(v) < _ABS_FLOOR:
                raise _Undefined(f"{name} pole")
            v = 1 / v
        elif name == "tan" and abs(v) > 1e40:
            raise _Undefined("tan pole")
        return _checked(mp, v)
    if name in ("sinh", "cosh", "tanh", "exp"):
        if abs(mp.re(x)) > _MAX_LOG_MAGNITUDE or abs(mp.im(x)) > _MAX_TRIG_ARG:
            raise _TooLarge(f"{name} argument too large")
        return _checked(mp, {"sinh": mp.sinh, "cosh": mp.cosh, "tanh": mp.tanh, "exp": mp.exp}[name](x))
    if name in ("arcsin", "arccos", "arctan"):
        return _checked(mp, {"arcsin": mp.asin, "arccos": mp.acos, "arctan": mp.atan}[name](x))
    if name in ("log", "ln", "lg"):
        if x == 0:
            raise _Undefined("log 0")
        value = mp.log(x)
        if name == "lg" or (name == "log" and len(args) > 1):
            base = args[1] if len(args) > 1 else mp.mpf(10)
            if base == 0 or base == 1 or mp.isinf(base):
                raise _Undefined("log base")
            value = value / mp.log(base)
        return _checked(mp, value)
    if name == "sqrt":
        if len(args) == 1:
            return mp.sqrt(x)
        n = args[1]
        if n == 0 or mp.isinf(n):
            raise _Undefined("root index")
        if _is_real(mp, n) and _is_real(mp, x) and n == mp.floor(n) and int(n) % 2 and x < 0:
            return -mp.root(-_real(mp, x, "root"), int(n))  # real odd root of a negative
        return _numeric_pow(mp, x, 1 / n)
    if name == "abs":
        return abs(x)
    if name in ("floor", "ceil"):
        x = _real(mp, x, name)
        return mp.floor(x) if name == "floor" else mp.ceil(x)
    if name == "binom":
        n, r = _real(mp, x, "binom"), _real(mp, args[1], "binom")
        if abs(n) > _MAX_FACTORIAL_NUMERIC * 50 or abs(r) > _MAX_FACTORIAL_NUMERIC * 50:
            raise _TooLarge("binomial too large")
        return _checked(mp, mp.binomial(n, r))
    raise _Incomparable(f"unknown function {name}")


def _close(mp, x, y, tol) -> bool:
    if mp.isinf(x) or mp.isinf(y):
        return x == y
    diff = abs(x - y)
    return diff <= _ABS_FLOOR or diff <= tol * max(abs(x), abs(y))


def _scalar_equal(a: Node, b: Node, ctx: _Ctx) -> bool:
    """Two expressions (no collections, no relations) have the same value."""
    decimal = _has_decimal(a) or _has_decimal(b)
    free = sorted(_free_symbols(a) | _free_symbols(b))
    if not free:
        try:
            x, y = _exact(a, ctx), _exact(b, ctx)
        except _NotExact:
            pass
        except _Undefined:
            return False
        else:
            if decimal:
                # Within the relative tolerance, and, for a plain decimal, within its last
                # written place: "1000001.0" is not 1000000, "0.333333" and "0.666666" are 1/3, 2/3.
                places = [p for p in (_written_place(a), _written_place(b)) if p is not None]
                return (abs(x - y) <= ctx.rel_tol_exact * max(abs(x), abs(y))
                        and (not places or abs(x - y) <= max(places)))
            return x == y
    mp = ctx.mp
    tol = mp.mpf(repr(ctx.rel_tol)) if decimal else mp.mpf(_EXACT_TOL)
    compared = 0
    for x, y in _sampled_values(a, b, free, ctx):
        if not _close(mp, x, y, tol):
            return False
        compared += 1
    return compared > 0


def _proportional(f: Node, g: Node, ctx: _Ctx) -> bool:
    """``f = c*g`` for a constant ``c != 0`` (the equations ``f = 0`` and ``g = 0`` agree)."""
    mp = ctx.mp
    free = sorted(_free_symbols(f) | _free_symbols(g))
    tol = mp.mpf(repr(ctx.rel_tol)) if (_has_decimal(f) or _has_decimal(g)) else mp.mpf(_EXACT_TOL) * 1e6
    ratio = None
    for x, y in _sampled_values(f, g, free, ctx):
        if mp.isinf(x) or mp.isinf(y):
            return False
        if abs(x) <= _ABS_FLOOR and abs(y) <= _ABS_FLOOR:
            continue
        if abs(x) <= _ABS_FLOOR or abs(y) <= _ABS_FLOOR:
            return False
        r = x / y
        if ratio is None:
            ratio = r
        elif not _close(mp, r, ratio, tol):
            return False
    return ratio is not None
