"""What the trainer prints and writes: Detectron2-style console lines, metrics as JSON lines and TensorBoard events.

A console line reads like Detectron2's, so its users can read it at a glance:
  eta: 0:01:23  iter: 40/200  total_loss: 1.234  loss_cls: 0.4  ...  time: 0.512  data_time: 0.003  lr: 0.01
The same numbers go to `<workdir>/metrics.jsonl`, one JSON object per line, appended (a resumed run continues the
file), and to TensorBoard event files in `<workdir>/tensorboard` (one scalar series per metric, tagged with the same
names), each flushed at every write so that nothing is lost when a run is killed. `MetricWriters.for_workdir` opens
both; the event files are written with the `tensorboard` package's own event writer, so TensorFlow is not needed.

A run killed after its last checkpoint (kill -9, a lost machine) has logged steps that its resumption replays: each
writer opened with the resumed step drops them (metrics.jsonl: its lines past that step are removed when it opens;
TensorBoard: a restart marker makes the reader purge them), so every step appears once, with the values of the run
that continued.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import resource
import time

from mrcnn_jax import atomic

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


class JsonlWriter(contextlib.AbstractContextManager):
  """Appends one JSON object per call to a file, flushed and fsynced, so a killed run keeps every line written.

  start_step: the step a resumed run continues from (its checkpoint's). Lines of an existing file whose
  "iteration" is past it were logged by a run killed after that checkpoint; the resumed run logs those steps again,
  so they are removed when the writer opens (the file rewritten atomically), as is a last line cut short by the
  kill. None keeps the file as it is.
  """

  def __init__(self, path, *, start_step: int | None = None):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if start_step is not None and self.path.exists():
      _drop_lines_after(self.path, int(start_step))
    self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the writer's life, see close)

  def write(self, step: int, metrics: dict) -> None:
    record = {"iteration": int(step)} | {k: float(v) for k, v in metrics.items()}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self) -> None:
    self._file.close()

  def __exit__(self, *exc):
    self.close()


def _drop_lines_after(path: pathlib.Path, step: int) -> None:
  """Rewrite the JSON-lines file `path` without its records of iterations past `step` (and without lines that do not
  parse: the partial last line of a killed write); untouched when there are none."""
  lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
      keep = isinstance(record, dict) and int(record.get("iteration", 0)) <= step
    except (ValueError, TypeError):
      keep = False
    if keep:
      kept.append(line if line.endswith("\n") else line + "\n")
  if kept != lines:
    atomic.write_file(path, lambda f: f.write("".join(kept)))


class TensorBoardWriter(contextlib.AbstractContextManager):
  """Writes each metric as a TensorBoard scalar (tag = the metric's name, step = the iteration) to event files.

  Every writer opens a new event file in `logdir` (a resumed run adds one beside the earlier run's) and starts it
  with a SessionLog START at the first step it can log, start_step + 1 (`start_step`: the updates already applied,
  the checkpoint's step): TensorBoard then drops the points of steps above `start_step` that a killed run wrote
  after its last checkpoint, instead of drawing the replayed steps twice.
  """

  def __init__(self, logdir, *, start_step: int = 0):
    # Imported here: only the trainer's process 0 writes events, and importing train_log should stay cheap.
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    self.logdir = pathlib.Path(logdir)
    self.logdir.mkdir(parents=True, exist_ok=True)
    self._writer = EventFileWriter(str(self.logdir))
    # TensorBoard purges the points at and after a START's step.
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(start_step) + 1,
                                           session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    self._writer.flush()

  def write(self, step: int, metrics: dict) -> None:
    # simple_value scalars: the summary form that every TensorBoard release and reader (EventAccumulator.Scalars)
    # understands without a plugin.
    values = [self._summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]
    self._writer.add_event(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                                 summary=self._summary_pb2.Summary(value=values)))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()

  def __exit__(self, *exc):
    self.close()


class MetricWriters(contextlib.AbstractContextManager):
  """Fans each `write(step, metrics)` out to several writers (JsonlWriter, TensorBoardWriter, anything with write and
  close); `close` closes them all, in order, even when one of them fails, and then raises."""

  def __init__(self, writers):
    self.writers = list(writers)

  @classmethod
  def for_workdir(cls, workdir, *, start_step: int = 0) -> MetricWriters:
    """The trainer's writers: `<workdir>/metrics.jsonl` and TensorBoard events in `<workdir>/tensorboard`.

    start_step: the step the run starts (or resumes) from: both drop what a killed run logged past it (see
      `JsonlWriter`, `TensorBoardWriter`).
    """
    workdir = pathlib.Path(workdir)
    jsonl = JsonlWriter(workdir / "metrics.jsonl", start_step=start_step)
    try:
      return cls([jsonl, TensorBoardWriter(workdir / "tensorboard", start_step=start_step)])
    except BaseException:
      jsonl.close()
      raise

  def write(self, step: int, metrics: dict) -> None:
    for w in self.writers:
      w.write(step, metrics)

  def close(self) -> None:
    # An ExitStack runs every close even when one raises: the other writers may still hold lines to write.
    with contextlib.ExitStack() as stack:
      for w in reversed(self.writers):  # callbacks run last in, first out
        stack.callback(w.close)

  def __exit__(self, *exc):
    self.close()
