"""Tests of moejax.data: tokenizer, synthetic TFDS corpus, packed resumable batches."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from moejax.data import (
  BOS_ID,
  EOS_ID,
  PAD_ID,
  ByteTokenizer,
  LMBatchIterator,
  default_data_config,
  generate_document,
  generate_documents,
  host_document_order,
  load_source,
  make_eval_iterator,
  make_train_iterator,
  tiny_corpus,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = ByteTokenizer()


def _fake_source(num_docs: int, seed: int = 0) -> list[dict[str, bytes]]:
  """Unique documents of varied length (2..40 bytes), as a TFDS source returns them."""
  rng = np.random.default_rng(seed)
  return [{"text": f"d{i}:{'x' * int(rng.integers(0, 36))}".encode()} for i in range(num_docs)]


def _stream(source, order) -> np.ndarray:
  """The expected token stream: documents in ``order``, each as [bos] + bytes + [eos]."""
  return np.concatenate([TOK.encode_document(source[int(i)]["text"]) for i in order])


def _rows(batch) -> np.ndarray:
  """Rebuilds the [B, L + 1] rows a batch was cut from."""
  return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def _real_tokens(batches) -> np.ndarray:
  """All tokens of a finite pass, in order, without the padding at its end."""
  flat = np.concatenate([_rows(b).reshape(-1) for b in batches])
  num_real = int(np.max(np.nonzero(flat != PAD_ID)[0])) + 1  # real ids are never PAD_ID
  assert np.all(flat[:num_real] != PAD_ID)
  return flat[:num_real]


def _documents_in(tokens: np.ndarray) -> list[str]:
  """Splits a stream back into document texts (checks the bos ... eos framing)."""
  docs, start = [], None
  for i, t in enumerate(tokens.tolist()):
    if t == BOS_ID:
      assert start is None, "bos inside a document"
      start = i + 1
    elif t == EOS_ID:
      assert start is not None, "eos without bos"
      docs.append(TOK.decode(tokens[start:i]))
      start = None
  assert start is None, "stream ends inside a document"
  return docs


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      assert x[k].dtype == y[k].dtype
      np.testing.assert_array_equal(x[k], y[k])


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", ["", "hello, world.", "3 plus 4 is 7.", "héllo ✓ 日本語 🙂"])
def test_tokenizer_round_trip(text):
  ids = TOK.encode(text)
  assert ids == [b + 3 for b in text.encode("utf-8")]
  assert all(3 <= i < TOK.vocab_size for i in ids)
  assert TOK.decode(ids) == text
  doc = TOK.encode_document(text)
  assert doc.dtype == np.int32
  assert doc.tolist() == [BOS_ID] + ids + [EOS_ID]
  assert TOK.decode(doc) == text


def test_tokenizer_specials_and_bad_ids():
  assert (TOK.vocab_size, TOK.pad_id, TOK.bos_id, TOK.eos_id) == (259, 0, 1, 2)
  assert TOK.encode("a") == [ord("a") + 3]
  # Specials and out-of-range ids are dropped; a truncated UTF-8 sequence is replaced.
  assert TOK.decode([BOS_ID, 100, PAD_ID, 101, EOS_ID, 300]) == "ab"
  assert TOK.decode(TOK.encode("é")[:1]) == "\ufffd"


# ----------------------------------------------------------------------------- corpus


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  """A data_dir where moejax_tiny_corpus was prepared with all network access blocked."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))

  def no_network(*args, **kwargs):
    raise AssertionError(f"network access while preparing: {args}")

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, "connect", no_network)
    mp.setattr(socket, "create_connection", no_network)
    start = time.perf_counter()
    load_source("moejax_tiny_corpus", "train", data_dir)
    assert time.perf_counter() - start < 10.0
  return data_dir


