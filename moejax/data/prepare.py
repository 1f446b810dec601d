"""Prepares ``moejax_tiny_corpus`` ahead of time: ``python -m moejax.data.prepare [--data_dir D]``.

Training prepares it on first use anyway (see :func:`moejax.data.pipeline.load_source`);
this is for data directories shared by many hosts or that cannot hold a file lock.
"""

from __future__ import annotations

import argparse
import time

from moejax.data.pipeline import default_data_dir
from moejax.data.tiny_corpus import prepare_tiny_corpus


def main(argv: list[str] | None = None) -> None:
  """Parses ``--data_dir`` (default: ``$MOEJAX_DATA_DIR`` or ``~/tensorflow_datasets``)."""
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir to write to.")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  builder = prepare_tiny_corpus(args.data_dir or default_data_dir())
  sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
  print(
    f"moejax_tiny_corpus ready in {builder.data_dir} {sizes} ({time.perf_counter() - start:.1f} s)"
  )


if __name__ == "__main__":
  main()
