"""Every command line's errors: one line on stderr naming the file or key, exit status 1, no traceback; --debug (or
MRCNN_JAX_DEBUG=1) shows the traceback. The commands run side by side in fresh interpreters (each only imports and
fails: no model is built)."""

import pathlib
import subprocess
import sys

from mrcnn_jax import cli
from conftest import command_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "mask_rcnn_R50_FPN_1x.py"
ENV = command_env()


def _commands(tmp_path):
  """program -> (command line, what its one error line must name)."""
  missing = tmp_path / "no_such_checkpoint"
  return {
      "mrcnn_jax.main": ([sys.executable, "-m", "mrcnn_jax.main", f"--config={BASE_CONFIG}",
                          f"--workdir={tmp_path / 'w'}", f"--config.dataset.train_json={tmp_path / 'none.json'}",
                          f"--config.dataset.train_image_dir={tmp_path}"], str(tmp_path / "none.json")),
      "mrcnn_jax.evaluate": ([sys.executable, "-m", "mrcnn_jax.evaluate", f"--checkpoint={missing}"], str(missing)),
      "mrcnn_jax.predict": ([sys.executable, "-m", "mrcnn_jax.predict", f"--checkpoint={missing}",
                             "--images", "a.png", f"--out={tmp_path / 'out'}"], str(missing)),
      "mrcnn_jax.export": ([sys.executable, "-m", "mrcnn_jax.export", f"--checkpoint={missing}",
                            f"--out={tmp_path / 'export'}"], str(missing)),
      "convert_weights": ([sys.executable, str(ROOT / "scripts" / "convert_weights.py"), "--from", "torchvision",
                           str(tmp_path / "none.pth"), "--out", str(tmp_path / "converted")],
                          str(tmp_path / "none.pth")),
  }


def _run_all(commands, env=None):
  """Start every command at once, then wait for all: {program: (returncode, stderr)}."""
  running = {name: subprocess.Popen(argv, cwd=ROOT.parent, env={**ENV, **(env or {})},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (argv, _) in commands.items()}
  done = {}
  for name, process in running.items():
    _, stderr = process.communicate(timeout=300)
    done[name] = (process.returncode, stderr)
  return done


def test_each_command_fails_in_one_line_naming_the_file(tmp_path):
  commands = _commands(tmp_path)
  for name, (returncode, stderr) in _run_all(commands).items():
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert returncode == 1, (name, stderr)
    assert "Traceback" not in stderr, (name, stderr)
    assert len(errors) == 1 and errors[0].startswith(f"{name}: error: "), (name, stderr)
    assert commands[name][1] in errors[0], (name, errors[0])
  assert not (tmp_path / "out").exists() and not (tmp_path / "converted").exists()


def test_debug_shows_the_traceback(tmp_path):
  """--debug on one command, MRCNN_JAX_DEBUG=1 (for the whole environment) on the other."""
  commands = _commands(tmp_path)
  flagged = {"mrcnn_jax.predict": (commands["mrcnn_jax.predict"][0] + ["--debug"], commands["mrcnn_jax.predict"][1])}
  done = _run_all(flagged)
  done.update(_run_all({"convert_weights": commands["convert_weights"]}, env={cli.DEBUG_ENV: "1"}))
  for name, (returncode, stderr) in done.items():
    assert returncode != 0 and "Traceback (most recent call last)" in stderr, (name, stderr)
    assert "FileNotFoundError" in stderr and commands[name][1] in stderr


def test_error_line_names_the_type_only_where_the_message_needs_it():
  assert cli.error_line("p", FileNotFoundError("no file x")) == "p: error: no file x"
  assert cli.error_line("p", KeyError("the key 'a' is missing")) == "p: error: the key 'a' is missing"
  assert cli.error_line("p", ValueError("two\n  lines")) == "p: error: two lines"
  assert cli.error_line("p", AttributeError("'Key \"x\" does not exist'")) == (
      "p: error: AttributeError: 'Key \"x\" does not exist'")
