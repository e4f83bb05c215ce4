"""Device-time measurement shared by the benchmarks (no paper: measurement method).

JAX gives no device events, so a kernel's device time is measured as the slope of host wall time
between two jitted programs that run the same body `n_lo` and `n_hi` times inside one
`lax.fori_loop`: dispatch, argument transfer and the program's fixed set-up cancel, and host
jitter (tens of microseconds) is divided by `n_hi - n_lo`. Callers pick `n_hi - n_lo` so that the
difference is >= ~10 ms of device work (`loop_counts`). Every point is the median of `trials`
runs after one warm-up run (which also compiles).

The body must carry a data dependency from one iteration to the next (feed an output back into
the next input), otherwise XLA may hoist or drop the repeated work; and the bytes it touches must
not fit in the 60 MB L2 of an H200 (rotate through several weight/input sets inside the body) when
the point is to measure HBM bandwidth.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["median_wall", "loop_seconds", "loop_counts", "copy_bandwidth"]


def median_wall(fn: Callable, *args, trials: int = 5) -> float:
  """Median host seconds of `block_until_ready(fn(*args))` over `trials` runs after a warm-up."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(trials):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def loop_seconds(body: Callable[[Any], Any], carry: Any, *, n_lo: int, n_hi: int,
                 trials: int = 5, consts: tuple = ()) -> float:
  """Device seconds of one `body(carry, *consts) -> carry` call (slope between loop counts).

  Args:
    body: the work of one iteration; must return a carry of the same structure.
    carry: the initial carry.
    n_lo, n_hi: the two loop counts (n_hi > n_lo >= 1); both run in one compiled program whose
      loop count is a traced argument.
    trials: median over this many runs per count.
    consts: extra arguments passed to every call unchanged (e.g. weights), so they are program
      inputs rather than constants baked into the program.
  """
  if not 1 <= n_lo < n_hi:
    raise ValueError(f"need 1 <= n_lo < n_hi, got n_lo={n_lo}, n_hi={n_hi}")
  prog = jax.jit(lambda c, n, *k: jax.lax.fori_loop(0, n, lambda i, x: body(x, *k), c))
  t_lo = median_wall(prog, carry, jnp.int32(n_lo), *consts, trials=trials)
  t_hi = median_wall(prog, carry, jnp.int32(n_hi), *consts, trials=trials)
  return (t_hi - t_lo) / (n_hi - n_lo)


def loop_counts(estimate_s: float, target_s: float = 0.02, n_lo: int = 2,
                most: int = 4096) -> tuple[int, int]:
  """(n_lo, n_hi) so that n_hi - n_lo iterations take ~`target_s` at `estimate_s` each."""
  extra = max(8, min(most, int(target_s / max(estimate_s, 1e-7))))
  return n_lo, n_lo + extra


def copy_bandwidth(trials: int = 7) -> float:
  """Bytes/s of `y = x + 1` over a 1 GiB float32 array (read + write bytes), by `loop_seconds`."""
  n = (1 << 28) if jax.default_backend() == "gpu" else (1 << 20)
  x = jnp.ones((n,), jnp.float32)
  s = loop_seconds(lambda y: y + 1, x, n_lo=2, n_hi=12, trials=trials)
  return 2 * 4 * n / s


def output_path(path: str) -> str:
  """Where a benchmark writes `path`: under $OUT (basename only) when the device tool sets it,
  else `path` itself; its directory is created."""
  if os.environ.get("OUT"):
    path = os.path.join(os.environ["OUT"], os.path.basename(path))
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  return path
