"""The TPU slice compiled for, on a machine without it: libtpu's environment, the slice's abstract devices, the HBM
of its chips, and `Target`, the three together with a Mesh over the devices."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re
import sys
import tempfile

GiB = 1024**3

# HBM per chip by the device_kind JAX reports for it, from Google's Cloud TPU pages: v4 "32 GiB", v5e "16 GB",
# v5p "95 GB", v6e "32 GB" (the pages write GB for GiB: XLA:TPU's own refusal of a program for a v5e reads "exceeds
# available HBM (15.75G)", the 16 GiB less what the runtime keeps). XLA refuses what does not fit its own budget;
# this table is the chip's whole HBM, the ceiling a compiled program's total is checked against.
HBM_BYTES = {
    "TPU v4": 32 * GiB,
    "TPU v5 lite": 16 * GiB,  # v5e
    "TPU v5": 95 * GiB,  # v5p
    "TPU v6 lite": 32 * GiB,  # v6e (Trillium)
}

# Chips that JAX drives as one "megacore" device of two TensorCores; libtpu's default for a topology of them is one
# device per core, which is not what a program on those machines sees.
_MEGACORE = ("v4", "v5p")
# TPU_ACCELERATOR_TYPE names: the slice's generation and its core count (two per v4 / v5p chip).
_ACCELERATOR_PREFIX = {"v4": ("v4", 2), "v5p": ("v5p", 2), "v5e": ("v5litepod", 1), "v6e": ("v6e", 1)}


class AotUnavailable(RuntimeError):
  """Deviceless compilation is refused here: libtpu missing, or a topology it does not know."""


def format_gib(x: float) -> str:
  """Bytes as GiB with two decimals, the unit of every size the reports and refusals print."""
  return f"{x / GiB:.2f} GiB"


def _generation(topology: str) -> str:
  return topology.split(":", 1)[0].lower()


def libtpu_environment(topology: str) -> None:
  """Environment defaults for libtpu on a machine without TPUs, read when libtpu initializes (the first
  `topology_devices` call of the process); values already set are kept.

  TPU_SKIP_MDS_QUERY: do not ask the GCE metadata server (there is none) what this machine is.
  TPU_ACCELERATOR_TYPE, TPU_WORKER_HOSTNAMES, TPU_WORKER_ID: what it would have said, so that libtpu does not log
    that it could not find them.
  ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu takes /tmp/libtpu_lockfile to keep a second process off the chips; with no
    chips to share, a second compiling process (a test worker, another user) must not be refused.
  """
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_WORKER_ID", "0")
  gen, _, shape = topology.partition(":")
  prefix = _ACCELERATOR_PREFIX.get(gen.lower())
  if prefix and re.fullmatch(r"\d+(x\d+)*", shape):
    chips = math.prod(int(d) for d in shape.split("x"))
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{prefix[0]}-{chips * prefix[1]}")


def libtpu_version() -> str | None:
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return None


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: str) -> list:
  """The abstract devices of a TPU slice, e.g. "v5e:2x2" (4 "TPU v5 lite"), "v4:2x2x1" (4 megacore "TPU v4").

  Raises AotUnavailable (one line) when libtpu is not installed or refuses the name.
  """
  if not libtpu_installed():
    raise AotUnavailable(f"cannot compile for TPU topology {topology!r}: libtpu is not installed "
                         "(pip install -e '.[tpu-aot]')")
  from jax.experimental import topologies

  libtpu_environment(topology)
  kwargs = {"chip_config_name": "megacore"} if _generation(topology) in _MEGACORE else {}
  with _libtpu_stderr() as held:
    try:
      desc = topologies.get_topology_desc(topology, "tpu", **kwargs)
    except (RuntimeError, ValueError) as e:  # libtpu: a JaxRuntimeError with a multi-line status
      held["drop"] = True  # its log lines say the same at length; the refusal is one line
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise AotUnavailable(f"cannot compile for TPU topology {topology!r} here: {first}") from None
  return list(desc.devices)


# libtpu's complaints, on a machine that is not a TPU VM, about what the metadata server would have told it.
_METADATA_NOISE = re.compile(r"could not determine TPU|host bounds for accelerator type|metadata", re.IGNORECASE)


@contextlib.contextmanager
def _libtpu_stderr():
  """Holds what libtpu writes to the stderr file descriptor (from C++, past Python's sys.stderr) while it
  initializes, then writes it out less its metadata-server noise, or drops it all when the caller sets
  held["drop"] (a refusal that says the same in one line)."""
  held = {"drop": False}
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield held
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      text = tmp.read().decode(errors="replace")
  if not held["drop"]:
    keep = [line for line in text.splitlines() if line.strip() and not _METADATA_NOISE.search(line)]
    if keep:
      print("\n".join(keep), file=sys.stderr)


def hbm_bytes(device_kind: str) -> int:
  try:
    return HBM_BYTES[device_kind]
  except KeyError:
    raise AotUnavailable(f"no HBM size known for {device_kind!r}; add it to mrcnn_jax.aot.HBM_BYTES") from None


@dataclasses.dataclass
class Target:
  """The topology compiled for: its devices, their kind, HBM per device and the mesh over them."""

  topology: str
  devices: list
  device_kind: str
  hbm: int
  mesh: object
  hbm_name: str = ""

  @classmethod
  def make(cls, topology: str, *, hbm_gib: float | None = None) -> Target:
    """`hbm_gib`, when given, is the budget per chip to fit in instead of the chip's whole HBM (to keep room for
    another program, or to plan for a smaller chip)."""
    from mrcnn_jax import train

    if hbm_gib is not None and not hbm_gib > 0:
      raise ValueError(f"--hbm_gib must be positive, got {hbm_gib}")
    devices = topology_devices(topology)
    kind = devices[0].device_kind
    if hbm_gib is None:
      return cls(topology, devices, kind, hbm_bytes(kind), train.make_mesh(devices))
    hbm = int(hbm_gib * GiB)
    return cls(topology, devices, kind, hbm, train.make_mesh(devices),
               f"the {format_gib(hbm)} budget per chip (--hbm_gib; {kind} has {format_gib(hbm_bytes(kind))})")

  @property
  def hbm_description(self) -> str:
    return self.hbm_name or f"{self.device_kind}'s {format_gib(self.hbm)} HBM"

  @property
  def num_devices(self) -> int:
    return len(self.devices)
