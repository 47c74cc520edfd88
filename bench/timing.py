"""Wall-clock time of a jitted call: `time_ms(f, arg_sets)` warms f up, then returns the median over
`groups` of the mean time of back-to-back calls in groups of about `group_ms` (async dispatch keeps
the device busy, so per-call host overhead and clock ramp-up stay out). Every benchmark times so,
except calls long enough (a prefill, a decoding loop, a scoring pass) to be timed one by one
(`wall_s`).
"""
import statistics
import time

import jax


def time_ms(f, arg_sets, group_ms=30.0, groups=7, sync=jax.block_until_ready):
    """Median over `groups` of the mean time of back-to-back calls, alternating input sets.
    sync(out) waits for out (torch: `lambda _: torch.cuda.synchronize()`)."""
    sync(f(*arg_sets[0]))  # compile and warm up
    sync(f(*arg_sets[-1]))
    t = time.perf_counter()
    sync(f(*arg_sets[0]))
    n = max(2, int(group_ms / max((time.perf_counter() - t) * 1e3, 1e-3)))
    means = []
    for _ in range(groups):
        t = time.perf_counter()
        for i in range(n):  # one stream: the last result is ready when all are
            out = f(*arg_sets[i % len(arg_sets)])
        sync(out)
        means.append((time.perf_counter() - t) * 1e3 / n)
    return statistics.median(means)


def wall_s(fn, *args):
    """(fn(*args), the seconds until its result was ready)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start
