"""pass@k with the unbiased estimator of Chen et al. (2021): `1 - C(n-c, k) / C(n, k)`.

With n samples of a problem of which c are correct, this is the probability that a
k-subset drawn without replacement contains at least one correct sample. The ratio of
binomials is computed as the product `prod_{i=n-c+1}^{n} (1 - k/i)`, which never forms a
factorial, so n in the thousands is as exact as n = 5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `n` samples, `c` of them correct."""
    if n < 1 or k < 1:
        raise ValueError(f"pass@k needs n >= 1 and k >= 1, got n={n}, k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"the number of correct samples must be in [0, n], got c={c}, n={n}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got n={n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (i - k) / i
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_table(results: Mapping[str, Sequence[bool]], ks: Sequence[int]) -> dict[int, float]:
    """Mean pass@k over problems for each k; `results[name]` holds that problem's verdicts, one per sample.

    Problems may have different numbers of samples; every problem needs at least max(ks).
    """
    if not results:
        raise ValueError("pass@k needs at least one problem")
    table = {}
    for k in ks:
        values = []
        for name, samples in results.items():
            if len(samples) < k:
                raise ValueError(f"pass@{k} needs at least {k} samples per problem, "
                                 f"but problem {name!r} has {len(samples)}")
            values.append(pass_at_k(len(samples), sum(bool(s) for s in samples), k))
        table[k] = sum(values) / len(values)
    return table
