"""Data pipeline: sources, tokenizers, packing + segment ids, upsampling, sharding, iterator state."""

import json

import grain
import numpy as np
import pytest

from longgen_jax.data import pipeline as data
from longgen_jax.data.sources import SyntheticLongContextSource, open_source
from longgen_jax.data.tokenizer import ByteTokenizer, load_tokenizer
from longgen_jax.training import default_config

DOCS = ["a" * 5, "bb" * 10, "c" * 3, "dddd" * 30, "e" * 7, "f" * 50, "g" * 2, "h" * 90]


def _docs_ds(texts=DOCS):
  return data.tokenize(grain.MapDataset.source(texts), ByteTokenizer())


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_packing_bos_segments_positions_and_loss_mask():
  T = 16
  batches = _take(data.packed_batches(_docs_ds(), seq_len=T, batch_size=2, seed=0, shuffle=False,
                                      repeat=False), 4)
  tok = ByteTokenizer()
  for b in batches:
    assert all(v.shape == (2, T) for v in b.values())
    # targets are inputs shifted by one within the packed row
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    for r in range(2):
      seg, pos, inp, mask = b["segment_ids"][r], b["positions"][r], b["inputs"][r], b["loss_mask"][r]
      starts = np.flatnonzero(np.diff(seg)) + 1
      assert np.all(pos[starts] == 0) and pos[0] == 0
      assert np.all(np.diff(pos)[np.diff(seg) == 0] == 1)  # positions count up inside a segment
      # every document after the first in a row begins with BOS
      assert np.all(inp[starts] == tok.bos_id)
      # no loss where the target belongs to the next document
      assert np.all(mask[starts - 1] == 0)
  # nothing dropped: the rows' tokens (plus the one extra target per row) are the documents in order
  stream = np.concatenate([np.concatenate([b["inputs"][r], b["targets"][r, -1:]])
                           for b in batches for r in range(2)])
  expected = np.concatenate([np.concatenate([[tok.bos_id], tok.encode(t)]) for t in DOCS])
  np.testing.assert_array_equal(stream, expected[:len(stream)])


def test_upsampling_repeats_only_long_documents():
  ds = data.upsample_long_documents(_docs_ds(), min_tokens=40, factor=3)
  lengths = sorted(len(d["tokens"]) for d in ds.to_iter_dataset())
  base = sorted(len(t) + 1 for t in DOCS)
  long = [n for n in base if n >= 40]
  assert lengths == sorted(base + long * 2)


def test_shuffle_is_deterministic_from_seed_and_epochs_differ():
  docs = _docs_ds()
  a = _take(data.packed_batches(docs, seq_len=8, batch_size=2, seed=1), 12)
  b = _take(data.packed_batches(docs, seq_len=8, batch_size=2, seed=1), 12)
  c = _take(data.packed_batches(docs, seq_len=8, batch_size=2, seed=2), 12)
  np.testing.assert_array_equal(np.stack([x["inputs"] for x in a]), np.stack([x["inputs"] for x in b]))
  assert not np.array_equal(np.stack([x["inputs"] for x in a]), np.stack([x["inputs"] for x in c]))
  order = _epochs(docs, 2)
  assert sorted(order[:len(DOCS)]) == sorted(order[len(DOCS):])
  assert order[:len(DOCS)] != order[len(DOCS):]


def _epochs(docs, n):
  it = iter(docs.shuffle(seed=1).repeat().to_iter_dataset())
  return [int(next(it)["tokens"][1]) for _ in range(n * len(DOCS))]


def _cfg(**changes):
  c = default_config().data
  c.synthetic.num_docs, c.synthetic.max_chars, c.eval_docs, c.prefetch = 40, 400, 4, 0
  c.update(changes)
  return c


def test_per_host_shards_are_disjoint_and_cover_the_training_docs(tmp_path):
  (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"<{i:03d}>"}) + "\n" for i in range(40)))
  cfg = _cfg(source="jsonl", paths=str(tmp_path / "d.jsonl"))
  tok = ByteTokenizer()
  seen = []
  for i in range(2):
    train, _ = data.make_datasets(cfg, tok, seq_len=6 * 18 - 1, batch_size=1, seed=0, shard_index=i,
                                  shard_count=2)
    row = np.concatenate([next(iter(train))["inputs"][0], [tok.bos_id]])
    seen.append({tok.decode(row[j + 1:j + 6]) for j in np.flatnonzero(row == tok.bos_id)[:-1]})
  # 36 training docs (4 held out), 18 per host: one row of 18 docs is exactly one host's epoch
  assert len(seen[0]) == len(seen[1]) == 18 and not seen[0] & seen[1]
  docs = grain.MapDataset.range(10)
  assert sorted(list(data.shard(docs, 0, 3)) + list(data.shard(docs, 1, 3)) + list(data.shard(docs, 2, 3))) == list(range(10))
  with pytest.raises(ValueError, match="shard_index"):
    data.make_datasets(cfg, tok, seq_len=64, batch_size=1, seed=0, shard_index=2, shard_count=2)


