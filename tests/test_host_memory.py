"""`host_memory`: with freed memory kept, a jitted program's large buffers stop page-faulting on every run."""

import json
import pathlib
import subprocess
import sys

import pytest

from mrcnn_jax import host_memory

# A program whose temporaries (6 x 16 MB) are far above glibc's 32 MB mmap ceiling once summed: XLA:CPU allocates
# them as one buffer per run. The child prints the fewest minor page faults of five runs: with reuse, the first
# runs may still grow the heap around the compiler's leftovers; once it has settled, a run faults no page in.
_CHILD = r"""
import json, resource, sys
from mrcnn_jax import host_memory
applied = host_memory.configure(sys.argv[1])
import jax, jax.numpy as jnp

@jax.jit
def f(x):
  ys = [x]
  for _ in range(6):  # matmul outputs are materialized: 6 live (2048, 2048) float32 temporaries
    ys.append(jnp.tanh(ys[-1] @ x))
  return sum(jnp.sum(y[::97]) for y in ys)

x = jnp.full((2048, 2048), 1e-3, jnp.float32)
jax.block_until_ready(f(x))  # compile
faults = []
for _ in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": min(faults)}))
"""


def _faults(choice: str, tmp_path: pathlib.Path) -> dict:
  proc = subprocess.run([sys.executable, "-c", _CHILD, choice], capture_output=True, text=True, cwd=tmp_path,
                        check=False, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _thp_always() -> bool:
  try:
    return "[always]" in pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
  except OSError:
    return False


@pytest.mark.skipif(not host_memory.supported(), reason="glibc only")
@pytest.mark.skipif(_thp_always(), reason="with transparent huge pages always on, fresh mmaps fault per 2 MB")
def test_reuse_stops_page_faults_of_repeated_runs(tmp_path):
  system = _faults("system", tmp_path)
  reuse = _faults("reuse", tmp_path)
  assert (system["applied"], reuse["applied"]) == (False, True)
  # glibc's default maps the run's buffers afresh: about one fault per 4 KB page of them (~8,000 for 32 MB).
  assert system["faults"] > 4000, system
  assert reuse["faults"] * 10 < system["faults"], (reuse, system)


def test_configure_rejects_unknown_choice():
  with pytest.raises(ValueError, match="host_malloc must be one of"):
    host_memory.configure("jemalloc")


def test_main_accepts_host_malloc_flag(tmp_path):
  """The flag is defined (a typo'd value is refused by absl before anything runs)."""
  proc = subprocess.run([sys.executable, "-m", "mrcnn_jax.main", "--host_malloc=bogus", "--config=x.py",
                         f"--workdir={tmp_path}"], capture_output=True, text=True, cwd=tmp_path, check=False,
                        timeout=120)
  assert proc.returncode != 0
  assert "host_malloc" in proc.stderr and "bogus" in proc.stderr
