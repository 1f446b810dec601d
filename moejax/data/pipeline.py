"""Packed, sharded, exactly-resumable LM batches from random-access TFDS sources.

A host's token stream is its documents in the epoch's order (``permutation(seed, e)``;
host p of P reads the positions i with i % P == p), each ``[bos] + bytes + [eos]``,
concatenated and cut into rows of ``seq_len + 1`` (inputs row[:-1], targets row[1:]; no
padding). The resume state is the stream position ``(epoch, cursor, offset)``, a tiny
JSON dict per host.
"""

from __future__ import annotations

import os
import zlib
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np
import tensorflow_datasets as tfds

from moejax.config import DataConfig
from moejax.data.tiny_corpus import MoejaxTinyCorpus, prepare_tiny_corpus
from moejax.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from moejax.errors import config_error

TINY_CORPUS = MoejaxTinyCorpus.name  # 'moejax_tiny_corpus'
Batch = dict[str, np.ndarray]
_STATE_VERSION = 1


class RandomAccessSource(Protocol):
  """What the iterator reads: ``len(source)`` and ``source[i] -> {text_key: str|bytes}``."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Mapping[str, Any]: ...


# ----------------------------------------------------------------------------- config


def default_data_dir() -> str:
  """``$MOEJAX_DATA_DIR`` if set, else ``~/tensorflow_datasets`` (user-expanded)."""
  return os.path.expanduser(os.environ.get("MOEJAX_DATA_DIR") or "~/tensorflow_datasets")


def _check_positive_int(field: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise config_error(field, value, "must be a positive int")
  return int(value)


def per_host_batch_size(global_batch_size: int, process_count: int) -> int:
  """``global_batch_size // process_count``; an error naming the field if it does not divide."""
  _check_positive_int("data.global_batch_size", global_batch_size)
  if global_batch_size % process_count:
    raise config_error(
      "data.global_batch_size",
      global_batch_size,
      f"must be divisible by the number of processes ({process_count})",
    )
  return global_batch_size // process_count


# ----------------------------------------------------------------------------- sources


def load_source(
  name: str, split: str, data_dir: str | None = None, text_key: str = "text"
) -> RandomAccessSource:
  """A random-access source (``builder.as_data_source(split)``) of a TFDS dataset.

  ``moejax_tiny_corpus`` is prepared in ``data_dir`` on first use (once, under a file
  lock). Any other TFDS dataset must already be prepared there in ``array_record``
  format: this never downloads. Errors name the config field to fix.
  """
  data_dir = os.path.expanduser(data_dir) if data_dir else default_data_dir()
  if name == TINY_CORPUS:
    builder = prepare_tiny_corpus(data_dir)
  else:
    builder = _prepared_builder(name, data_dir)
  splits = sorted(builder.info.splits.keys())
  if split not in splits:
    raise ValueError(
      f"TFDS dataset data.name={name!r} in {data_dir} has no split "
      f"{split!r} (check data.train_split/data.eval_split); it has {splits}"
    )
  features = list(builder.info.features.keys())
  if text_key not in features:
    raise config_error(
      "data.text_key", text_key, f"TFDS dataset {name!r} has no such feature; it has {features}"
    )
  return builder.as_data_source(split)


