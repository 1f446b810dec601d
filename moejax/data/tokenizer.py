"""A byte-level tokenizer: every UTF-8 byte is one token, plus three special ids.

Ids: 0 = pad, 1 = bos, 2 = eos, and byte ``b`` (0..255) -> ``b + 3``; ``vocab_size == 259``.
No training, no files, and the same ids on every machine.
"""

from __future__ import annotations

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