def test_tiny_corpus_prepares_offline(tiny_dir):
  assert "tensorflow" not in sys.modules
  for split, size in tiny_corpus.SPLIT_SIZES.items():
    source = load_source("moejax_tiny_corpus", split, tiny_dir)
    assert len(source) == size > 0
    for i in (0, size // 2, size - 1):  # stored in generation order
      assert source[i]["text"].decode() == generate_document(split, i)
  files = [os.path.join(r, f) for r, _, fs in os.walk(tiny_dir) for f in fs]
  records = [f for f in files if ".array_record-" in f]
  assert len(records) == 2
  assert sum(os.path.getsize(f) for f in files) < 5_000_000


def test_tiny_corpus_prepare_is_idempotent(tiny_dir):
  record = next(
    os.path.join(r, f) for r, _, fs in os.walk(tiny_dir) for f in fs if "train.array_record" in f
  )
  before = os.stat(record).st_mtime_ns
  load_source("moejax_tiny_corpus", "validation", tiny_dir)
  assert os.stat(record).st_mtime_ns == before


def test_concurrent_prepare_in_two_processes(tmp_path):
  code = (
    "import sys; from moejax.data import load_source; "
    "print(len(load_source('moejax_tiny_corpus', 'validation', sys.argv[1])))"
  )
  env = {**os.environ, "PYTHONPATH": REPO_ROOT}
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", code, str(tmp_path)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for _ in range(2)
  ]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
    assert out.strip().splitlines()[-1] == str(tiny_corpus.SPLIT_SIZES["validation"])
  assert not [d for d in os.listdir(tmp_path / "moejax_tiny_corpus") if "incomplete" in d]


def test_generation_is_deterministic_and_facts_are_true():
  docs = generate_documents("validation")
  assert docs == generate_documents("validation")
  assert docs != generate_documents("train", len(docs))
  assert len(set(docs)) == len(docs)
  text = " ".join(docs)
  facts = re.findall(r"(?<![\w,:]) ?(\d+) (plus|minus|times) (\d+) is (\d+)\.", text)
  assert len(facts) > 50
  ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
  for a, op, b, c in facts:
    assert ops[op](int(a), int(b)) == int(c), (a, op, b, c)
  for doc in docs:  # every key/value question is answered with the stated value
    stated = dict(re.findall(r"the color of the (\w+) is (\w+)\.", doc))
    for key, value in re.findall(r"what is the color of the (\w+)\? answer: (\w+)\.", doc):
      assert stated[key] == value


def test_real_corpus_batches_and_speed(tiny_dir):
  cfg = default_data_config()
  cfg.data_dir = tiny_dir
  it = make_train_iterator(cfg, process_index=0, process_count=1)
  next(it)
  start = time.perf_counter()
  batches = [next(it) for _ in range(50)]
  assert (time.perf_counter() - start) / 50 < 0.010
  for b in batches:
    assert b["inputs"].shape == b["targets"].shape == b["mask"].shape == (16, 128)
    assert (b["inputs"].dtype, b["targets"].dtype, b["mask"].dtype) == (
      np.int32,
      np.int32,
      np.float32,
    )
    assert np.all(b["mask"] == 1.0)  # training batches are fully packed
  ev = list(make_eval_iterator(cfg, process_index=1, process_count=2))
  assert all(b["inputs"].shape == (8, 128) for b in ev)
  docs = set(_documents_in(_real_tokens(ev)))
  assert docs == set(generate_documents("validation")[1::2])  # in-order host shard


# ----------------------------------------------------------------------------- iterator


def test_batches_are_the_packed_stream_shifted_by_one():
  source = _fake_source(30)
  it = LMBatchIterator(source, seq_len=7, global_batch_size=3, shuffle=False)
  batches = [next(it) for _ in range(6)]
  stream = _stream(source, range(30))
  for k, b in enumerate(batches):
    assert b["inputs"].shape == b["targets"].shape == b["mask"].shape == (3, 7)
    rows = stream[k * 24 : (k + 1) * 24].reshape(3, 8)
    np.testing.assert_array_equal(b["inputs"], rows[:, :-1])
    np.testing.assert_array_equal(b["targets"], rows[:, 1:])
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    np.testing.assert_array_equal(b["mask"], np.ones((3, 7), np.float32))


def test_eval_pass_stops_and_masks_padding():
  source = _fake_source(11)
  stream = _stream(source, range(11))
  it = LMBatchIterator(source, seq_len=5, global_batch_size=4, shuffle=False, repeat=False)
  batches = list(it)
  assert len(batches) == -(-len(stream) // 24)
  with pytest.raises(StopIteration):
    next(it)
  rows = np.concatenate([_rows(b) for b in batches]).reshape(-1)
  np.testing.assert_array_equal(rows[: len(stream)], stream)
  assert np.all(rows[len(stream) :] == PAD_ID)
  mask = np.concatenate([b["mask"] for b in batches]).reshape(-1, 5)
  targets_real = np.arange(rows.size).reshape(-1, 6)[:, 1:] < len(stream)
  np.testing.assert_array_equal(mask, targets_real.astype(np.float32))
  assert 0 < mask.sum() < mask.size


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, 8, 13])
def test_exact_resume_including_across_epochs(k):
  # 7 short documents (~170 tokens) and 2 x 9 = 18 tokens per batch: an epoch ends about
  # every 9-10 batches, so the 12 resumed batches after step k cross at least one.
  source = _fake_source(7, seed=1)
  kwargs = dict(seq_len=8, global_batch_size=2, seed=3, shuffle=True)
  it = LMBatchIterator(source, **kwargs)
  for _ in range(k):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(12)]
  assert it.get_state()["epoch"] > state["epoch"]
  fresh = LMBatchIterator(source, **kwargs)
  fresh.set_state(state)
  _assert_batches_equal([next(fresh) for _ in range(12)], expected)


