#!/usr/bin/env python3
"""Thin wrapper of ``moejax-convert`` (``moejax.convert.cli``) for the documented path
``python tools/convert_checkpoint.py``; needs moejax installed (``pip install -e .``)."""

from moejax.convert.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
  raise SystemExit(main())
