"""Documents streamed from the user's text files: ``.txt``, ``.jsonl``, ``.jsonl.gz``.

``.txt``: documents are separated by blank lines (a run of text longer than
``MAX_DOC_CHARS`` without one is cut there); ``.jsonl(.gz)``: one JSON object per line,
the document is its ``text_field``. Files are read line by line, so memory stays bounded
by the longest document whatever the file size.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from typing import Iterator

MAX_DOC_CHARS = 1 << 20
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")


def expand_files(patterns: str | list[str]) -> list[str]:
  """Sorted files matching the glob(s) (comma-separated or a list); ValueError if none or if
  a file has an unsupported suffix."""
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(",") if p]
  files = sorted({f for p in patterns for f in glob.glob(os.path.expanduser(p), recursive=True)})
  files = [f for f in files if os.path.isfile(f)]
  if not files:
    raise ValueError(f"--files {patterns} matches no file")
  bad = [f for f in files if not f.endswith(SUFFIXES)]
  if bad:
    raise ValueError(f"unsupported file type {bad[0]!r}: expected one of {SUFFIXES}")
  return files


def _open(path: str):
  if path.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8", errors="replace")
  return open(path, encoding="utf-8", errors="replace")


def iter_file_documents(path: str, text_field: str = "text") -> Iterator[str]:
  """The non-empty documents of one file, in order (module docstring)."""
  with _open(path) as f:
    if path.endswith((".jsonl", ".jsonl.gz")):
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        record = json.loads(line)
        if text_field not in record:
          raise ValueError(f"{path}:{n} has no field {text_field!r} (see --text_field)")
        text = record[text_field]
        if isinstance(text, str) and text.strip():
          yield text
      return
    lines: list[str] = []
    size = 0
    for line in f:
      if not line.strip() or size + len(line) > MAX_DOC_CHARS:
        if lines:
          yield "".join(lines).strip("\n")
        lines, size = [], 0
        if not line.strip():
          continue
      lines.append(line)
      size += len(line)
    if lines:
      yield "".join(lines).strip("\n")


def iter_documents(files: list[str], text_field: str = "text") -> Iterator[str]:
  """Documents of every file in order."""
  for path in files:
    yield from iter_file_documents(path, text_field)