def test_eval_docs_are_held_out():
  src = SyntheticLongContextSource(30, seed=0, max_chars=300)
  train, held = data.split_documents(grain.MapDataset.source(src), 5)
  assert len(held) == 5 and len(train) == 25
  assert not {held[i] for i in range(5)} & {train[i] for i in range(25)}


def _assert_resumes_through_json(dataset, skip: int, check: int):
  """After `skip` batches, the iterator state survives a JSON round trip: a fresh iterator set to it
  yields the next `check` batches exactly."""
  it = iter(dataset)
  _ = [next(it) for _ in range(skip)]
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(check)]
  it2 = iter(dataset)
  it2.set_state(state)
  for e in expected:
    got = next(it2)
    for k in e:
      np.testing.assert_array_equal(got[k], e[k])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_iterator_state_roundtrips_through_json(prefetch):
  train, _ = data.make_datasets(_cfg(prefetch=prefetch, upsample_factor=2, upsample_min_tokens=200),
                                ByteTokenizer(), seq_len=32, batch_size=2, seed=3, shard_index=0, shard_count=1)
  _assert_resumes_through_json(train, skip=7, check=5)


def test_synthetic_source_is_deterministic_and_has_an_answer():
  a, b = SyntheticLongContextSource(10, seed=7), SyntheticLongContextSource(10, seed=7)
  assert [a[i] for i in range(10)] == [b[i] for i in range(10)]
  for i in range(10):
    doc = a[i]
    assert doc.endswith(".") and ("pass key is" in doc or "holds value" in doc)
    answer = doc.rsplit(" ", 1)[-1].rstrip(".")
    assert doc.count(answer) >= 2  # stated earlier, asked for at the end


