"""Atomic file and directory writes: readers see the old file (or directory) or the new one, never a partial one.

A file's content goes to a uniquely named temporary file in the destination's folder (opened with "x", not mkstemp,
whose files are private 0600: the result gets the permissions the umask gives any new file), is flushed to disk,
then renamed over the destination with os.replace. A failure removes the temporary file and leaves the destination
as it was.

A directory (`write_dir`) is written into a hidden temporary sibling, `.NAME.tmp-*`, created with mkdir (so again
with the umask's permissions), and renamed to NAME once complete. A directory cannot be renamed over a non-empty one,
so an existing NAME is first renamed aside to `.NAME.old-*`, and deleted only once the new one is in place; if the
second rename fails, the old one is renamed back. Between the two renames NAME is briefly absent; a process killed
there (kill -9) leaves the old one as `.NAME.old-*`, and one killed while writing leaves a `.NAME.tmp-*`: hidden
siblings that can be deleted.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
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


def write_json(path, obj, *, indent: int | None = None) -> pathlib.Path:
  """json.dump `obj` (with `indent`) to `path` atomically, creating the folder if needed. Returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  return write_file(path, lambda f: json.dump(obj, f, indent=indent))


def write_dir(path, write: Callable[[pathlib.Path], Any], *,
              replace: bool | Callable[[pathlib.Path], bool] = True) -> bool:
  """Calls `write(tmp)` on a new empty directory beside `path`, then renames it to `path`, creating the parent
  folder if needed.

  replace: what becomes of a `path` that exists once `write` has returned: True replaces it (a file or a directory,
  empty or not; the old one is put back if the new one cannot be renamed in); False keeps it and discards the new
  directory; a function of the path decides then. A failure anywhere removes the temporary directory and leaves
  `path` as it was.

  Returns whether the new directory is now at `path`.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
  tmp.mkdir()
  try:
    write(tmp)
    if not os.path.lexists(path):
      os.rename(tmp, path)
      return True
    if not (replace(path) if callable(replace) else replace):
      return False
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(path, old)
    try:
      os.rename(tmp, path)
    except BaseException:
      os.rename(old, path)
      raise
    if old.is_dir() and not old.is_symlink():
      shutil.rmtree(old, ignore_errors=True)
    else:
      old.unlink()
    return True
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed into place
