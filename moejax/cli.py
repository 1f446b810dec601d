"""Shared pieces of the console scripts (``moejax-convert``, ``moejax-experts``): argument
types and error handling."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from moejax.errors import ConfigError


def parse_mesh(text: str) -> dict[str, int]:
  """'data=-1,expert=2,model=1' -> {'data': -1, 'expert': 2, 'model': 1}."""
  out = {}
  for part in text.split(","):
    name, sep, value = part.partition("=")
    if not sep:
      raise argparse.ArgumentTypeError(f"--mesh entry {part!r} must look like expert=2")
    try:
      out[name.strip()] = int(value)
    except ValueError as e:
      raise argparse.ArgumentTypeError(f"--mesh entry {part!r}: size must be an int") from e
  return out


def run_subcommand(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
  """Parses argv, runs ``args.fn(args)``; user errors print one line and return 2."""
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax"):  # Orbax's per-file chatter, backend probing
    logging.getLogger(noisy).setLevel(logging.WARNING)
  args = parser.parse_args(argv)
  try:
    args.fn(args)
  except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
