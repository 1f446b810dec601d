"""The declarative moejax <-> Hugging Face tensor mapping shared by every family.

A family is one table of ``Row``s: the moejax param path pattern, the HF tensor name
pattern (``{i}`` = layer, ``{j}`` = expert), the layout rule, the scope the row repeats over
('global', 'layer', 'moe' / 'dense' layers, 'expert' of each MoE layer) and an optional
config predicate. ``expand`` turns a table and a ModelConfig into concrete ``TensorMap``s;
``to_hf_tensors`` / ``from_hf_tensors`` apply them (pure reshapes/transposes, so a round
trip is bit-exact). ``defuse`` accepts transformers >= 5's fused in-memory expert layout
(``mlp.experts.gate_up_proj`` [E, 2f, d], ``mlp.experts.down_proj`` [E, d, f]) on import.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import flax
import numpy as np
from flax import traverse_util

from moejax.convert.safetensors_io import ConversionError

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one moejax leaf of shape `shape` is stored in HF: to_hf(x), from_hf(t, shape),
  hf_shape(shape) (the expected HF shape, computed without touching data)."""

  to_hf: Callable[[Array], Array]
  from_hf: Callable[[Array, tuple], Array]
  hf_shape: Callable[[tuple], tuple]


SAME = Layout(lambda x: x, lambda t, shape: t.reshape(shape), tuple)
TRANSPOSE = Layout(np.transpose, lambda t, shape: t.T, lambda s: tuple(s[::-1]))
# kernel [in, *out] <-> Linear weight [prod(out), in]
LINEAR_IN = Layout(
  lambda x: x.reshape(x.shape[0], -1).T,
  lambda t, shape: t.T.reshape(shape),
  lambda s: (math.prod(s[1:]), s[0]),
)
# kernel [*in, out] <-> Linear weight [out, prod(in)]
LINEAR_OUT = Layout(
  lambda x: x.reshape(-1, x.shape[-1]).T,
  lambda t, shape: t.T.reshape(shape),
  lambda s: (s[-1], math.prod(s[:-1])),
)
# flat vector [prod(shape)] <-> moejax [*shape] (e.g. a [H, Dh] q/k norm scale over H*Dh)
FLAT = Layout(lambda x: x.reshape(-1), lambda t, shape: t.reshape(shape), lambda s: (math.prod(s),))

