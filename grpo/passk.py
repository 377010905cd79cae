"""Unbiased pass@k (Chen et al. 2021, 'Evaluating Large Language Models Trained on Code', eq. 1)."""

from __future__ import annotations

import math
import operator
from typing import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n
    (of which c are correct) is correct: ``1 - C(n-c, k) / C(n, k)``.

    Unbiased for the model's pass@k when the n samples are i.i.d. Never forms the
    binomials (they overflow floats near n = 1030): the ratio is
    ``prod_{i=n-c+1}^{n} (1 - k/i)`` (the product form of Chen et al.'s code), summed
    here in log space and finished with ``expm1`` so a small pass@k (n large, c small)
    keeps its relative precision instead of cancelling in ``1 - prod``.
    Needs 1 <= k <= n and 0 <= c <= n; raises ValueError otherwise.
    """
    n, c, k = operator.index(n), operator.index(c), operator.index(k)
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: need 0 <= c <= n correct samples, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n, but there are n={n} samples per problem: "
                         f"sample at least {k} or lower k")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    # i >= n - c + 1 > k here, so every factor 1 - k/i lies in (0, 1).
    log_ratio = math.fsum(math.log1p(-k / i) for i in range(n - c + 1, n + 1))
    return -math.expm1(log_ratio)


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean over problems and its standard error (sample std / sqrt(N); 0 for N = 1, NaN for N = 0)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(values) / n
    if n < 2:
        return mean, 0.0
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)