def test_resume_of_a_finished_eval_pass_stays_finished():
  source = _fake_source(5)
  it = LMBatchIterator(source, seq_len=4, global_batch_size=2, repeat=False)
  first = next(it)
  mid = it.get_state()
  rest = list(it)
  fresh = LMBatchIterator(source, seq_len=4, global_batch_size=2, repeat=False)
  fresh.set_state(mid)
  _assert_batches_equal(list(fresh), rest)
  fresh.set_state(it.get_state())
  assert list(fresh) == []
  assert first["inputs"].shape == (2, 4)


def test_set_state_rejects_a_state_of_another_stream():
  source = _fake_source(9)
  state = LMBatchIterator(source, seq_len=4, global_batch_size=2, seed=1).get_state()
  for other in (dict(seed=2), dict(shuffle=False), dict(process_index=1, process_count=2)):
    it = LMBatchIterator(source, seq_len=4, global_batch_size=2, **{"seed": 1, **other})
    with pytest.raises(ValueError, match="does not match"):
      it.set_state(state)
  it = LMBatchIterator(source, seq_len=4, global_batch_size=2, seed=1)
  with pytest.raises(ValueError, match="past the data"):
    it.set_state({**state, "offset": 10_000})


def test_two_hosts_read_disjoint_documents_covering_the_epoch():
  source = _fake_source(23)
  everything = {d["text"].decode() for d in source}
  for epoch in (0, 1):
    orders = [
      host_document_order(23, seed=5, epoch=epoch, shuffle=True, process_index=p, process_count=2)
      for p in (0, 1)
    ]
    assert (len(orders[0]), len(orders[1])) == (12, 11)
    assert not set(orders[0].tolist()) & set(orders[1].tolist())
    assert sorted(np.concatenate(orders).tolist()) == list(range(23))
  # The same through the iterators' token streams (one pass each).
  host_docs = []
  for p in (0, 1):
    it = LMBatchIterator(
      source,
      seq_len=6,
      global_batch_size=4,
      seed=5,
      shuffle=True,
      process_index=p,
      process_count=2,
      repeat=False,
    )
    batches = list(it)
    assert all(b["inputs"].shape == (2, 6) for b in batches)
    host_docs.append(_documents_in(_real_tokens(batches)))
  assert not set(host_docs[0]) & set(host_docs[1])
  assert set(host_docs[0]) | set(host_docs[1]) == everything
  assert len(host_docs[0]) + len(host_docs[1]) == 23


