"""What the benchmark groups share: the table's Row, the timing helpers, the paths of the checkout and the CLI."""

from __future__ import annotations

import dataclasses
import pathlib
import resource
import statistics
import time
from collections.abc import Callable

REPO = pathlib.Path(__file__).resolve().parents[2]
# The command line the groups start their subprocesses through (`benchmark.py GROUP --only SIDE ...`).
SCRIPT = REPO / "scripts" / "benchmark.py"


@dataclasses.dataclass
class Row:
  name: str
  jax_ms: float
  torch_ms: float | None
  compile_s: float
  note: str = ""

  @property
  def ratio(self) -> float | None:
    return None if self.torch_ms is None else self.jax_ms / self.torch_ms


def median_ms(fn: Callable[[], object], repeats: int) -> float:
  """The median wall time of `repeats` calls of fn, in ms (fn must block until its work is done)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def compile_warm(jitted, args) -> tuple[Callable[[], object], float]:
  """(a call of the compiled program on args that blocks until done, compile s) of a jitted function, after one
  warm-up run; compile time is lower + compile, apart from any run."""
  import jax  # here, not at the top: the torch workers import this module and stay free of JAX

  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - start
  run = lambda: jax.block_until_ready(compiled(*args))  # noqa: E731
  run()  # one warm-up run
  return run, compile_s


def time_jax(jitted, args, repeats: int) -> tuple[float, float]:
  """(median warm ms, compile s) of a jitted function (`compile_warm`)."""
  run, compile_s = compile_warm(jitted, args)
  return median_ms(run, repeats), compile_s


def time_torch(fn: Callable[[], object], repeats: int) -> float:
  fn()  # warm-up
  return median_ms(fn, repeats)


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux
