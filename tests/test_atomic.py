"""mrcnn_jax.atomic: a directory (`write_dir`) appears whole or not at all, an existing one is replaced (or kept)
whole, and a failure at any point leaves the destination as it was and nothing beside it; `write_json`."""

import json
import os
import pathlib
import stat

import pytest

from mrcnn_jax import atomic


def _tree(path: pathlib.Path) -> dict:
  """{relative path: text} of every file under `path`."""
  return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _siblings(path: pathlib.Path) -> list[str]:
  """What lies beside `path`: temporary and moved-aside directories must not survive."""
  return sorted(p.name for p in path.parent.iterdir())


def _writer(files: dict, seen: list | None = None):
  def write(tmp: pathlib.Path) -> None:
    if seen is not None:
      seen.append((tmp, sorted(tmp.iterdir())))
    for name, text in files.items():
      (tmp / name).parent.mkdir(parents=True, exist_ok=True)
      (tmp / name).write_text(text)
  return write


def _existing(path: pathlib.Path, files: dict) -> pathlib.Path:
  path.mkdir()
  _writer(files)(path)
  return path


def test_writes_into_an_empty_hidden_sibling_then_renames_it(tmp_path):
  target = tmp_path / "new" / "out"  # the parent folder is created
  seen = []
  assert atomic.write_dir(target, _writer({"a.txt": "1", "sub/b.txt": "2"}, seen)) is True
  (tmp, contents), = seen
  assert tmp.parent == target.parent and tmp.name.startswith(".out.tmp-") and contents == []
  assert _tree(target) == {"a.txt": "1", "sub/b.txt": "2"}
  assert _siblings(target) == ["out"]


def test_the_directory_gets_the_umask_permissions(tmp_path):
  """Not mkdtemp's private 0700: a data set or an export is read by other users' processes too."""
  umask = os.umask(0o022)
  try:
    atomic.write_dir(tmp_path / "out", _writer({"a.txt": "1"}))
  finally:
    os.umask(umask)
  assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


@pytest.mark.parametrize("kind", ["directory", "empty directory", "file"])
def test_replaces_what_is_there(tmp_path, kind):
  target = tmp_path / "out"
  if kind == "file":
    target.write_text("old")
  else:
    _existing(target, {} if kind == "empty directory" else {"old.txt": "old", "sub/x.txt": "x"})
  assert atomic.write_dir(target, _writer({"new.txt": "new"})) is True
  assert _tree(target) == {"new.txt": "new"}
  assert _siblings(target) == ["out"]


def test_replace_false_or_a_predicate_can_keep_what_is_there(tmp_path):
  target = _existing(tmp_path / "out", {"old.txt": "old"})
  assert atomic.write_dir(target, _writer({"new.txt": "new"}), replace=False) is False
  assert _tree(target) == {"old.txt": "old"} and _siblings(target) == ["out"]

  asked = []
  keep = lambda path: asked.append(path) or False  # noqa: E731
  assert atomic.write_dir(target, _writer({"new.txt": "new"}), replace=keep) is False
  assert asked == [target] and _tree(target) == {"old.txt": "old"} and _siblings(target) == ["out"]

  assert atomic.write_dir(target, _writer({"new.txt": "new"}), replace=lambda path: True) is True
  assert _tree(target) == {"new.txt": "new"} and _siblings(target) == ["out"]


def test_the_predicate_is_asked_after_writing(tmp_path):
  """What is at the destination once the new directory is complete decides, e.g. a set another process finished
  meanwhile."""
  target = tmp_path / "out"

  def write(tmp):
    _existing(target, {"theirs.txt": "theirs"})  # another process, while this one writes
    _writer({"ours.txt": "ours"})(tmp)

  assert atomic.write_dir(target, write, replace=lambda path: "theirs.txt" not in _tree(path)) is False
  assert _tree(target) == {"theirs.txt": "theirs"} and _siblings(target) == ["out"]


@pytest.mark.parametrize("exists", [False, True])
def test_a_failing_write_leaves_the_destination_as_it_was(tmp_path, exists):
  target = tmp_path / "out"
  if exists:
    _existing(target, {"old.txt": "old"})

  def write(tmp):
    (tmp / "half.txt").write_text("half")
    raise RuntimeError("simulated failure while writing")

  with pytest.raises(RuntimeError, match="simulated"):
    atomic.write_dir(target, write)
  assert (_tree(target) == {"old.txt": "old"}) if exists else not os.path.lexists(target)
  assert _siblings(target) == (["out"] if exists else [])


def _fail_first_rename_to(target: pathlib.Path, monkeypatch) -> list:
  """Make the first rename onto `target` (the one that puts the new directory in place) fail, as a crash there
  would."""
  real_rename = os.rename
  failed = []

  def rename(src, dst):
    if pathlib.Path(dst) == target and not failed:
      failed.append(pathlib.Path(src))
      raise OSError("simulated interruption")
    real_rename(src, dst)
  monkeypatch.setattr(os, "rename", rename)
  return failed


def test_an_interrupted_rename_leaves_nothing(tmp_path, monkeypatch):
  target = tmp_path / "out"
  failed = _fail_first_rename_to(target, monkeypatch)
  with pytest.raises(OSError, match="simulated"):
    atomic.write_dir(target, _writer({"new.txt": "new"}))
  assert failed and failed[0].name.startswith(".out.tmp-")
  assert not os.path.lexists(target)
  assert _siblings(target) == []


def test_an_interrupted_replace_puts_the_old_one_back(tmp_path, monkeypatch):
  target = _existing(tmp_path / "out", {"old.txt": "old", "sub/x.txt": "x"})
  failed = _fail_first_rename_to(target, monkeypatch)
  with pytest.raises(OSError, match="simulated"):
    atomic.write_dir(target, _writer({"new.txt": "new"}))
  assert failed and failed[0].name.startswith(".out.tmp-")  # the new one failed; the old one came back after it
  assert _tree(target) == {"old.txt": "old", "sub/x.txt": "x"}
  assert _siblings(target) == ["out"]


@pytest.mark.parametrize("indent", [None, 2])
def test_write_json_creates_the_folder_and_writes_json_dumps_text(tmp_path, indent):
  obj = {"rows": [{"name": "a", "ms": 1.5}], "backend": "cpu"}
  path = atomic.write_json(tmp_path / "sub" / "out.json", obj, indent=indent)
  assert path.read_text() == json.dumps(obj, indent=indent)
  assert _siblings(path) == ["out.json"]
