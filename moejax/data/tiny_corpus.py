"""``moejax_tiny_corpus``: a small synthetic English-like corpus, generated offline.

Every document is drawn from a small probabilistic grammar with structure a tiny LM can
pick up within ~100 steps: subject-verb agreement, counting sequences, correct
arithmetic and comparison facts, copy tasks, little stories whose final number follows
from the earlier ones, and key/value facts stated at the top of a document and queried
at its bottom. Generation is deterministic: document ``i`` of a split depends only on
(``CORPUS_SEED``, split, ``i``), never on the machine or on the generation order.

The TFDS builder writes ``array_record`` files (no TensorFlow needed) that are read back
with random access through ``builder.as_data_source(split)``. Prefer
:func:`moejax.data.pipeline.load_source`, which prepares it once under a file lock.
"""

from __future__ import annotations

import fcntl
import os
from typing import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

CORPUS_SEED = 20240611
SPLIT_SIZES = {"train": 4000, "validation": 200}
_SPLIT_IDS = {"train": 0, "validation": 1}

_NUMBER_WORDS = (
  "zero",
  "one",
  "two",
  "three",
  "four",
  "five",
  "six",
  "seven",
  "eight",
  "nine",
  "ten",
  "eleven",
  "twelve",
)
_NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy")
# (singular, plural)
_ANIMATE = (
  ("cat", "cats"),
  ("dog", "dogs"),
  ("bird", "birds"),
  ("fox", "foxes"),
  ("child", "children"),
  ("robot", "robots"),
  ("farmer", "farmers"),
  ("teacher", "teachers"),
  ("mouse", "mice"),
  ("sheep", "sheep"),
)
_OBJECTS = (
  ("apple", "apples"),
  ("ball", "balls"),
  ("book", "books"),
  ("stone", "stones"),
  ("box", "boxes"),
  ("cake", "cakes"),
  ("key", "keys"),
  ("boat", "boats"),
  ("cup", "cups"),
  ("hat", "hats"),
)
# (third person singular, plural)
_VERBS = (
  ("sees", "see"),
  ("chases", "chase"),
  ("likes", "like"),
  ("finds", "find"),
  ("carries", "carry"),
  ("paints", "paint"),
  ("watches", "watch"),
  ("pushes", "push"),
)
_ADJECTIVES = ("small", "big", "red", "blue", "green", "old", "young", "quiet", "happy", "tall")
_PLACES = (
  "in the garden",
  "near the river",
  "under the table",
  "on the hill",
  "at school",
  "in the kitchen",
  "by the sea",
)
_COLORS = ("red", "blue", "green", "yellow", "black", "white", "purple", "orange")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"

Sentence = Callable[[np.random.Generator], str]


def _pick(rng: np.random.Generator, options):
  """A uniformly random element of a sequence."""
  return options[int(rng.integers(len(options)))]


def _noun_phrase(rng: np.random.Generator, nouns) -> tuple[str, bool]:
  """'the big dog' or 'three dogs'; returns (phrase, is_plural)."""
  sg, pl = _pick(rng, nouns)
  adj = f"{_pick(rng, _ADJECTIVES)} " if rng.random() < 0.5 else ""
  if rng.random() < 0.6:
    return f"the {adj}{sg}", False
  return f"{_NUMBER_WORDS[int(rng.integers(2, 13))]} {adj}{pl}", True


def svo_sentence(rng: np.random.Generator) -> str:
  """Subject-verb-object with number agreement: 'two red foxes chase the ball.'"""
  subject, plural = _noun_phrase(rng, _ANIMATE)
  verb = _pick(rng, _VERBS)[1 if plural else 0]
  obj, _ = _noun_phrase(rng, _OBJECTS if rng.random() < 0.7 else _ANIMATE)
  place = f" {_pick(rng, _PLACES)}" if rng.random() < 0.4 else ""
  return f"{subject} {verb} {obj}{place}."


def arithmetic_sentence(rng: np.random.Generator) -> str:
  """A true fact: '3 plus 4 is 7.', '9 minus 5 is 4.', '2 times 6 is 12.'"""
  a, b = (int(x) for x in rng.integers(0, 10, size=2))
  op = int(rng.integers(3))
  if op == 0:
    return f"{a} plus {b} is {a + b}."
  if op == 1:
    a, b = max(a, b), min(a, b)
    return f"{a} minus {b} is {a - b}."
  return f"{a} times {b} is {a * b}."


def comparison_sentence(rng: np.random.Generator) -> str:
  """A true comparison: '9 is bigger than 4.'"""
  a, b = (int(x) for x in rng.choice(20, size=2, replace=False))
  return f"{a} is {'bigger' if a > b else 'smaller'} than {b}."


def counting_sentence(rng: np.random.Generator) -> str:
  """'counting by 2 from 6: 6, 8, 10, 12.' or 'one, two, three, four.'"""
  length = int(rng.integers(4, 9))
  if rng.random() < 0.3:
    start = int(rng.integers(0, len(_NUMBER_WORDS) - length + 1))
    return ", ".join(_NUMBER_WORDS[start : start + length]) + "."
  start, step = int(rng.integers(0, 50)), int(rng.integers(1, 4))
  seq = ", ".join(str(start + step * i) for i in range(length))
  return f"counting by {step} from {start}: {seq}."


