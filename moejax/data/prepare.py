"""Prepares a TFDS dataset (array_record, offline) for training.

  python -m moejax.data.prepare [--data_dir DIR]
      the built-in ``moejax_tiny_corpus`` (only needed ahead of time for data_dirs
      shared by many hosts or that cannot hold a file lock).

  python -m moejax.data.prepare --files 'GLOB' --name NAME --data_dir DIR \
      [--text_field text] [--validation_fraction 0.01]
      your .txt / .jsonl / .jsonl.gz files (``moejax.data.text_files``) as TFDS dataset
      NAME with 'train' and 'validation' splits of raw text; train with
      ``--config.data.name=NAME --config.data.data_dir=DIR``. Streams the files (memory is
      bounded); tokenisation happens later, in the input pipeline.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import time
from typing import Iterator

import tensorflow_datasets as tfds
from etils import epath
from tqdm import tqdm

from moejax.data.pipeline import default_data_dir
from moejax.data.text_files import expand_files, iter_documents
from moejax.data.tiny_corpus import prepare_tiny_corpus

VERSION = "1.0.0"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class TextFilesBuilder(tfds.dataset_builders.AdhocBuilder, skip_registration=True):
  """TFDS's ad-hoc builder over Python iterables, without TensorFlow; ``code_path`` set as
  ``MoejaxTinyCorpus`` does (TFDS would look it up with ``importlib_resources``)."""

  code_path = epath.Path(__file__)

  def _split_generators(self, dl_manager):
    del dl_manager  # the splits are Python iterables of (key, example): no TensorFlow needed
    return dict(self._split_datasets)


def is_validation(index: int, num_docs: int, fraction: float) -> bool:
  """Document ``index`` of ``num_docs`` goes to validation: floor(N f) documents spread
  evenly (``floor((i + 1) f) > floor(i f)``), at least one when f > 0 and N > 1."""
  if fraction <= 0 or num_docs < 2:
    return False
  if math.floor(num_docs * fraction) == 0:
    return index == num_docs - 1
  return math.floor((index + 1) * fraction) > math.floor(index * fraction)


def _split_examples(
  files: list[str], text_field: str, num_docs: int, fraction: float, validation: bool, bar
) -> Iterator[tuple[int, dict[str, str]]]:
  for i, text in enumerate(iter_documents(files, text_field)):
    if is_validation(i, num_docs, fraction) == validation:
      bar.update(1)
      yield i, {"text": text}


def prepare_text_dataset(
  files: list[str],
  name: str,
  data_dir: str,
  text_field: str = "text",
  validation_fraction: float = 0.01,
  overwrite: bool = False,
  progress: bool = True,
) -> tfds.core.DatasetBuilder:
  """Writes `files` as TFDS dataset `name` (feature 'text'; splits 'train', 'validation')
  in `data_dir`, documents in file order (``disable_shuffling``); returns its builder."""
  if not _NAME_RE.match(name):
    raise ValueError(f"--name {name!r} must be snake_case: [a-z][a-z0-9_]*")
  if not 0 <= validation_fraction < 1:
    raise ValueError(f"--validation_fraction {validation_fraction} must be in [0, 1)")
  data_dir = os.path.expanduser(data_dir)
  target = os.path.join(data_dir, name)
  if os.path.exists(target):
    if not overwrite:
      raise FileExistsError(f"{target} exists; pass --overwrite to rebuild it")
    shutil.rmtree(target)
  num_docs = sum(1 for _ in iter_documents(files, text_field))  # a first, counting pass
  if num_docs == 0:
    raise ValueError(f"{files} hold no document")
  bar = tqdm(total=num_docs, unit="doc", desc=f"writing {name}", disable=not progress)
  splits = {
    "train": _split_examples(files, text_field, num_docs, validation_fraction, False, bar),
  }
  if any(is_validation(i, num_docs, validation_fraction) for i in range(num_docs)):
    splits["validation"] = _split_examples(
      files, text_field, num_docs, validation_fraction, True, bar
    )
  builder = TextFilesBuilder(
    name=name,
    version=VERSION,
    features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
    split_datasets=splits,
    data_dir=data_dir,
    description=f"Text documents from {len(files)} file(s) (moejax.data.prepare).",
    file_format="array_record",
    disable_shuffling=True,
  )
  try:
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
  except BaseException:
    shutil.rmtree(target, ignore_errors=True)  # no half-written dataset left behind
    raise
  finally:
    bar.close()
  return builder


def main(argv: list[str] | None = None) -> int:
  """Parses the flags in the module docstring; returns the exit code."""
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir to write to.")
  parser.add_argument("--files", default=None, help="Glob(s), comma-separated, of text files.")
  parser.add_argument("--name", default=None, help="TFDS dataset name (snake_case).")
  parser.add_argument("--text_field", default="text", help="JSONL field holding the text.")
  parser.add_argument("--validation_fraction", type=float, default=0.01)
  parser.add_argument("--overwrite", action="store_true", help="Rebuild an existing dataset.")
  parser.add_argument("--no_progress", action="store_true", help="No progress bar.")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  data_dir = args.data_dir or default_data_dir()
  if args.files is None:
    if args.name is not None:
      parser.error("--name needs --files")
    builder = prepare_tiny_corpus(data_dir)
  else:
    if args.name is None:
      parser.error("--files needs --name")
    try:
      builder = prepare_text_dataset(
        expand_files(args.files),
        args.name,
        data_dir,
        args.text_field,
        args.validation_fraction,
        overwrite=args.overwrite,
        progress=not args.no_progress,
      )
    except (ValueError, FileExistsError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
  print(f"{builder.name} ready in {builder.data_dir} {sizes} ({time.perf_counter() - start:.1f} s)")
  if args.files is not None:
    print(f"train with: --config.data.name={builder.name} --config.data.data_dir={data_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
