"""What the trainer prints and writes: Detectron2-style console lines and metrics as JSON lines.

A console line reads like Detectron2's, so its users can read it at a glance:
  eta: 0:01:23  iter: 40/200  total_loss: 1.234  loss_cls: 0.4  ...  time: 0.512  data_time: 0.003  lr: 0.01
The same numbers go to `<workdir>/metrics.jsonl`, one JSON object per line, appended (a resumed run continues the
file) and flushed at every write so that nothing is lost when a run is killed.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import resource

LOSS_ORDER = ("total_loss", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask", "loss_keypoint")


def peak_memory_mb() -> float:
  """Peak resident memory of this process in MB (host memory; on accelerators the device memory is apart)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def format_line(step: int, max_iter: int, metrics: dict, *, seconds_per_iter: float, data_seconds: float) -> str:
  """One Detectron2-style progress line. metrics: name -> float (losses, lr, ...)."""
  eta = datetime.timedelta(seconds=int(max(max_iter - step, 0) * seconds_per_iter))
  parts = [f"eta: {eta}", f"iter: {step}/{max_iter}"]
  parts += [f"{k}: {metrics[k]:.4g}" for k in LOSS_ORDER if k in metrics]
  parts += [f"{k}: {v:.4g}" for k, v in sorted(metrics.items()) if k not in LOSS_ORDER and k != "lr"]
  parts += [f"time: {seconds_per_iter:.4f}", f"data_time: {data_seconds:.4f}"]
  if "lr" in metrics:
    parts.append(f"lr: {metrics['lr']:.5g}")
  parts.append(f"max_mem: {peak_memory_mb():.0f}M")
  return "  ".join(parts)


class JsonlWriter:
  """Appends one JSON object per call to a file, flushed and fsynced, so a killed run keeps every line written."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = open(self.path, "a", encoding="utf-8")

  def write(self, step: int, metrics: dict) -> None:
    record = {"iteration": int(step)} | {k: float(v) for k, v in metrics.items()}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self) -> None:
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
