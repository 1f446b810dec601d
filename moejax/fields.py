"""Field checks shared by the config sections (``moejax.config``, ``moejax.moe_config``).

A section is a frozen dataclass whose ``__post_init__`` checks every field and raises
``moejax.errors.ConfigError`` naming the dotted field: ``train.steps=0 is invalid: ...``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import ml_collections
import numpy as np

from moejax.errors import ConfigError, config_error

PATH_FIELD = "config_path"  # dotted path of a section, for messages; not part of equality


def is_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_number(v: Any) -> bool:
  """A finite int or float (not a bool)."""
  return (
    isinstance(v, (int, float, np.integer, np.floating))
    and not isinstance(v, (bool, np.bool_))
    and math.isfinite(float(v))
  )


def is_bool(v: Any) -> bool:
  return isinstance(v, (bool, np.bool_))


def check(cfg: Any, name: str, ok: bool, allowed: str) -> None:
  """Raises ``<cfg.config_path>.<name>=<value> is invalid: <allowed>`` unless `ok`."""
  if not ok:
    raise config_error(f"{cfg.config_path}.{name}", getattr(cfg, name), allowed)


def as_dict(cd: Any) -> dict[str, Any]:
  """Top-level items of a ConfigDict / mapping / section dataclass, sub-sections as they are."""
  if dataclasses.is_dataclass(cd):
    return {f.name: getattr(cd, f.name) for f in dataclasses.fields(cd) if f.name != PATH_FIELD}
  if isinstance(cd, ml_collections.ConfigDict):
    return {k: cd[k] for k in cd.keys()}
  return dict(cd.items()) if hasattr(cd, "items") else dict(cd)


def field_names(cls) -> list[str]:
  return [f.name for f in dataclasses.fields(cls) if f.name != PATH_FIELD]


def reject_unknown(values: dict[str, Any], known, path: str) -> None:
  """``path.name=value is invalid: unknown field; allowed fields are [...]``."""
  unknown = sorted(set(values) - set(known))
  if unknown:
    raise config_error(
      f"{path}.{unknown[0]}",
      values[unknown[0]],
      f"unknown field; allowed fields are {sorted(known)}",
    )


def section_from_config(
  cls, cd: Any, path: str, required: bool = False, optional: tuple[str, ...] = (), **extra
):
  """``cls(**cd, config_path=path)`` with unknown fields rejected; a missing field is an error
  when `required` (``path.name is missing: ...``), else it takes its default. Fields named in
  `optional` (added after runs were written) always fall back to their defaults."""
  if isinstance(cd, cls):
    return cd
  if not (hasattr(cd, "items") or dataclasses.is_dataclass(cd)):
    raise config_error(path, cd, "must be a config section (dict)")
  values = as_dict(cd)
  names = field_names(cls)
  reject_unknown(values, names, path)
  if required:
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}  # no throwaway cls()
    for name in names:
      if name not in values and name not in optional:
        raise ConfigError(f"{path}.{name} is missing (default {defaults[name]!r})")
  return cls(**values, **extra, config_path=path)


def _optional_type(annotation) -> type | None:
  """int for ``int | None`` (so ConfigDict overrides of a None default parse as int)."""
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  return args[0] if len(args) == 1 and args[0] in (int, float, str, bool) else None


def to_config_dict(section) -> ml_collections.ConfigDict:
  """A section dataclass as a ConfigDict (sub-sections recursively); None defaults keep
  their declared type, so ``--config.data.data_dir=/x`` or ``...group_size=64`` parse."""
  hints = typing.get_type_hints(type(section))
  cd = ml_collections.ConfigDict()
  for name in field_names(type(section)):
    value = getattr(section, name)
    if dataclasses.is_dataclass(value):
      cd[name] = to_config_dict(value)
    elif value is None and _optional_type(hints[name]) is not None:
      cd[name] = ml_collections.FieldReference(None, field_type=_optional_type(hints[name]))
    else:
      cd[name] = value
  return cd
