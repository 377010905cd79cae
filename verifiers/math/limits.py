"""Limits of the ``math`` verifier: option defaults and the guards that keep evaluation bounded."""


# Defaults of the verifier's options; each is a constructor/`check` keyword.
DEFAULT_REL_TOL = 1e-6           # relative tolerance when a decimal is involved
DEFAULT_MAX_COMPLETION_CHARS = 200_000
DEFAULT_MAX_ANSWER_CHARS = 1_000
DEFAULT_MAX_DEPTH = 30           # bracket nesting of one answer

# Internal guards (not options: they keep evaluation bounded, not policy).
_MAX_PARSE_DEPTH = 60            # recursive-descent nesting (brackets, unary and ^ chains)
_MAX_ITEMS = 50                  # items in a list/set/tuple/matrix
_MAX_CANDIDATES = 8              # different extracted answers before we call it hedging
_MAX_EXACT_BITS = 100_000        # size of an exact rational before we go numeric
_MAX_FACTORIAL_EXACT = 2_000
_MAX_FACTORIAL_NUMERIC = 20_000
_MAX_LOG_MAGNITUDE = 700_000     # |ln x| bound for numeric values (about 10**300000)
_MAX_TRIG_ARG = 1e6              # argument reduction cost grows with the argument
_MAX_SCI_EXPONENT = 1_000        # 1e999999999 would be built as an exact integer
_EXACT_TOL = 1e-30               # "exact" comparison at 50 digits of working precision
_ABS_FLOOR = 1e-35               # values this small count as zero (cancellation noise)
_MAX_SECONDS = 1.0               # wall-clock budget of one comparison (a backstop to the guards)
_MAX_PM_VARIANTS = 8             # a ± b expands to 2 variants per ±