def _prepared_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """The builder of an already prepared, array_record TFDS dataset, or a clear ValueError."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError, or a dataset module failing to import.
    raise ValueError(
      f"data.name={name!r} is not a usable TFDS dataset ({type(e).__name__}: "
      f"{str(e).splitlines()[0]}). Use {TINY_CORPUS!r}, or the name of a TFDS dataset "
      f"prepared in data.data_dir={data_dir!r}."
    ) from e
  how = (
    f"prepare it offline first, e.g. `tfds build {name} --data_dir={data_dir} "
    f"--file_format=array_record`, or set data.data_dir to where it is prepared"
  )
  if not builder.is_prepared():
    raise ValueError(
      f"TFDS dataset data.name={name!r} is not prepared in "
      f"data.data_dir={data_dir!r} (looked in {builder.data_dir}); {how}."
    )
  file_format = builder.info.file_format
  if file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
      f"TFDS dataset data.name={name!r} in data.data_dir={data_dir!r} is "
      f"stored as {getattr(file_format, 'value', file_format)}, but random "
      f"access needs array_record; {how}."
    )
  return builder


# ----------------------------------------------------------------------------- sharding


def host_document_order(
  num_docs: int, *, seed: int, epoch: int, shuffle: bool, process_index: int, process_count: int
) -> np.ndarray:
  """Source indices this host reads in ``epoch``, in order: ``int64[ceil((N-p)/P)]``.

  A pure function of its arguments: the epoch's order is ``permutation(N)`` drawn from
  ``default_rng([seed, epoch])`` (``arange(N)`` without shuffling), and host ``p`` keeps
  positions ``p, p + P, p + 2P, ...`` of it.
  """
  if shuffle:
    order = np.random.default_rng([seed, epoch]).permutation(num_docs)
  else:
    order = np.arange(num_docs)
  return order[process_index::process_count]


# ----------------------------------------------------------------------------- iterator


def document_task(text: str | bytes, num_tasks: int) -> int:
  """A document's pseudo-task, crc32(utf-8 bytes) mod num_tasks (0 when num_tasks is 0):
  a pure function of the example, so it survives shuffling, sharding and resuming."""
  if not num_tasks:
    return 0
  raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  return zlib.crc32(raw) % num_tasks


class LMBatchIterator(Iterator[Batch]):
  """Packed next-token-prediction batches of one host, resumable to the exact batch.

  Yields ``{'inputs': int32[B, L], 'targets': int32[B, L], 'mask': float32[B, L]}`` with
  ``B = global_batch_size // process_count``, ``L = seq_len`` and ``targets[:, t] ==
  inputs[:, t + 1]`` within a row. With ``repeat=True`` (train) it never ends, moving
  through epochs with a fresh order each. With ``repeat=False`` (eval) it makes one
  pass; the last batch is padded with ``pad`` tokens whose ``mask`` is 0, so every token
  of the pass is a target exactly once (apart from the first token of each row, which
  is only an input). Hosts may then yield different numbers of batches.

  Documents become ``tokenizer.encode_document(text)`` (default: the byte tokenizer).

  ``get_state()`` / ``set_state()`` save and restore the position as a small JSON dict;
  a restored iterator yields bit-identical batches. The position does not depend on
  ``seq_len`` or the batch size, so a state can also resume the same token stream with
  other batch shapes.
  """

  def __init__(
    self,
    source: RandomAccessSource | Sequence[Mapping[str, Any]],
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool = True,
    text_key: str = "text",
    tokenizer: Tokenizer | None = None,
    num_tasks: int = 0,
  ):
    if isinstance(process_count, bool) or not isinstance(process_count, int) or process_count < 1:
      raise ValueError(f"process_count must be a positive int, got {process_count!r}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    self.seq_len = _check_positive_int("data.seq_len", seq_len)
    self.batch_size = per_host_batch_size(global_batch_size, process_count)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
      raise config_error("data.seed", seed, "must be a non-negative int")
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.process_index = process_index
    self.process_count = process_count
    self.repeat = repeat
    self.text_key = text_key
    self.num_tasks = num_tasks  # > 0: batches carry 'task_id' (``document_task``)
    self._task_pieces: list[np.ndarray] = []
    self._source = source
    self._num_docs = len(source)
    if self._num_docs <= process_index:
      raise ValueError(
        f"the source has {self._num_docs} documents, so process "
        f"{process_index} of {process_count} would get none"
      )
    self._tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
    # Position: the document at `cursor` of this host's order, `offset` tokens into it.
    self._epoch = 0
    self._cursor = 0
    self._offset = 0
    self._order_cache: tuple[int, np.ndarray] | None = None  # (epoch, order)
    self._doc_cache: np.ndarray | None = None  # tokens of the document at the position

  # -- position ------------------------------------------------------------------

  def _order(self) -> np.ndarray:
    """This host's document order in the current epoch (cached per epoch)."""
    if self._order_cache is None or self._order_cache[0] != self._epoch:
      order = host_document_order(
        self._num_docs,
        seed=self.seed,
        epoch=self._epoch,
        shuffle=self.shuffle,
        process_index=self.process_index,
        process_count=self.process_count,
      )
      self._order_cache = (self._epoch, order)
    return self._order_cache[1]

  def _current_doc(self) -> np.ndarray | None:
    """Tokens ``int32[n]`` of the document at the position; None once a pass is over."""
    if self._doc_cache is None:
      order = self._order()
      if self._cursor >= len(order):
        return None
      example = self._source[int(order[self._cursor])]
      self._doc_cache = self._tokenizer.encode_document(example[self.text_key])
      self._doc_task = document_task(example[self.text_key], self.num_tasks)
    return self._doc_cache

  def _next_document(self) -> None:
    """Moves to the start of the next document, rolling into the next epoch if repeating."""
    self._cursor += 1
    self._offset = 0
    self._doc_cache = None
    if self.repeat and self._cursor >= len(self._order()):
      self._epoch += 1
      self._cursor = 0

  def _take_tokens(self, n: int) -> np.ndarray:
    """The next (up to) ``n`` tokens of the stream, ``int32[<=n]``; fewer only at the end."""
    pieces = []
    while n > 0:
      doc = self._current_doc()
      if doc is None:
        break
      piece = doc[self._offset : self._offset + n]
      pieces.append(piece)
      if self.num_tasks:
        self._task_pieces.append(np.full(len(piece), self._doc_task, np.int32))
      self._offset += len(piece)
      n -= len(piece)
      if self._offset == len(doc):
        self._next_document()
    if not pieces:
      return np.zeros((0,), np.int32)
    return np.concatenate(pieces) if len(pieces) > 1 else pieces[0].copy()

  # -- iteration -----------------------------------------------------------------

  def __iter__(self) -> "LMBatchIterator":
    return self

  def __next__(self) -> Batch:
    row_len = self.seq_len + 1
    num_tokens = self.batch_size * row_len
    tokens = self._take_tokens(num_tokens)  # int32[<= B * (L + 1)]
    num_real = len(tokens)
    if num_real == 0:
      raise StopIteration
    if num_real < num_tokens:  # Only at the end of a repeat=False pass.
      tokens = np.concatenate(
        [tokens, np.full(num_tokens - num_real, self._tokenizer.pad_id, np.int32)]
      )
    rows = tokens.reshape(self.batch_size, row_len)  # [B, L + 1]
    real = (np.arange(num_tokens) < num_real).reshape(self.batch_size, row_len)
    batch = {
      "inputs": np.ascontiguousarray(rows[:, :-1]),  # int32[B, L]
      "targets": np.ascontiguousarray(rows[:, 1:]),  # int32[B, L]
      "mask": real[:, 1:].astype(np.float32),  # float32[B, L]
    }
    if self.num_tasks:  # each input token's document task; padding: task 0
      tasks = np.zeros(num_tokens, np.int32)
      tasks[:num_real] = np.concatenate(self._task_pieces)
      self._task_pieces = []
      batch["task_id"] = np.ascontiguousarray(tasks.reshape(self.batch_size, row_len)[:, :-1])
    return batch

  # -- checkpointing -------------------------------------------------------------

  def _fingerprint(self) -> dict[str, Any]:
    """What must match between a saved state and the iterator restoring it."""
    return {
      "seed": self.seed,
      "shuffle": self.shuffle,
      "num_docs": self._num_docs,
      "process_index": self.process_index,
      "process_count": self.process_count,
    }

  def get_state(self) -> dict[str, Any]:
    """The position as a JSON-serialisable dict of ints/bools (a few dozen bytes)."""
    return {
      "version": _STATE_VERSION,
      "epoch": self._epoch,
      "cursor": self._cursor,
      "offset": self._offset,
      **self._fingerprint(),
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores a position from :meth:`get_state`; the next batches are then identical.

    Raises ValueError if the state was taken with another seed, shuffle setting, host
    layout or source size, since it would then point into a different token stream.
    """
    if state.get("version") != _STATE_VERSION:
      raise ValueError(
        f"data iterator state has version {state.get('version')!r}, expected {_STATE_VERSION}"
      )
    mismatched = {k: (state.get(k), v) for k, v in self._fingerprint().items() if state.get(k) != v}
    if mismatched:
      raise ValueError(
        f"data iterator state does not match this iterator (field: (saved, current)): {mismatched}"
      )
    epoch, cursor, offset = (int(state[k]) for k in ("epoch", "cursor", "offset"))
    if epoch < 0 or cursor < 0 or offset < 0:
      raise ValueError(f"data iterator state has a negative position: {dict(state)}")
    order_len = len(
      host_document_order(
        self._num_docs,
        seed=self.seed,
        epoch=epoch,
        shuffle=self.shuffle,
        process_index=self.process_index,
        process_count=self.process_count,
      )
    )
    if cursor > order_len or (cursor == order_len and offset):
      raise ValueError(f"data iterator state points past the data: {dict(state)}")
    if cursor == order_len and self.repeat:  # End of an epoch: continue with the next.
      epoch, cursor = epoch + 1, 0
    self._epoch, self._cursor, self._offset = epoch, cursor, offset
    self._doc_cache = None
    doc = self._current_doc()
    if doc is not None and offset >= len(doc):
      raise ValueError(f"data iterator state points past the data: {dict(state)}")


# ----------------------------------------------------------------------------- factories


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """Fills unspecified values from ``jax.process_index()`` / ``jax.process_count()``."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (keeps this module light)

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return process_index, process_count


def make_train_iterator(
  data_cfg: Any, process_index: int | None = None, process_count: int | None = None
) -> LMBatchIterator:
  """Infinite, shuffled (if ``data.shuffle``) batches of ``data.train_split`` for this host."""
  cfg = DataConfig.from_config(data_cfg)
  process_index, process_count = _process_layout(process_index, process_count)
  per_host_batch_size(cfg.global_batch_size, process_count)  # fail before any I/O
  source = load_source(cfg.name, cfg.train_split, cfg.data_dir, cfg.text_key)
  return LMBatchIterator(
    source,
    seq_len=cfg.seq_len,
    global_batch_size=cfg.global_batch_size,
    seed=cfg.seed,
    shuffle=cfg.shuffle,
    process_index=process_index,
    process_count=process_count,
    repeat=True,
    text_key=cfg.text_key,
    tokenizer=load_tokenizer(cfg.tokenizer),
    num_tasks=cfg.num_tasks,
  )


def make_eval_iterator(
  data_cfg: Any, process_index: int | None = None, process_count: int | None = None
) -> LMBatchIterator:
  """One in-order pass over ``data.eval_split`` for this host; last batch mask-padded.

  Call again for every evaluation: each call starts from the beginning of the split.
  """
  cfg = DataConfig.from_config(data_cfg)
  process_index, process_count = _process_layout(process_index, process_count)
  per_host_batch_size(cfg.global_batch_size, process_count)
  source = load_source(cfg.name, cfg.eval_split, cfg.data_dir, cfg.text_key)
  return LMBatchIterator(
    source,
    seq_len=cfg.seq_len,
    global_batch_size=cfg.global_batch_size,
    seed=cfg.seed,
    shuffle=False,
    process_index=process_index,
    process_count=process_count,
    repeat=False,
    text_key=cfg.text_key,
    tokenizer=load_tokenizer(cfg.tokenizer),
    num_tasks=cfg.num_tasks,
  )
