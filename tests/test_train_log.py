"""The trainer's console line and JSON-lines metrics."""

import json

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
