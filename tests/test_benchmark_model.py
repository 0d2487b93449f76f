"""`scripts/benchmark.py model`'s turn-taking (`bench.model._run_interleaved`): the two sides' workers, each its own
subprocess, are set up one after the other, then run in alternating order, one timed run each per round, and a
worker that dies is named. Fake workers stand in for the models (the real rows take minutes): each serves through
the benchmark's own `_serve`, sleeps a side-dependent time per run and logs its turn.
"""

import pathlib
import sys
import textwrap

import pytest

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from bench import model  # noqa: E402  (scripts/ is not a package on the path)


def _fake_worker(log: pathlib.Path, side: str, sleep_s: float, exit_before_ready: bool = False) -> list[str]:
  code = textwrap.dedent(f"""
      import json, sys, time
      sys.path.insert(0, {str(SCRIPTS)!r})
      from bench import model
      if {exit_before_ready!r}:
        sys.exit(3)
      print("a library's stray line on stdout", flush=True)
      def run_once():
        with open({str(log)!r}, "a") as f:
          f.write({side!r} + "\\n")
        time.sleep({sleep_s!r})
      model._serve(run_once)
      print(json.dumps({{"side": {side!r}}}))
  """)
  return [sys.executable, "-c", code]


def test_sides_take_turns_first_side_alternating(tmp_path, monkeypatch):
  monkeypatch.setattr(model, "SETTLE_S", 0.0)
  log = tmp_path / "turns.log"
  res = model._run_interleaved({"torch": _fake_worker(log, "torch", 0.3), "jax": _fake_worker(log, "jax", 0.02)},
                               repeats=5)
  assert log.read_text().split() == ["torch", "jax", "jax", "torch", "torch", "jax", "jax", "torch", "torch", "jax"]
  assert res["torch"]["side"] == "torch" and res["jax"]["side"] == "jax"  # each worker's own final JSON
  assert len(res["torch"]["runs_ms"]) == len(res["jax"]["runs_ms"]) == 5
  # Each side's median is of its own runs: the worker's sleep sets it.
  assert 300 <= res["torch"]["ms"] < 3000 and res["jax"]["ms"] < 300


def test_a_worker_that_dies_is_named(tmp_path, monkeypatch):
  monkeypatch.setattr(model, "SETTLE_S", 0.0)
  log = tmp_path / "turns.log"
  with pytest.raises(RuntimeError, match="status 3.*jax's set-up"):
    model._run_interleaved({"torch": _fake_worker(log, "torch", 0.01),
                            "jax": _fake_worker(log, "jax", 0.01, exit_before_ready=True)}, repeats=5)
  assert not log.exists()  # no run was asked for
