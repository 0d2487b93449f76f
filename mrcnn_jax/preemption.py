"""Preemption: SIGTERM (what cluster schedulers and TPU maintenance send before killing a job) becomes a flag.

The trainer polls the flag between steps (`PreemptionHandler.sync_requested`, a collective, so that every process
stops at the same step), then saves a checkpoint of the step reached and stops cleanly. The handler itself only
records the signal: Python runs it between two bytecodes of whatever the main thread is doing.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


class PreemptionHandler(contextlib.AbstractContextManager):
  """Installed by `install_preemption_handler`; `requested` turns True when one of its signals arrives."""

  def __init__(self, callback=None, signals=(signal.SIGTERM,)):
    self._callback = callback
    self._event = threading.Event()
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}
    for signum in signals:
      self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    del frame
    # Python runs this in the main thread between two bytecodes, maybe in the middle of a step or a save, which is
    # why it only records the request: the trainer saves at the next step boundary.
    self.signum = signum
    self._event.set()
    log.warning("received %s: the trainer will save a checkpoint and stop", signal.Signals(signum).name)
    if self._callback is not None:
      try:
        self._callback()
      except Exception:  # an exception here would surface at an arbitrary line of the interrupted code
        log.exception("preemption callback failed")

  @property
  def requested(self) -> bool:
    """True once a signal has arrived (on this process)."""
    return self._event.is_set()

  def sync_requested(self) -> bool:
    """True if any process received a signal: a collective, so every process must call it at the same steps (so
    that all of them save the same step and stop together)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.asarray(flags).any())

  def uninstall(self) -> None:
    """Put the previous handlers back (the default action where the previous one was not installed from Python)."""
    for signum, previous in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous = {}

  def __exit__(self, *exc):
    self.uninstall()


def install_preemption_handler(callback=None, *, signals=(signal.SIGTERM,)) -> PreemptionHandler:
  """Catch SIGTERM (what cluster schedulers and TPU maintenance send before killing a job) instead of dying.

  Args:
    callback: called with no arguments when the signal arrives, in the signal handler: it must be quick and must
      not save (set a flag, log); the trainer polls `handler.requested` between steps, saves with `force=True`,
      waits for the save and exits.
    signals: the signals to catch.

  Returns:
    The handler: `.requested`, `.sync_requested()` and `.uninstall()` (also a context manager) to restore the
    previous handlers. Must be called from the main thread (a Python restriction on signal handlers).
  """
  return PreemptionHandler(callback, tuple(signals))
