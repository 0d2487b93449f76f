"""What the command lines share (`python -m mrcnn_jax.main`, `.evaluate`, `.predict`, `.export`).

Errors: a command that fails prints one line on stderr, "<program>: error: <message>" (the message names the file
or the config key), and exits with status 1; the Python traceback is for developers, shown with --debug or with
the environment variable MRCNN_JAX_DEBUG=1. Flag errors stay absl's (a line naming the flag, status 1).

Configs of checkpoints: `config_for_checkpoint` gives the config a command runs a checkpoint with: the one saved
with it when --config is left out, else --config checked against it (`checkpoint.inference_config`), the
--config.model.* overrides typed on the command line being the user's explicit choices.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app, flags

DEBUG_ENV = "MRCNN_JAX_DEBUG"
# Exceptions whose message says it all; others get their type name in front ("AttributeError: ...").
_SELF_EXPLAINED = (ValueError, OSError, RuntimeError, ArithmeticError, KeyError)


def define_debug_flag(flag_values=flags.FLAGS) -> None:
  """--debug: show the traceback of an error instead of one line."""
  flags.DEFINE_bool("debug", False, f"On an error, show the Python traceback instead of one line (also "
                    f"{DEBUG_ENV}=1).", flag_values=flag_values)


def define_checkpoint_flags(config_default: str = "the config saved with the checkpoint") -> None:
  """The flags of the commands that run a checkpoint (evaluate, predict, export): --config, optional (checked
  against the checkpoint's own by `config_for_checkpoint`; `config_default` says what stands in for it), --checkpoint
  and --debug."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flags.DEFINE_config_file("config", None, f"Config file: configs/FILE.py[:arg]; default: {config_default}.",
                                  lock_config=True)
  flags.DEFINE_string("checkpoint", None, "A variables checkpoint (converted weights, an export), a training "
                      "workdir, its checkpoints/ directory or one step directory "
                      "(mrcnn_jax.checkpoint.load_inference).")
  define_debug_flag()


def debug_enabled() -> bool:
  """--debug was given, or MRCNN_JAX_DEBUG is set to 1 (or true, yes)."""
  if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes"):
    return True
  try:
    return bool(flags.FLAGS["debug"].value)
  except KeyError:
    return False


def error_line(program: str, error: BaseException) -> str:
  """The one line an error prints: "<program>: error: <message>", the message's own lines joined."""
  message = error.args[0] if isinstance(error, KeyError) and error.args else error
  text = " ".join(line.strip() for line in str(message).splitlines() if line.strip()) or type(error).__name__
  if not isinstance(error, _SELF_EXPLAINED):
    text = f"{type(error).__name__}: {text}"
  return f"{program}: error: {text}"


def guarded(program: str, main: Callable[[list[str]], int | None]) -> Callable[[list[str]], int | None]:
  """`main` whose exceptions end the program with `error_line` on stderr and status 1 (see the module docstring).
  absl's UsageError, SystemExit and KeyboardInterrupt pass through."""
  def wrapped(argv):
    try:
      return main(argv)
    except app.UsageError:
      raise
    except Exception as e:  # every error a user can cause ends here
      if debug_enabled():
        raise
      sys.stdout.flush()
      print(f"{error_line(program, e)} (--debug shows the traceback)", file=sys.stderr, flush=True)
      return 1
  return wrapped


def run(program: str, main: Callable[[list[str]], int | None]) -> None:
  """`absl.app.run` of `guarded(program, main)`: the exit status is main's return value (0 for None), 1 on error."""
  app.run(guarded(program, main))


def explicit_model_overrides(flag_name: str = "config") -> set[str]:
  """The config fields given as --config.model.* overrides on the command line ("model.num_classes", ...)."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  holder = flags.FLAGS[flag_name]
  if holder.value is None:
    return set()
  return {k for k in config_flags.get_override_values(holder) if k.startswith("model.")}


def config_for_checkpoint(checkpoint_path, saved: dict | None, flag_name: str = "config"):
  """The config to run the checkpoint at `checkpoint_path` with (`saved`: the config saved with it, as
  `checkpoint.load_inference` or `load_saved_config` return it): --config checked against it, or the saved one when
  --config is left out. Raises ValueError naming the differing model fields, or asking for --config when the
  checkpoint has none."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  from mrcnn_jax import checkpoint  # pylint: disable=import-outside-toplevel

  config = flags.FLAGS[flag_name].value
  given = "--config"
  if config is not None:
    given = f"--config={config_flags.get_config_filename(flags.FLAGS[flag_name])}"
  return checkpoint.inference_config(saved, config, explicit=explicit_model_overrides(flag_name),
                                     where=f"checkpoint {checkpoint_path}", given=given)
