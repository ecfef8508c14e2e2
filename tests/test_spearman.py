"""The one Spearman ρ (merging.apl.fidelity): average ranks for ties, against a hand-written oracle."""

import math

import numpy as np
import pytest

from merging import MergeLabError
from merging.apl.fidelity import rank_correlation, spearman


def _average_ranks(values):
    """1-based ranks, each group of equal values sharing the mean of the positions it spans."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for position in range(i, j + 1):
            ranks[order[position]] = (i + 1 + j + 1) / 2
        i = j + 1
    return ranks


def _pearson(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


TIED = ([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.5], [2.0, 1.0, 1.0, 4.0, 3.0, 3.0, 9.0, 0.0])


def test_tied_case_equals_pearson_of_average_ranks():
    a, b = TIED
    assert _average_ranks(a) == [2.0, 3.5, 3.5, 5.0, 7.0, 7.0, 7.0, 1.0]
    expected = _pearson(_average_ranks(a), _average_ranks(b))
    assert spearman(a, b) == pytest.approx(expected, abs=1e-12)
    # ordinal ranks (ties broken by position) give another number: the case does tell the two apart
    ordinal = lambda v: list(np.argsort(np.argsort(v, kind="stable")).astype(float))  # noqa: E731
    assert abs(_pearson(ordinal(a), ordinal(b)) - expected) > 0.01


def test_non_finite_pairs_are_left_out_and_undefined_is_nan():
    a, b = TIED
    assert spearman(a + [math.nan, 1.0], b + [3.0, math.inf]) == pytest.approx(spearman(a, b), abs=1e-12)
    assert math.isnan(spearman([1.0, 2.0], [2.0, 1.0]))  # fewer than 3 pairs
    assert math.isnan(spearman([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]))  # constant side
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    with pytest.raises(MergeLabError, match="equally long"):
        spearman([1.0, 2.0, 3.0], [1.0, 2.0])


def test_rank_correlation_is_spearman_of_magnitudes_without_shared_zeros():
    a = [-3.0, 1.0, 0.0, 2.0, -2.0, 0.0, 4.0]
    b = [1.0, -1.0, 0.0, 3.0, 2.0, 0.5, -5.0]
    kept = [i for i in range(len(a)) if not (a[i] == 0 and b[i] == 0)]  # index 2 is zero in both
    expected = _pearson(_average_ranks([abs(a[i]) for i in kept]), _average_ranks([abs(b[i]) for i in kept]))
    assert rank_correlation(a, b) == pytest.approx(expected, abs=1e-12)
