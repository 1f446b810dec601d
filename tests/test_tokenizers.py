"""Tokenizers (data.tokenizer): SentencePiece and HF tokenizer.json files trained here,
their special ids, the vocab_size check, and the pipeline using them."""

import json

import numpy as np
import pytest

from moejax.config import ExperimentConfig, base_config
from moejax.data import LMBatchIterator, generate_documents
from moejax.data.tokenizer import (
  ByteTokenizer,
  HFTokenizer,
  SentencePieceTokenizer,
  load_tokenizer,
  token_byte_lengths,
)
from moejax.data.train_tokenizer import main as train_main
from moejax.errors import ConfigError

TEXT = "the cat sees 3 apples. unicode: ünï ✓"


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("text") / "docs.jsonl"
  with open(path, "w") as f:
    for doc in generate_documents("validation"):
      f.write(json.dumps({"text": doc}) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def trained(corpus_file, tmp_path_factory) -> dict[str, str]:
  """A SentencePiece model and a byte-level BPE tokenizer.json, trained by the CLI."""
  out = tmp_path_factory.mktemp("tok")
  assert train_main(["--files", corpus_file, "--out", str(out / "sp"), "--vocab_size", "400"]) == 0
  args = ["--files", corpus_file, "--out", str(out / "bpe"), "--vocab_size", "400", "--kind", "bpe"]
  assert train_main(args) == 0
  return {"sentencepiece": str(out / "sp.model"), "bpe": str(out / "bpe")}


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_trained_tokenizers_round_trip_with_their_special_ids(trained, kind):
  tok = load_tokenizer(trained[kind])
  assert isinstance(tok, SentencePieceTokenizer if kind == "sentencepiece" else HFTokenizer)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert 259 <= tok.vocab_size <= 400
  doc = tok.encode_document(TEXT)
  assert doc.dtype == np.int32 and doc[0] == 1 and doc[-1] == 2
  assert len(doc) < len(TEXT.encode()) + 2  # merges: fewer tokens than bytes
  assert tok.decode(doc) == TEXT  # specials are dropped; byte fallback keeps the unicode
  lengths = token_byte_lengths(tok)
  assert lengths.shape == (tok.vocab_size,) and lengths[[0, 1, 2]].sum() == 0
  if kind == "sentencepiece":  # pieces spell the text: their bytes add up (+ the '▁' prefix)
    assert lengths[doc[1:-1]].sum() == len(TEXT.encode()) + 1


def test_byte_tokenizer_is_the_default_and_counts_one_byte_per_token():
  tok = load_tokenizer("byte")
  assert isinstance(tok, ByteTokenizer)
  ids = tok.encode_document(TEXT)
  assert token_byte_lengths(tok)[ids].sum() == len(TEXT.encode())


def test_hf_tokenizer_directory_and_file_agree(trained):
  a, b = load_tokenizer(trained["bpe"]), load_tokenizer(trained["bpe"] + "/tokenizer.json")
  assert a.encode(TEXT) == b.encode(TEXT) and a.eos_id == b.eos_id


def test_vocab_size_is_checked_against_the_tokenizer(trained):
  cfg = base_config()
  with cfg.unlocked():
    cfg.data.tokenizer = trained["sentencepiece"]
    cfg.model.vocab_size = 259
  vocab = load_tokenizer(trained["sentencepiece"]).vocab_size
  with pytest.raises(ConfigError, match=rf"model\.vocab_size.*{vocab}.*data\.tokenizer"):
    ExperimentConfig.from_config(cfg)
  with cfg.unlocked():
    cfg.model.vocab_size = vocab
  assert ExperimentConfig.from_config(cfg).data.tokenizer == trained["sentencepiece"]


def test_a_missing_tokenizer_names_the_field(tmp_path):
  with pytest.raises(ConfigError, match=r"data\.tokenizer"):
    load_tokenizer(str(tmp_path / "nope.model"))


def test_pipeline_tokenizes_with_the_tokenizer_and_resumes_exactly(trained):
  tok = load_tokenizer(trained["sentencepiece"])
  source = [{"text": d.encode()} for d in generate_documents("validation", 40)]
  make = lambda: LMBatchIterator(source, seq_len=16, global_batch_size=2, seed=3, tokenizer=tok)
  it = make()
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = make()
  resumed.set_state(json.loads(json.dumps(state)))
  for a, b in zip(expected, [next(resumed) for _ in range(4)]):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  # The stream is the documents' SentencePiece ids, in this epoch's order.
  stream = np.concatenate([_rows_flat(b) for b in first])
  order = np.random.default_rng([3, 0]).permutation(len(source))
  want = np.concatenate([tok.encode_document(source[i]["text"]) for i in order])
  np.testing.assert_array_equal(stream, want[: len(stream)])


def _rows_flat(batch) -> np.ndarray:
  return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1).ravel()
