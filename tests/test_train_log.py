"""The trainer's console line, JSON-lines metrics and TensorBoard events (read back with TensorBoard's own reader)."""

import json
import time

import pytest

from mrcnn_jax import train_log


def test_line_reads_like_detectron2():
  line = train_log.format_line(40, 200, {"total_loss": 1.5, "loss_cls": 0.25, "loss_mask": 0.5, "lr": 0.01},
                               seconds_per_iter=0.5, data_seconds=0.003)
  # 160 iterations left at 0.5 s each: 80 s.
  assert line.startswith("eta: 0:01:20  iter: 40/200  total_loss: 1.5  loss_cls: 0.25  loss_mask: 0.5")
  assert "time: 0.5000" in line and "data_time: 0.0030" in line and "lr: 0.01" in line and "max_mem: " in line


def test_jsonl_appends_across_writers(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with train_log.JsonlWriter(path) as w:
    w.write(1, {"total_loss": 2.0})
  with train_log.JsonlWriter(path) as w:  # a resumed run appends
    w.write(2, {"total_loss": 1.0, "lr": 0.1})
  lines = [json.loads(x) for x in path.read_text().splitlines()]
  assert lines == [{"iteration": 1, "total_loss": 2.0}, {"iteration": 2, "total_loss": 1.0, "lr": 0.1}]


def test_resumed_jsonl_writer_drops_the_lines_a_killed_run_wrote_past_the_checkpoint(tmp_path):
  # A run logs steps 1..5 and is killed mid-line; it resumes from its checkpoint of step 3 and logs 4..6 again.
  path = tmp_path / "metrics.jsonl"
  with train_log.JsonlWriter(path) as w:
    for step in range(1, 6):
      w.write(step, {"total_loss": float(step)})
  with open(path, "a") as f:
    f.write('{"iteration": 6, "total_lo')  # kill -9 during a write
  with train_log.JsonlWriter(path, start_step=3) as w:
    for step in range(4, 7):
      w.write(step, {"total_loss": 10.0 * step})
  lines = [json.loads(x) for x in path.read_text().splitlines()]
  assert [(x["iteration"], x["total_loss"]) for x in lines] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0),
                                                                (6, 60.0)]
  # A fresh run in the same workdir (no checkpoint yet: step 0) starts the file again.
  with train_log.MetricWriters.for_workdir(tmp_path, start_step=0) as w:
    w.write(1, {"total_loss": 0.5})
  assert path.read_text().splitlines() == ['{"iteration": 1, "total_loss": 0.5}']


def _scalars(logdir):
  """{tag: [(step, value), ...]} as TensorBoard reads `logdir` (restarts purged as it purges them)."""
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_read_back(tmp_path):
  with train_log.TensorBoardWriter(tmp_path / "tb") as w:
    w.write(1, {"total_loss": 2.0, "lr": 0.25})
    w.write(2, {"total_loss": 1.5, "lr": 0.5})
  assert _scalars(tmp_path / "tb") == {"total_loss": [(1, 2.0), (2, 1.5)], "lr": [(1, 0.25), (2, 0.5)]}


def test_resumed_tensorboard_writer_replaces_the_orphaned_steps(tmp_path):
  # A run logs steps 1..5, is killed, and resumes from its checkpoint of step 3: TensorBoard must show 4 and 5 once,
  # with the resumed run's values.
  with train_log.TensorBoardWriter(tmp_path / "tb") as w:
    for step in range(1, 6):
      w.write(step, {"total_loss": float(step)})
  time.sleep(1.1)  # event file names start with the second they were opened; TensorBoard reads them in name order
  with train_log.TensorBoardWriter(tmp_path / "tb", start_step=3) as w:
    for step in range(4, 7):
      w.write(step, {"total_loss": 10.0 * step})
  assert len(list((tmp_path / "tb").iterdir())) == 2
  assert _scalars(tmp_path / "tb") == {"total_loss": [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0),
                                                      (6, 60.0)]}


def test_metric_writers_write_jsonl_and_tensorboard(tmp_path):
  with train_log.MetricWriters.for_workdir(tmp_path) as w:
    w.write(7, {"total_loss": 0.5, "time": 0.25})
  assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"iteration": 7, "total_loss": 0.5, "time": 0.25}
  assert _scalars(tmp_path / "tensorboard") == {"total_loss": [(7, 0.5)], "time": [(7, 0.25)]}


def test_metric_writers_close_every_writer_when_one_fails():
  closed = []

  class Writer:
    def __init__(self, name, fail):
      self.name, self.fail = name, fail

    def write(self, step, metrics):
      pass

    def close(self):
      closed.append(self.name)
      if self.fail:
        raise OSError(f"{self.name} failed")

  with pytest.raises(OSError, match="a failed"):
    train_log.MetricWriters([Writer("a", True), Writer("b", False)]).close()
  assert closed == ["a", "b"]
