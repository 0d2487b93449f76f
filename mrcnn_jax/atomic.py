"""Atomic file writes: readers see the old file or the new one, never a partial one.

The content goes to a uniquely named temporary file in the destination's folder (opened with "x", not mkstemp, whose
files are private 0600: the result gets the permissions the umask gives any new file), is flushed to disk, then
renamed over the destination with os.replace. A failure removes the temporary file and leaves the destination as it
was.
"""

from __future__ import annotations

import json
import os
import pathlib
import uuid
from collections.abc import Callable
from typing import IO, Any


def write_file(path, write: Callable[[IO], Any], *, binary: bool = False) -> pathlib.Path:
  """Calls `write(f)` on a temporary file beside `path`, then moves it to `path`. Returns the path."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  try:
    with open(tmp, "xb" if binary else "x") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return path


def write_json(path, obj) -> pathlib.Path:
  """json.dump `obj` to `path` atomically, creating the folder if needed. Returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  return write_file(path, lambda f: json.dump(obj, f))
