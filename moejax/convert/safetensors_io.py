"""Hugging Face style safetensors directories: sharded writing with an index, reading back.

Layout written (the one ``transformers`` ``save_pretrained`` uses):
  one file   model.safetensors                                  (total <= max_shard_bytes)
  sharded    model-00001-of-0000N.safetensors ... + model.safetensors.index.json
             {"metadata": {"total_size": bytes}, "weight_map": {tensor name: file name}}

Writing is atomic: everything goes into a temporary sibling directory that is renamed to
the destination only once complete, so a failure never leaves a partial output directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class ConversionError(ValueError):
  """A checkpoint cannot be converted: unknown architecture, missing tensor, bad shape."""


@contextlib.contextmanager
def atomic_directory(out_dir: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary directory that becomes `out_dir` only if the block succeeds."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(
      f"{out_dir} exists and is not empty; pass overwrite=True "
      "(--overwrite) or choose another output directory"
    )
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _make_world_readable(tmp)
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.rename(tmp, out_dir)


def _make_world_readable(directory: str) -> None:
  """0755 folders / 0644 files (less the umask), like a run the trainer writes; mkdtemp
  would otherwise leave the export readable by its owner only."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(directory, 0o755 & ~umask)
  for root, dirs, files in os.walk(directory):
    for name in dirs:
      os.chmod(os.path.join(root, name), 0o755 & ~umask)
    for name in files:
      os.chmod(os.path.join(root, name), 0o644 & ~umask)


def write_safetensors(
  tensors: Mapping[str, np.ndarray], directory: str, max_shard_bytes: int = 5 * 2**30
) -> list[str]:
  """Writes `tensors` (name -> array) as one file or as shards with an index; returns files."""
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    if shards[-1] and size + array.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = array
    size += array.nbytes
  metadata = {"format": "pt"}  # lets torch-side loaders treat the file as theirs
  if len(shards) == 1:
    save_file(shards[0], os.path.join(directory, SINGLE_FILE), metadata=metadata)
    return [SINGLE_FILE]
  files, weight_map = [], {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(directory, fname), metadata=metadata)
    files.append(fname)
    weight_map.update({name: fname for name in shard})
  total = int(sum(np.asarray(t).nbytes for t in tensors.values()))
  with open(os.path.join(directory, INDEX_FILE), "w") as f:
    json.dump(
      {"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True
    )
  files.append(INDEX_FILE)
  return files


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
  """All tensors of a directory written by `write_safetensors` or ``save_pretrained``."""
  index = os.path.join(directory, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
    files = [SINGLE_FILE]
  else:
    raise ConversionError(f"{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
  tensors: dict[str, np.ndarray] = {}
  for fname in files:
    tensors.update(load_file(os.path.join(directory, fname)))
  return tensors
