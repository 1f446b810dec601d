"""Package metadata: console scripts resolve to callables, extras and pytest settings."""

import importlib
import os
import tomllib

from tests.helpers import REPO


def _pyproject() -> dict:
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def test_console_scripts_resolve_to_callables():
  scripts = _pyproject()["project"]["scripts"]
  assert set(scripts) == {
    "moejax-train",
    "moejax-convert",
    "moejax-experts",
    "moejax-plan-memory",
    "moejax-generate",
    "moejax-evaluate",
    "moejax-prepare-data",
    "moejax-train-tokenizer",
  }
  for target in scripts.values():
    module, _, attr = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attr)), target


def test_metadata_lives_in_pyproject_only():
  assert not os.path.exists(os.path.join(REPO, "setup.cfg"))
  meta = _pyproject()
  assert {"test", "tools", "interop"} <= set(meta["project"]["optional-dependencies"])
  assert any(d.startswith("pytest-xdist") for d in meta["project"]["optional-dependencies"]["test"])
  pytest_cfg = meta["tool"]["pytest"]["ini_options"]
  assert '-m "not slow"' in pytest_cfg["addopts"]
  assert any(m.startswith("slow:") for m in pytest_cfg["markers"])


def test_readme_test_command_is_what_ci_runs():
  with open(os.path.join(REPO, ".ci", "run")) as f:
    ci = [line.strip() for line in f if line.startswith(".venv/bin/") and "pip" not in line]
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  assert ".venv/bin/python -m pytest -q -n auto" in ci and ".venv/bin/ruff check ." in ci
  for command in ci:
    assert command in readme, command
