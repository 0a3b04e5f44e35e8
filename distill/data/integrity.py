"""Size and CRC-32 of every file of a directory, recorded once it is complete, checked before
it is read.

Orbax and NumPy detect some torn files (a truncated JSON, a short .npy) but read a flipped
byte inside array data as a valid value; a recorded checksum catches both. The record
(`checksums.json`, written atomically) covers every other file under the directory.
"""
from __future__ import annotations

import json
import os
import zlib

from distill import atomic_file

CHECKSUMS = 'checksums.json'
_CHUNK = 1 << 20


def _crc32(path: str) -> int:
  crc = 0
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def file_checksums(directory: str) -> dict[str, list[int]]:
  """{relative path: [size, crc32]} of every file under `directory` but the record."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      relative = os.path.relpath(path, directory)
      if relative not in (CHECKSUMS, CHECKSUMS + '.tmp'):
        out[relative] = [os.path.getsize(path), _crc32(path)]
  return out


def record(directory: str) -> None:
  """Writes `directory`/checksums.json for its files as they are now."""
  atomic_file.write_json(os.path.join(directory, CHECKSUMS), file_checksums(directory), indent=0,
                         sort_keys=True)


def problems(directory: str) -> list[str] | None:
  """What differs from the record ([] when intact), or None when there is no record."""
  path = os.path.join(directory, CHECKSUMS)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      recorded = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    return [f'{CHECKSUMS} unreadable ({e})']
  found = []
  for relative, (size, crc) in sorted(recorded.items()):
    full = os.path.join(directory, relative)
    if not os.path.exists(full):
      found.append(f'{relative} missing')
    elif os.path.getsize(full) != size:
      found.append(f'{relative} has {os.path.getsize(full)} bytes, {size} were written')
    elif _crc32(full) != crc:
      found.append(f'{relative} corrupt (checksum differs)')
  return found
