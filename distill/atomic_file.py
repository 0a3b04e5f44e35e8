"""Whole-or-nothing writes of small record files (run records, manifests, checksum records).

A process killed while it writes a file in place leaves it torn: readers then need their own
repair rules. Written here, a record is either the previous one or the new one: the text goes
to `PATH.tmp` in the same directory (a rename is atomic only within one filesystem), is flushed
and fsynced, then renamed over `PATH`; the directory is fsynced so the rename survives a crash
of the host too. A stray `PATH.tmp` left by a kill is overwritten by the next write. One
writer per path: in a job of several processes, process 0 writes the records.
"""
from __future__ import annotations

import json
import os


def write_text(path: str, text: str) -> None:
  tmp = path + '.tmp'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
  try:
    os.fsync(directory)
  finally:
    os.close(directory)


def write_json(path: str, value, **dumps_kwargs) -> None:
  """`value` serialised first, so a value that cannot be serialised leaves `path` untouched."""
  write_text(path, json.dumps(value, **dumps_kwargs))