def test_file_sources(tmp_path):
  texts = ["first doc", "second one", "third"]
  for i, t in enumerate(texts):
    (tmp_path / f"d{i}.txt").write_text(t)
  (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet", row_group_size=2)
  from array_record.python.array_record_module import ArrayRecordWriter
  w = ArrayRecordWriter(str(tmp_path / "a.array_record"), "group_size:1")
  for t in texts:
    w.write(t.encode())
  w.close()
  for kind, pattern in [("text", "d*.txt"), ("jsonl", "*.jsonl"), ("parquet", "*.parquet"),
                        ("array_record", "*.array_record")]:
    src = open_source(kind, str(tmp_path / pattern))
    assert [src[i] for i in range(len(src))] == texts, kind
  with pytest.raises(FileNotFoundError, match="matches no files"):
    open_source("jsonl", str(tmp_path / "missing*.jsonl"))
  with pytest.raises(KeyError, match="body"):
    open_source("jsonl", str(tmp_path / "a.jsonl"), "body")[0]


def test_tokenizers(tmp_path):
  byte = load_tokenizer("byte")
  assert byte.decode(byte.encode("héllo")) == "héllo" and byte.vocab_size <= 512
  # a Hugging Face tokenizer.json
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  hf = Tokenizer(models.BPE(unk_token="<unk>"))
  hf.pre_tokenizer = pre_tokenizers.Whitespace()
  hf.train_from_iterator(["the pass key is 123"] * 20, trainers.BpeTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
  (tmp_path / "hf").mkdir()
  hf.save(str(tmp_path / "hf" / "tokenizer.json"))
  tok = load_tokenizer(str(tmp_path / "hf"))
  assert tok.bos_id == 1 and tok.decode(tok.encode("the pass key")).replace(" ", "") == "thepasskey"
  # a SentencePiece model
  import sentencepiece as spm
  (tmp_path / "corpus.txt").write_text("\n".join(f"the pass key is {i} remember it" for i in range(200)))
  spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=40, model_type="bpe", bos_id=1, eos_id=2, unk_id=0)
  sp = load_tokenizer(str(tmp_path / "sp.model"))
  assert sp.bos_id == 1 and sp.decode(sp.encode("the pass key")) == "the pass key"
  with pytest.raises(FileNotFoundError, match="tokenizer"):
    load_tokenizer(str(tmp_path / "nothing"))


def test_data_that_yields_no_tokens_or_undecodable_files_are_clear_errors(tmp_path):
  cfg = default_config().data
  cfg.source, cfg.eval_docs = "text", 0
  for i in range(3):
    (tmp_path / f"empty{i}.txt").write_text("")
  cfg.paths = str(tmp_path / "empty*.txt")
  with pytest.raises(ValueError, match=r"yields 3 tokens \(0 of text\) from 3 document"):
    data.make_datasets(cfg, ByteTokenizer(), seq_len=16, batch_size=2, seed=0, shard_index=0, shard_count=1)
  (tmp_path / "junk.txt").write_bytes(b"ok\n\xff\xfe\x00binary")
  with pytest.raises(ValueError, match=r"junk.txt line 2: not UTF-8"):
    open_source("text", str(tmp_path / "junk.txt"))[0]
  (tmp_path / "junk.jsonl").write_bytes(b'{"text": "fine"}\n\n\xff\xfe garbage\n')
  src = open_source("jsonl", str(tmp_path / "junk.jsonl"))
  assert src[0] == "fine"
  with pytest.raises(ValueError, match=r"junk.jsonl line 3: not a JSON object"):
    src[1]


# ----------------------------------------------------------------------------- retrieval corpus

def test_retrieval_documents_put_the_needle_where_they_say_in_the_eval_phrasing():
  from longgen_jax.data.sources import FILLER, KV_FACT, PASSKEY_FACT, PASSKEY_QUESTION, RetrievalSource
  src = RetrievalSource(60, seed=1, min_chars=150, max_chars=400, kv_fraction=0.3)
  kinds = set()
  for i in range(len(src)):
    prompt, answer, offsets = src.example(i)
    assert src[i] == prompt + answer and 150 <= len(prompt + answer) <= 400
    value = answer.strip(" .")
    if prompt.endswith(PASSKEY_QUESTION):
      kinds.add("passkey")
      needle = PASSKEY_FACT.format(key=value)
      assert len(offsets) == 1 and prompt[offsets[0]:offsets[0] + len(needle)] == needle
      assert prompt.count(value) == 2  # the needle says it twice; nowhere else
    else:
      kinds.add("kv")
      key = prompt.rsplit("key ", 1)[1].split()[0]
      needle = KV_FACT.format(k=key, v=value)
      assert prompt[offsets[0]:offsets[0] + len(needle)] == needle  # the first offset is the asked needle
      assert all(prompt[o:].startswith("Key ") for o in offsets)
    # outside the needles and the question, the text is whole FILLER sentences (the needle sits at a boundary)
    text = prompt
    for o in sorted(offsets, reverse=True):
      end = o + len(needle) if text[o:].startswith("The pass") else text.index(". ", o) + 2
      text = text[:o] + text[end:]
    filler = text[:text.rindex("What ")]
    assert filler == "" or (FILLER * (len(filler) // len(FILLER) + 2)).endswith(filler)
  assert kinds == {"passkey", "kv"}
  depths = [src.example(i)[2][0] / len(src.example(i)[0]) for i in range(len(src))]
  assert min(depths) < 0.2 and max(depths) > 0.6  # needles all over the document, not only near the end


def test_retrieval_batches_weight_exactly_the_answer_tokens_never_split_a_document_and_resume():
  cfg = default_config()
  cfg.data.source = "retrieval(answer_weight=8, kv_fraction=0.5)"
  cfg.data.synthetic.update(num_docs=64, min_chars=120, max_chars=250)
  cfg.data.eval_docs = 0
  tok = ByteTokenizer()
  train, _ = data.make_datasets(cfg.data, tok, seq_len=256, batch_size=2, seed=0, shard_index=0, shard_count=1)
  for b in _take(train, 4):
    for r in range(2):
      seg, tgt, w = b["segment_ids"][r], b["targets"][r], b["loss_mask"][r]
      assert set(np.unique(w)) <= {0.0, 1.0, 8.0}
      for s in set(seg[seg > 0].tolist()):
        rows = np.flatnonzero(seg == s)
        doc = tok.decode(np.concatenate([b["inputs"][r, rows[:1]], tgt[rows]]))
        assert doc.endswith((".",)) and ("pass key is" in doc or "holds value" in doc)  # whole document
        answer = tok.decode(tgt[rows][w[rows] == 8])
        assert doc.endswith(answer) and answer.strip(" .").isdigit() and answer.startswith(" ")
        assert w[rows][-1] == 0 or tgt[rows][-1] != tok.bos_id  # nothing weighted across documents
  _assert_resumes_through_json(train, skip=3, check=2)  # the packer's state too, like packed_batches'
  with pytest.raises(ValueError, match="does not fit a row"):
    next(iter(data.make_datasets(cfg.data, tok, seq_len=128, batch_size=2, seed=0, shard_index=0,
                                 shard_count=1)[0]))


def test_retrieval_source_names_parse_and_bad_ones_fail_clearly():
  from longgen_jax.data.sources import open_corpus, parse_source
  assert parse_source("retrieval(answer_weight=8, kv_fraction=0.25)") == (
      "retrieval", {"answer_weight": 8.0, "kv_fraction": 0.25})
  assert parse_source("synthetic") == ("synthetic", {})
  assert open_corpus("retrieval(answer_weight=3)", num_docs=5).answer_weight == 3.0
  # lengths: log-uniform by default (median ~ sqrt(100 * 1000) = 316), uniform with log_lengths=0 (~550)
  for arg, median in (("", 316), ("(log_lengths=0)", 550)):
    src = open_corpus("retrieval" + arg, num_docs=400, min_chars=100, max_chars=1000)
    assert abs(np.median([len(src[i]) for i in range(400)]) - median) < 60
  for bad, msg in [("retrieval(weight=2)", "unknown argument"), ("jsonl(answer_weight=2)", "only 'retrieval'"),
                   ("retrieval(answer_weight=x)", "not name=number")]:
    with pytest.raises(ValueError, match=msg):
      parse_source(bad)
  with pytest.raises(ValueError, match="answer_weight > 0"):
    open_corpus("retrieval(answer_weight=0)", num_docs=5)