def letters_sentence(rng: np.random.Generator) -> str:
  """'letters from d: d e f g h.'"""
  length = int(rng.integers(4, 9))
  start = int(rng.integers(0, len(_LETTERS) - length + 1))
  return f"letters from {_LETTERS[start]}: {' '.join(_LETTERS[start : start + length])}."


def copy_sentence(rng: np.random.Generator) -> str:
  """'say it twice: the old cat. the old cat.'"""
  phrase, _ = _noun_phrase(rng, _ANIMATE if rng.random() < 0.5 else _OBJECTS)
  return f"say it twice: {phrase}. {phrase}."


def story_sentences(rng: np.random.Generator) -> str:
  """'bob has 3 cakes. erin gives bob 4 more. now bob has 7 cakes.'"""
  giver, taker = (str(x) for x in rng.choice(_NAMES, size=2, replace=False))
  _, things = _pick(rng, _OBJECTS)
  a, b = (int(x) for x in rng.integers(1, 10, size=2))
  if rng.random() < 0.5:
    return (
      f"{taker} has {a} {things}. {giver} gives {taker} {b} more. now {taker} has {a + b} {things}."
    )
  a, b = max(a, b), min(a, b)
  return (
    f"{taker} has {a} {things}. {taker} gives {giver} {b} of them. "
    f"now {taker} has {a - b} {things}."
  )


_SENTENCES: tuple[Sentence, ...] = (
  svo_sentence,
  svo_sentence,
  svo_sentence,
  arithmetic_sentence,
  arithmetic_sentence,
  comparison_sentence,
  counting_sentence,
  letters_sentence,
  copy_sentence,
  story_sentences,
)


def generate_document(split: str, index: int) -> str:
  """Document ``index`` of ``split``: one paragraph, optionally with key/value recall.

  With probability 1/2 the paragraph opens with 2-4 facts ('the color of the box is
  red.') and closes with a question about each of them ('question: what is the color
  of the box? answer: red.').
  """
  rng = np.random.default_rng([CORPUS_SEED, _SPLIT_IDS[split], index])
  body = [_pick(rng, _SENTENCES)(rng) for _ in range(int(rng.integers(3, 11)))]
  if rng.random() < 0.5:
    return " ".join(body)
  num_facts = int(rng.integers(2, 5))
  keys = [_OBJECTS[int(i)][0] for i in rng.choice(len(_OBJECTS), num_facts, replace=False)]
  colors = [_pick(rng, _COLORS) for _ in keys]
  facts = [f"the color of the {k} is {c}." for k, c in zip(keys, colors)]
  order = rng.permutation(num_facts)
  questions = [f"question: what is the color of the {keys[i]}? answer: {colors[i]}." for i in order]
  return " ".join(facts + body + questions)


def generate_documents(split: str, num_docs: int | None = None) -> list[str]:
  """The first ``num_docs`` (default: all ``SPLIT_SIZES[split]``) documents of a split."""
  if split not in SPLIT_SIZES:
    raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SIZES)}")
  n = SPLIT_SIZES[split] if num_docs is None else num_docs
  return [generate_document(split, i) for i in range(n)]


class MoejaxTinyCorpus(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of the synthetic ``moejax_tiny_corpus`` (feature: ``text``)."""

  VERSION = tfds.core.Version("1.0.0")
  # TFDS derives this from the package via `importlib_resources`, which is not installed
  # (and not otherwise needed); the module file is what it would find anyway.
  code_path = epath.Path(__file__)
  RELEASE_NOTES = {"1.0.0": "Initial release: 4000 train and 200 validation documents."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
      supervised_keys=None,
      # Keep example i at index i, so the data source matches generate_documents().
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Everything is generated locally; nothing is downloaded.
    return {split: self._generate_examples(split) for split in SPLIT_SIZES}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, str]]]:
    for i, text in enumerate(generate_documents(split)):
      yield i, {"text": text}


def prepare_tiny_corpus(data_dir: str) -> MoejaxTinyCorpus:
  """Returns the builder of the corpus in ``data_dir``, preparing it first if needed.

  Idempotent and safe when several processes on machines sharing ``data_dir`` race: the
  check-and-prepare runs under an exclusive ``fcntl.flock`` on
  ``<data_dir>/moejax_tiny_corpus.lock``, so exactly one process writes the files and
  the others wait, then reuse them. (``data_dir`` must be a local or POSIX-locking
  network path; for object stores, prepare once ahead of time with
  ``python -m moejax.data.prepare --data_dir=...``.)
  """
  data_dir = os.path.expanduser(data_dir)
  os.makedirs(data_dir, exist_ok=True)
  lock_path = os.path.join(data_dir, f"{MoejaxTinyCorpus.name}.lock")
  with open(lock_path, "a") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      # Built under the lock, so it sees files another process may have just written.
      builder = MoejaxTinyCorpus(data_dir=data_dir, file_format="array_record")
      if not builder.is_prepared():
        builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)
  return builder
