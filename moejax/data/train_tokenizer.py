"""Trains a tokenizer on your text files (``moejax.data.text_files``), offline.

  python -m moejax.data.train_tokenizer --files 'GLOB' --out PATH --vocab_size 8000 \
      [--kind sentencepiece|bpe] [--text_field text] [--max_documents N]

sentencepiece: a unigram SentencePiece model (Kudo & Richardson, 2018) with byte fallback,
written to ``PATH.model``; bpe: a byte-level BPE (Sennrich et al., 2016; GPT-2's byte
alphabet) ``tokenizers`` file ``PATH/tokenizer.json``. Both reserve pad = 0, bos = 1,
eos = 2 (and SentencePiece unk = 3). Use the result as ``--config.data.tokenizer=...``
with ``--config.model.vocab_size`` at least the printed vocabulary size.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Iterator

from moejax.data.text_files import expand_files, iter_documents
from moejax.data.tokenizer import load_tokenizer

KINDS = ("sentencepiece", "bpe")


def train_sentencepiece(texts: Iterator[str], out: str, vocab_size: int) -> str:
  """Writes ``out.model`` (and ``out.vocab``); returns the model path."""
  import sentencepiece as spm

  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  spm.SentencePieceTrainer.train(
    sentence_iterator=texts,
    model_prefix=out,
    vocab_size=vocab_size,
    model_type="unigram",
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
    byte_fallback=True,
    hard_vocab_limit=False,
    max_sentence_length=1 << 16,
    minloglevel=2,
  )
  return out + ".model"


def train_bpe(texts: Iterator[str], out: str, vocab_size: int) -> str:
  """Writes ``out/tokenizer.json`` (+ tokenizer_config.json naming the specials)."""
  import json

  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = ["<pad>", "<s>", "</s>"]
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=specials,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer)
  os.makedirs(out, exist_ok=True)
  tok.save(os.path.join(out, "tokenizer.json"))
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}, f, indent=2)
  return out


def train_tokenizer(
  files: list[str],
  out: str,
  vocab_size: int,
  kind: str = "sentencepiece",
  text_field: str = "text",
  max_documents: int | None = None,
) -> str:
  """Trains a `kind` tokenizer on the documents of `files`; returns the data.tokenizer path."""
  if kind not in KINDS:
    raise ValueError(f"--kind {kind!r}: expected one of {KINDS}")
  texts = itertools.islice(iter_documents(files, text_field), max_documents)
  train = train_sentencepiece if kind == "sentencepiece" else train_bpe
  return train(texts, out, vocab_size)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--files", required=True, help="Glob(s), comma-separated.")
  parser.add_argument("--out", required=True, help="Output prefix (sentencepiece) or directory.")
  parser.add_argument("--vocab_size", type=int, default=8000)
  parser.add_argument("--kind", choices=KINDS, default="sentencepiece")
  parser.add_argument("--text_field", default="text")
  parser.add_argument("--max_documents", type=int, default=None)
  args = parser.parse_args(argv)
  try:
    path = train_tokenizer(
      expand_files(args.files),
      args.out,
      args.vocab_size,
      args.kind,
      args.text_field,
      args.max_documents,
    )
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  tok = load_tokenizer(path)
  print(
    f"wrote {path}: vocab_size {tok.vocab_size} (pad {tok.pad_id}, bos {tok.bos_id}, "
    f"eos {tok.eos_id}); train with --config.data.tokenizer={path} "
    f"--config.model.vocab_size={tok.vocab_size}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
