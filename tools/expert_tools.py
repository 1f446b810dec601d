#!/usr/bin/env python3
"""Thin wrapper of ``moejax-experts`` (``moejax.compress.cli``) for the documented path
``python tools/expert_tools.py``; needs moejax installed (``pip install -e .``)."""

from moejax.compress.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
  raise SystemExit(main())
