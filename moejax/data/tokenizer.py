"""Tokenizers (``data.tokenizer``): bytes, a SentencePiece model, or a HF tokenizer.json.

The byte tokenizer: every UTF-8 byte is one token, plus three special ids.

Ids: 0 = pad, 1 = bos, 2 = eos, and byte ``b`` (0..255) -> ``b + 3``; ``vocab_size == 259``.
No training, no files, and the same ids on every machine.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3  # id of byte 0
VOCAB_SIZE = 256 + BYTE_OFFSET  # 259


def _as_bytes(text: str | bytes) -> bytes:
  """UTF-8 bytes of ``text``; bytes (as TFDS ``Text`` features come back) pass through."""
  return text if isinstance(text, (bytes, bytearray)) else text.encode("utf-8")


class ByteTokenizer:
  """Maps text to byte ids and back. Stateless; all instances are equivalent."""

  pad_id: int = PAD_ID
  bos_id: int = BOS_ID
  eos_id: int = EOS_ID
  vocab_size: int = VOCAB_SIZE

  def encode(self, text: str | bytes) -> list[int]:
    """Ids of the UTF-8 bytes of ``text``, without bos/eos."""
    return [b + BYTE_OFFSET for b in _as_bytes(text)]

  def encode_document(self, text: str | bytes) -> np.ndarray:
    """``[bos] + encode(text) + [eos]`` as ``int32[len(bytes) + 2]`` (the fast path)."""
    raw = np.frombuffer(_as_bytes(text), dtype=np.uint8)
    out = np.empty(raw.shape[0] + 2, dtype=np.int32)
    out[0] = BOS_ID
    out[1:-1] = raw
    out[1:-1] += BYTE_OFFSET
    out[-1] = EOS_ID
    return out

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Text of ``ids``. Special ids and ids outside the byte range (e.g. from a model
    whose vocabulary is padded past 259) are skipped; invalid UTF-8 becomes U+FFFD."""
    arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
    arr = arr.reshape(-1)
    keep = arr[(arr >= BYTE_OFFSET) & (arr < VOCAB_SIZE)] - BYTE_OFFSET
    return keep.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- file tokenizers


def _encode_document(ids: list[int], bos_id: int | None, eos_id: int | None) -> np.ndarray:
  """``[bos] + ids + [eos]`` as int32 (a missing special id is left out)."""
  head = [] if bos_id is None else [bos_id]
  tail = [] if eos_id is None else [eos_id]
  return np.asarray(head + list(ids) + tail, dtype=np.int32)


def _as_text(text: str | bytes) -> str:
  return text.decode("utf-8", errors="replace") if isinstance(text, (bytes, bytearray)) else text


class SentencePieceTokenizer:
  """A SentencePiece model file (Kudo & Richardson, 2018); ids and specials from the model."""

  def __init__(self, path: str):
    import sentencepiece as spm

    self.path = path
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = int(self._sp.get_piece_size())
    special = lambda i: None if i < 0 else int(i)
    self.bos_id = special(self._sp.bos_id())
    self.eos_id = special(self._sp.eos_id())
    pad = special(self._sp.pad_id())
    self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

  def encode(self, text: str | bytes) -> list[int]:
    return list(self._sp.encode(_as_text(text)))

  def encode_document(self, text: str | bytes) -> np.ndarray:
    return _encode_document(self.encode(text), self.bos_id, self.eos_id)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    ids = [
      int(i) for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).ravel()
    ]
    return self._sp.decode([i for i in ids if 0 <= i < self.vocab_size])


# Special-token spellings tried (in order) when a tokenizer.json has no tokenizer_config.json.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<｜begin▁of▁sentence｜>", "[BOS]")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<｜end▁of▁sentence｜>", "[EOS]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


