import itertools
import math
from fractions import Fraction

import pytest

from trainer.passk import pass_at_k, pass_at_k_table


def brute_force(n: int, c: int, k: int) -> float:
    """The fraction of k-subsets of n samples (c of them correct) that hold a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 1, 1, 0.2), (5, 0, 1, 0.0), (5, 5, 1, 1.0), (5, 2, 2, 0.7), (10, 3, 8, 1.0), (2, 1, 2, 1.0), (1, 1, 1, 1.0),
    (100, 0, 50, 0.0),
])
def test_known_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_matches_enumeration_of_all_k_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_1_is_the_fraction_correct():
    assert pass_at_k(64, 13, 1) == pytest.approx(13 / 64)


def test_large_n_is_stable_and_exact():
    for n, c, k in [(2000, 3, 100), (5000, 1, 1), (1000, 500, 256), (10_000, 2, 5_000)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-10, abs=1e-12)


def test_monotone_in_k_and_c():
    values = [pass_at_k(32, 4, k) for k in range(1, 33)]
    assert values == sorted(values) and values[-1] == 1.0
    assert [pass_at_k(32, c, 4) for c in range(33)] == sorted(pass_at_k(32, c, 4) for c in range(33))


@pytest.mark.parametrize("n, c, k, message", [
    (4, 1, 5, "pass@5 needs at least 5 samples"), (4, 5, 1, "c=5"), (4, -1, 1, "c=-1"), (4, 1, 0, "k >= 1"),
    (0, 0, 1, "n >= 1"),
])
def test_invalid_arguments_raise(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


def test_table_is_the_mean_over_problems_each_with_its_own_n():
    results = {
        "mathd_algebra_10": [True, False, False, False],  # n=4, c=1
        "imo_1959_p1": [False] * 8,  # n=8, c=0
        "amc12a_2008_p8": [True, True, False, True, False, False, False, False],  # n=8, c=3
    }
    table = pass_at_k_table(results, [1, 2, 4])
    assert set(table) == {1, 2, 4}
    for k in (1, 2, 4):
        expected = (pass_at_k(4, 1, k) + 0.0 + pass_at_k(8, 3, k)) / 3
        assert table[k] == pytest.approx(expected)
    assert table[1] == pytest.approx((1 / 4 + 0 + 3 / 8) / 3)


def test_table_refuses_a_k_larger_than_a_problems_samples():
    with pytest.raises(ValueError, match=r"pass@8 needs at least 8 samples per problem, but problem 'p2' has 4"):
        pass_at_k_table({"p1": [True] * 8, "p2": [False] * 4}, [1, 8])
    with pytest.raises(ValueError, match="at least one problem"):
        pass_at_k_table({}, [1])
