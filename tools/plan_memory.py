#!/usr/bin/env python3
"""Thin wrapper of ``moejax-plan-memory`` (``moejax.planning.cli``) for the documented path
``python tools/plan_memory.py``; needs moejax installed (``pip install -e .``)."""

from moejax.planning.cli import run

if __name__ == "__main__":
  run()