def _token_name(value) -> str | None:
  """A tokenizer_config.json special token: a string or {'content': str, ...}."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


class HFTokenizer:
  """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` package), or a directory holding
  one; bos/eos/pad come from ``tokenizer_config.json`` beside it when present, else from
  the usual special-token spellings."""

  def __init__(self, path: str):
    import tokenizers

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    self.path = path
    self._tok = tokenizers.Tokenizer.from_file(file)
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    names: dict[str, str | None] = {}
    config_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
    if os.path.exists(config_file):
      with open(config_file) as f:
        config = json.load(f)
      names = {k: _token_name(config.get(f"{k}_token")) for k in ("bos", "eos", "pad")}
    add_bos = True
    if os.path.exists(config_file):
      add_bos = bool(config.get("add_bos_token", names.get("bos") is not None))

    def find(kind: str, candidates) -> int | None:
      for name in ([names[kind]] if names.get(kind) else []) + list(candidates):
        i = self._tok.token_to_id(name)
        if i is not None:
          return int(i)
      return None

    self.bos_id = find("bos", _BOS_NAMES) if add_bos else None
    self.eos_id = find("eos", _EOS_NAMES)
    pad = find("pad", _PAD_NAMES)
    self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

  def encode(self, text: str | bytes) -> list[int]:
    return list(self._tok.encode(_as_text(text), add_special_tokens=False).ids)

  def encode_document(self, text: str | bytes) -> np.ndarray:
    return _encode_document(self.encode(text), self.bos_id, self.eos_id)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    ids = [
      int(i) for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).ravel()
    ]
    return self._tok.decode([i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=True)


Tokenizer = ByteTokenizer | SentencePieceTokenizer | HFTokenizer


def load_tokenizer(spec: str = "byte", field: str = "data.tokenizer") -> Tokenizer:
  """``data.tokenizer``: 'byte', a SentencePiece ``*.model`` file, or a HF ``tokenizer.json``
  (or a directory holding one, e.g. an imported HF checkpoint). Never downloads.

  Raises ConfigError naming `field` when `spec` is none of these.
  """
  from moejax.errors import config_error

  if spec == "byte":
    return ByteTokenizer()
  path = os.path.expanduser(spec) if isinstance(spec, str) else spec
  if not isinstance(path, str) or not os.path.exists(path):
    raise config_error(
      field, spec, "must be 'byte', a SentencePiece .model file or a tokenizer.json / its directory"
    )
  if os.path.isdir(path):
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
      models = [f for f in sorted(os.listdir(path)) if f.endswith(".model")]
      if models:
        return SentencePieceTokenizer(os.path.join(path, models[0]))
      raise config_error(field, spec, "is a directory without tokenizer.json or *.model")
    return HFTokenizer(path)
  if path.endswith(".json"):
    return HFTokenizer(path)
  try:
    return SentencePieceTokenizer(path)
  except Exception as e:  # not a SentencePiece model
    raise config_error(
      field, spec, f"could not be read as a SentencePiece model ({type(e).__name__}: {e})"
    ) from e


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
  """``int64[V]``: UTF-8 bytes of each id's text (0 for special ids), for bits per byte."""
  if isinstance(tokenizer, ByteTokenizer):
    out = np.zeros(VOCAB_SIZE, np.int64)
    out[BYTE_OFFSET:] = 1
    return out
  specials = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
  out = np.zeros(tokenizer.vocab_size, np.int64)
  for i in range(tokenizer.vocab_size):
    if i not in specials:
      out[i] = len(_piece_text(tokenizer, i).encode("utf-8"))
  return out


def _piece_text(tokenizer: Tokenizer, i: int) -> str:
  """The text one id stands for inside a longer text (SentencePiece's '▁' is a space)."""
  if isinstance(tokenizer, SentencePieceTokenizer):
    sp = tokenizer._sp
    if sp.is_control(i) or sp.is_unknown(i):
      return ""
    if sp.is_byte(i):
      return "x"  # one byte
    return sp.id_to_piece(i).replace("\u2581", " ")
  return tokenizer._tok.decode([i], skip_special_tokens=True)