SCOPES = ("global", "layer", "moe", "dense", "expert")


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of a family table; `when(cfg)` False drops the row."""

  path: str
  name: str
  layout: Layout = SAME
  scope: str = "layer"
  when: Callable[[Any], bool] | None = None


# The rows every HF decoder family shares: embeddings, final norm, untied LM head and the
# two per-layer RMSNorms (model.layers.{i}.*).
DECODER_ROWS = (
  Row("embed/embedding", "model.embed_tokens.weight", scope="global"),
  Row("final_norm/scale", "model.norm.weight", scope="global"),
  Row(
    "lm_head/kernel",
    "lm_head.weight",
    TRANSPOSE,
    scope="global",
    when=lambda cfg: not cfg.tie_embeddings,
  ),
  Row("layers_{i}/attn_norm/scale", "model.layers.{i}.input_layernorm.weight"),
  Row("layers_{i}/ffn_norm/scale", "model.layers.{i}.post_attention_layernorm.weight"),
)


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """moejax param `path` <-> HF tensor `name`. `expert` = j: the HF tensor is expert j's
  slice of the stacked moejax [E, ...] leaf."""

  path: str
  name: str
  layout: Layout = SAME
  expert: int | None = None


def expand(table, cfg) -> list[TensorMap]:
  """Every (moejax param, HF tensor) pair of `cfg` for a family `table`, in table order."""
  maps = []
  for row in table:
    if row.scope not in SCOPES:
      raise ValueError(f"unknown scope {row.scope!r}; allowed {SCOPES}")
    if row.when is not None and not row.when(cfg):
      continue
    if row.scope == "global":
      maps.append(TensorMap(row.path, row.name, row.layout))
      continue
    for i in range(cfg.num_layers):
      moe = cfg.is_moe_layer(i)
      if (row.scope in ("moe", "expert") and not moe) or (row.scope == "dense" and moe):
        continue
      if row.scope == "expert":
        for j in range(cfg.moe.num_experts):
          maps.append(
            TensorMap(row.path.format(i=i), row.name.format(i=i, j=j), row.layout, expert=j)
          )
      else:
        maps.append(TensorMap(row.path.format(i=i), row.name.format(i=i), row.layout))
  return maps


def flatten(params) -> dict[str, Any]:
  """{'layers_0/attn/q/kernel': leaf} for a nested dict (or FrozenDict) of leaves."""
  return traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")


def to_hf_tensors(params, maps: list[TensorMap], family: str) -> dict[str, Array]:
  """moejax params (nested dict of arrays) -> {HF tensor name: numpy array}."""
  flat = flatten(params)
  tensors = {}
  for m in maps:
    if m.path not in flat:
      raise ConversionError(f"moejax parameter {m.path} is missing from the checkpoint")
    value = np.asarray(flat[m.path])
    value = value[m.expert] if m.expert is not None else value
    tensors[m.name] = np.ascontiguousarray(m.layout.to_hf(value))
  unused = set(flat) - {m.path for m in maps}
  if unused:
    raise ConversionError(f"moejax parameters with no {family} counterpart: {sorted(unused)}")
  return tensors


_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")


def defuse(tensors: dict[str, Array], expert_names: Callable[[int, int], tuple]) -> dict:
  """transformers >= 5 fused experts -> per-expert names; `expert_names(i, j)` gives layer
  i expert j's (gate, up, down) HF names (gate_up_proj rows :f are gate, f: are up)."""
  out = {}
  for name, t in tensors.items():
    m = _FUSED.fullmatch(name)
    if not m:
      out[name] = t
      continue
    i, kind = int(m.group(1)), m.group(2)
    for j in range(t.shape[0]):
      gate, up, down = expert_names(i, j)
      if kind == "gate_up_proj":
        f = t.shape[1] // 2
        out[gate], out[up] = t[j, :f], t[j, f:]
      else:
        out[down] = t[j]
  return out


def _check_shape(name: str, got: tuple, expected: tuple) -> None:
  if tuple(got) != tuple(expected):
    raise ConversionError(
      f"tensor {name} has shape {tuple(got)} but the moejax config expects {tuple(expected)}"
    )


def from_hf_tensors(tensors: dict[str, Array], abstract_params, maps: list[TensorMap]) -> dict:
  """{HF tensor name: array} -> moejax params shaped like `abstract_params`.

  `abstract_params`: a tree of arrays or ShapeDtypeStructs giving every expected shape.
  Raises ConversionError naming a missing tensor, a tensor and both shapes on a mismatch,
  or HF tensors nothing maps to.
  """
  like = flatten(abstract_params)
  flat: dict[str, Array] = {}
  experts: dict[str, list[Array]] = {}
  for m in maps:
    if m.name not in tensors:
      raise ConversionError(
        f"tensor {m.name} (for moejax {m.path}) is missing from the HF checkpoint"
      )
    if m.path not in like:
      raise ConversionError(
        f"moejax parameter {m.path} (for HF {m.name}) is not in the model built from config.json"
      )
    t, shape = tensors[m.name], tuple(like[m.path].shape)
    if m.expert is not None:
      _check_shape(m.name, t.shape, m.layout.hf_shape(shape[1:]))
      experts.setdefault(m.path, []).append(m.layout.from_hf(t, shape[1:]))
    else:
      _check_shape(m.name, t.shape, m.layout.hf_shape(shape))
      flat[m.path] = m.layout.from_hf(t, shape)
  for path, parts in experts.items():
    flat[path] = np.stack(parts)
  unused = sorted(set(tensors) - {m.name for m in maps})
  if unused:
    raise ConversionError(
      f"HF tensors with no moejax counterpart (does config.json match "
      f"the weights?): {unused[:5]}{' ...' if len(unused) > 5 else ''}"
    )
  for path, target in like.items():
    if path not in flat:
      raise ConversionError(f"no HF tensor maps to moejax parameter {path}")
    flat[path] = np.asarray(flat[path]).astype(target.dtype, copy=False)
  return traverse_util.unflatten_dict(flat, sep="/")