def test_epochs_have_different_orders_only_when_shuffling():
  source = _fake_source(40)
  stream_len = len(_stream(source, range(40)))
  for shuffle in (True, False):
    it = LMBatchIterator(source, seq_len=9, global_batch_size=1, seed=0, shuffle=shuffle)
    rows = np.concatenate([_rows(next(it)).reshape(-1) for _ in range(2 * stream_len // 10 + 2)])
    epoch0, epoch1 = rows[:stream_len], rows[stream_len : 2 * stream_len]
    assert sorted(_documents_in(epoch0)) == sorted(_documents_in(epoch1))
    assert (_documents_in(epoch0) != _documents_in(epoch1)) == shuffle
  orders = [
    host_document_order(40, seed=0, epoch=e, shuffle=True, process_index=0, process_count=1)
    for e in (0, 1)
  ]
  assert orders[0].tolist() != orders[1].tolist()
  other_seed = host_document_order(
    40, seed=1, epoch=0, shuffle=True, process_index=0, process_count=1
  )
  assert other_seed.tolist() != orders[0].tolist()


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
  "field,value",
  [
    ("seq_len", -3),
    ("seq_len", 0),
    ("seq_len", 2.5),
    ("global_batch_size", 0),
    ("seed", -1),
    ("shuffle", "yes"),
    ("name", ""),
    ("seqlen", 64),
  ],
)
def test_bad_config_values_name_the_field(tmp_path, field, value):
  cfg = default_data_config().to_dict()
  cfg["data_dir"] = str(tmp_path)
  cfg[field] = value
  with pytest.raises(ValueError, match=rf"data\.{field}\b"):
    make_train_iterator(cfg, process_index=0, process_count=1)
  assert not os.listdir(tmp_path)  # rejected before touching the data


def test_global_batch_size_must_divide_over_hosts(tmp_path):
  cfg = default_data_config()
  cfg.data_dir = str(tmp_path)
  cfg.global_batch_size = 10
  with pytest.raises(ValueError, match=r"data\.global_batch_size.*divisible"):
    make_train_iterator(cfg, process_index=0, process_count=4)
  with pytest.raises(ValueError, match=r"data\.global_batch_size"):
    LMBatchIterator(_fake_source(4), seq_len=4, global_batch_size=3, process_count=2)


def test_unknown_or_unprepared_tfds_datasets_give_clear_errors(tmp_path):
  with pytest.raises(ValueError, match=r"data\.name='no_such_dataset_xyz'"):
    load_source("no_such_dataset_xyz", "train", str(tmp_path))
  with pytest.raises(ValueError, match=r"data\.name='mnist' is not prepared.*array_record"):
    load_source("mnist", "train", str(tmp_path))


def test_bad_split_or_text_key_give_clear_errors(tiny_dir):
  with pytest.raises(ValueError, match=r"no split 'test'"):
    load_source("moejax_tiny_corpus", "test", tiny_dir)
  with pytest.raises(ValueError, match=r"data\.text_key"):
    load_source("moejax_tiny_corpus", "train", tiny_dir, text_key="content")


# ----------------------------------------------------------------------------- user text files


def _write_user_files(root) -> list[str]:
  """A .txt (blank-line separated documents) and a .jsonl.gz; returns the documents in order."""
  import gzip

  txt = ["first document.\nstill the first.", "second document.", "third, after two blanks."]
  (root / "a.txt").write_text("\n\n".join(txt[:2]) + "\n\n\n" + txt[2] + "\n")
  jsonl = [f"json document {i}: " + "words " * i for i in range(30)]
  with gzip.open(root / "b.jsonl.gz", "wt") as f:
    for i, text in enumerate(jsonl):
      f.write(json.dumps({"body": text, "id": i}) + "\n")
  return txt + jsonl


def test_prepare_user_files_builds_a_tfds_dataset_training_reads(tmp_path):
  from moejax.data.prepare import is_validation
  from moejax.data.prepare import main as prepare_main

  docs = _write_user_files(tmp_path)
  data_dir = str(tmp_path / "tfds")
  argv = ["--files", f"{tmp_path}/*.txt,{tmp_path}/*.gz", "--name", "my_text", "--data_dir"]
  argv += [data_dir, "--text_field", "body", "--validation_fraction", "0.1", "--no_progress"]
  assert prepare_main(argv) == 0
  val = [d for i, d in enumerate(docs) if is_validation(i, len(docs), 0.1)]
  train = [d for i, d in enumerate(docs) if not is_validation(i, len(docs), 0.1)]
  assert len(val) == 3  # floor(33 * 0.1), spread over the files
  assert [x["text"].decode() for x in load_source("my_text", "validation", data_dir)] == val
  assert [x["text"].decode() for x in load_source("my_text", "train", data_dir)] == train
  assert prepare_main(argv) == 2  # exists: refuses without --overwrite
  # Training takes data.name / data.data_dir like any TFDS dataset, and resumes exactly.
  cfg = default_data_config()
  cfg.name, cfg.data_dir, cfg.seq_len, cfg.global_batch_size = "my_text", data_dir, 16, 2
  it = make_train_iterator(cfg, 0, 1)
  [next(it) for _ in range(5)]
  state = it.get_state()
  expected = [next(it)["inputs"] for _ in range(6)]  # crosses into the next epoch
  resumed = make_train_iterator(cfg, 0, 1)
  resumed.set_state(state)
  np.testing.assert_array_equal(
    np.stack(expected), np.stack([next(resumed)["inputs"] for _ in range(6)])
  )
  text = TOK.decode(np.concatenate([_rows(next(make_train_iterator(cfg, 0, 1)))]).ravel())
  assert any(d[:10] in text for d in train) and not any(d in text for d in val)


def test_prepare_without_arguments_still_builds_the_tiny_corpus(tmp_path, capsys):
  from moejax.data.prepare import main as prepare_main

  assert prepare_main(["--data_dir", str(tmp_path)]) == 0
  assert "moejax_tiny_corpus ready" in capsys.readouterr().out
