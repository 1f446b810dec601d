"""Run paths through ``etils.epath``: local folders and object-store URIs (gs://, s3://, ...).

A URI is never turned into a local folder; a local path becomes absolute (Orbax needs
that); ``file://`` is a local path.
"""

from __future__ import annotations

import os

from etils import epath


def is_uri(path) -> bool:
  """True for a non-local URI such as gs://bucket/run."""
  return "://" in os.fspath(path) and not os.fspath(path).startswith("file://")


def as_path(path) -> epath.Path:
  """`path` (str or Path) as an epath.Path: URIs kept, local paths made absolute."""
  text = os.fspath(path)
  if text.startswith("file://"):
    text = text[len("file://") :]
  if is_uri(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(text))


def write_text_atomic(path: epath.Path, text: str) -> None:
  """Writes `text` to `path` whole: a temporary sibling renamed over it (an object store
  writes an object at once anyway)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_uri(path):
    path.write_text(text)
    return
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  tmp.write_text(text)
  os.chmod(tmp, 0o644)
  tmp.replace(path)
