"""Every accuracy with its 95 % interval: one run on n photos (Wilson), several runs, and the paired
difference of two models scored on the same photos (bootstrap over photos and runs).

An accuracy measured on 100 photos is uncertain by about +-10 points (95 %); two models scored on
the same photos are compared photo by photo, which is far more precise than comparing two
independent intervals. Correctness vectors are strings or lists of 0/1, one per photo, in one order.
"""
import math

import numpy as np

Z95 = 1.959964


def wilson(correct, n, z=Z95):
    """95 % Wilson score interval (lo, hi) of a proportion, in [0, 1]; good at 0 and n as well."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bits(vector):
    """A correctness vector ("0110..." or 0/1 numbers) as a list of ints."""
    return [int(c) for c in vector] if isinstance(vector, str) else [int(v) for v in vector]


def bootstrap(runs_a, runs_b=None, reps=4000, seed=0):
    """Mean accuracy (%) over runs, or with `runs_b` the paired mean difference a - b (points), with a
    95 % percentile bootstrap interval. Each run is a correctness vector; run i of a and run i of b were
    scored on the same photos. Each replicate draws runs with replacement, then photos with replacement
    within each drawn run (the same photos for a and b): the interval covers both the noise of the photos
    and the spread between runs (seeds, class subsets). With one run it is the interval over photos."""
    runs_a = [np.array(bits(r), dtype=float) for r in runs_a]
    if runs_b is not None:
        runs_b = [np.array(bits(r), dtype=float) for r in runs_b]
        if [len(r) for r in runs_a] != [len(r) for r in runs_b]:
            raise ValueError("paired runs must be scored on the same photos")
        runs_a = [a - b for a, b in zip(runs_a, runs_b)]
    point = 100 * float(np.mean([r.mean() for r in runs_a]))
    rng = np.random.default_rng(seed)
    stats = np.empty(reps)
    for i in range(reps):
        chosen = rng.integers(len(runs_a), size=len(runs_a)) if len(runs_a) > 1 else [0]
        stats[i] = np.mean([runs_a[k][rng.integers(len(runs_a[k]), size=len(runs_a[k]))].mean() for k in chosen])
    lo, hi = np.percentile(100 * stats, [2.5, 97.5])
    return point, float(lo), float(hi)


def macro_recall(per_class, z=Z95):
    """Macro recall (mean over classes of the share of each class's photos classified right), in [0, 1],
    with its 95 % interval (lo, hi). `per_class`: one correctness vector per class present.

    The interval is Price and Bonett's adjusted Wald interval for a linear combination of binomial
    proportions (Computational Statistics & Data Analysis 45, 2004): each of the m classes gets 2/m
    successes and 4/m trials added before the normal interval is taken. It keeps its coverage with a
    few photos per class and never collapses to a point: a bootstrap over photos, or a plain Wald
    interval, says "100.0-100.0 %" when every one of 9 photos is right."""
    counts = [(sum(bits(c)), len(c)) for c in per_class if len(c)]
    m = len(counts)
    adjusted = [((k + 2 / m) / (n + 4 / m), n + 4 / m) for k, n in counts]
    centre = sum(p for p, _ in adjusted) / m
    half = z * math.sqrt(sum(p * (1 - p) / n for p, n in adjusted)) / m
    return sum(k / n for k, n in counts) / m, max(0.0, centre - half), min(1.0, centre + half)


def describe(point, lo, hi, unit="%"):
    """'62.0 % (95 % CI 52.2 to 70.9)'"""
    return f"{point:.1f}{' ' + unit if unit else ''} (95 % CI {lo:.1f} to {hi:.1f})"


# 97.5 % quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def over_runs(values):
    """Mean of per-run values (each run's accuracy, or its paired difference, in points) with a 95 % t
    interval over the runs: the runs (seeds, class draws) are the units, each already averaged over its
    photos. With one run: no interval (nan)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = (T975[n - 2] if n - 1 <= len(T975) else Z95) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def describe_runs(values, signed=False):
    """'+2.3 (95 % CI -3.8 to +8.3, t over 4 runs, under 5: rough; per run +7.0, -2.0, +3.0, +1.0)'.

    Runs that all agree give no interval (a t interval of width 0 would claim certainty a few runs cannot
    give); an interval is kept within what the figure can be: 0-100 for an accuracy, -100 to +100 for a
    difference of two (signed)."""
    mean, lo, hi = over_runs(values)
    f = "{:+.1f}" if signed else "{:.1f}"
    floor = -100.0 if signed else 0.0
    rough = ", under 5: rough" if len(values) < 5 else ""
    if len(values) < 2:
        ci = "one run: no interval over runs"
    elif max(values) == min(values):
        ci = f"all {len(values)} runs equal: no interval over runs"
    else:
        ci = f"95 % CI {f.format(max(lo, floor))} to {f.format(min(hi, 100.0))}, t over {len(values)} runs{rough}"
    return f"{f.format(mean)} ({ci}; per run {', '.join(f.format(v) for v in values)})"


def photos_only(correct, n):
    """'62.0 % (95 % CI 52.2 to 70.9, photos only, one run)': the Wilson interval of one run's accuracy."""
    lo, hi = wilson(correct, n)
    return f"{100 * correct / n:.1f} % (95 % CI {100 * lo:.1f} to {100 * hi:.1f}, photos only, one run)"
