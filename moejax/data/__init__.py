"""Input pipeline: tokenizers, the synthetic TFDS corpus, user text as TFDS, packed
resumable batches."""

from moejax.config import DataConfig, default_data_config
from moejax.data.pipeline import (
  TINY_CORPUS,
  LMBatchIterator,
  default_data_dir,
  host_document_order,
  load_source,
  make_eval_iterator,
  make_train_iterator,
  per_host_batch_size,
)
from moejax.data.tiny_corpus import (
  MoejaxTinyCorpus,
  generate_document,
  generate_documents,
  prepare_tiny_corpus,
)
from moejax.data.tokenizer import (
  BOS_ID,
  EOS_ID,
  PAD_ID,
  VOCAB_SIZE,
  ByteTokenizer,
  HFTokenizer,
  SentencePieceTokenizer,
  load_tokenizer,
)

__all__ = [
  "BOS_ID",
  "EOS_ID",
  "PAD_ID",
  "VOCAB_SIZE",
  "TINY_CORPUS",
  "ByteTokenizer",
  "HFTokenizer",
  "SentencePieceTokenizer",
  "load_tokenizer",
  "LMBatchIterator",
  "MoejaxTinyCorpus",
  "default_data_config",
  "default_data_dir",
  "generate_document",
  "generate_documents",
  "host_document_order",
  "load_source",
  "make_eval_iterator",
  "make_train_iterator",
  "per_host_batch_size",
  "prepare_tiny_corpus",
  "DataConfig",
]
