"""The Wilson interval against published values (Newcombe 1998, Table I; and statsmodels' proportion_confint)."""

import pytest

from qwen3vl_lab.stats import format_accuracy, wilson_interval


@pytest.mark.parametrize("k, n, low, high", [
    (81, 263, 0.2553, 0.3662),  # Newcombe 1998, example (a)
    (15, 148, 0.0624, 0.1605),  # example (b)
    (0, 20, 0.0, 0.1611),       # example (c): 0 successes
    (1, 29, 0.0061, 0.1718),    # example (d)
])
def test_wilson_matches_newcombe(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=5e-4) and hi == pytest.approx(high, abs=5e-4)


def test_bad_counts_are_refused():
    with pytest.raises(ValueError):
        wilson_interval(1, 0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_format_names_count_and_interval():
    assert format_accuracy(27, 30) == "90.0% (27/30, 95% CI 74-97%)"
