"""evaluate.py: pass-key prompts put the key where asked, the CLI writes sane JSON, loss by
position agrees with the model's plain mean loss, and bad arguments fail with one clear line."""

import json
import re

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import run_model
from longgen_jax import evaluate as evaluate_cli
from longgen_jax.data.sources import PASSKEY_FACT, PASSKEY_QUESTION
from longgen_jax.evaluation import passkey, ppl
from longgen_jax.evaluation.common import EvalError
from longgen_jax.model.config import preset
from longgen_jax.weights import load_pretrained, save_model
from longgen_jax.data.sources import FILLER, SyntheticLongContextSource
from longgen_jax.model.llama import Llama
from longgen_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
MAX_SENTENCE = max(len(TOK.encode(s)) for s in passkey.FILLER_SENTENCES)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny") / "model"
  save_model(Llama(preset("tiny"), rngs=nnx.Rngs(0)), d)  # max_seq_len 512, vocab 512
  return str(d)


def _run(capsys, *argv):
  rc = evaluate_cli.main(list(argv))
  return rc, capsys.readouterr()


# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("length", [100, 257, 500])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 1.0])
def test_passkey_prompt_puts_the_key_at_the_requested_depth(length, depth):
  p = passkey.passkey_prompt(TOK, length, depth, "48213")
  needle = TOK.encode(PASSKEY_FACT.format(key="48213"))
  question = TOK.encode(PASSKEY_QUESTION)
  assert p.tokens.dtype == np.int32 and len(p.tokens) == length and p.tokens[0] == TOK.bos_id
  np.testing.assert_array_equal(p.tokens[p.needle_start:p.needle_start + p.needle_len], needle)
  np.testing.assert_array_equal(p.tokens[-len(question):], question)
  assert TOK.decode(p.tokens).count("48213") == 2  # only in the needle
  n_fill = length - 1 - len(needle) - len(question)
  assert abs((p.needle_start - 1) - depth * n_fill) <= MAX_SENTENCE / 2 + 1
  if depth == 0:
    assert p.needle_start == 1
  if depth == 1:
    assert p.needle_start + p.needle_len == length - len(question)


def test_needle_moves_monotonically_with_depth():
  starts = [passkey.passkey_prompt(TOK, 2000, d, "10000").needle_start for d in np.linspace(0, 1, 11)]
  assert starts == sorted(starts) and starts[0] == 1 and starts[-1] > 1800


def test_phrasing_is_the_synthetic_corpus():
  """The prompt pieces must be the strings the tiny model was trained on."""
  assert "".join(passkey.FILLER_SENTENCES) == FILLER
  src = SyntheticLongContextSource(40, seed=3)
  docs = [src[i] for i in range(len(src)) if "pass key" in src[i]]
  assert docs
  for doc in docs:
    key = doc.rsplit(" ", 1)[1].rstrip(".")
    assert PASSKEY_FACT.format(key=key) in doc
    assert doc.endswith(f"{PASSKEY_QUESTION} {key}.")
  # the byte prompt's text is the corpus' phrasing: the needle sits between whole filler sentences
  p = passkey.passkey_prompt(TOK, 400, 0.5, "12345")
  before, after = TOK.decode(p.tokens[1:p.needle_start]), TOK.decode(p.tokens[p.needle_start + p.needle_len:])
  assert before.endswith(". ") and after.startswith(passkey.FILLER_SENTENCES) and FILLER[-40:] in before + after


def test_keys_are_deterministic_and_cell_local():
  k = passkey.passkey_key(0, 1024, 0.5, 3)
  assert k == passkey.passkey_key(0, 1024, 0.5, 3) and len(k) == 5
  assert len({passkey.passkey_key(0, 1024, 0.5, s) for s in range(20)}) > 15
  assert k != passkey.passkey_key(1, 1024, 0.5, 3)


def test_score_answer_is_exact_match_of_the_first_digits():
  assert passkey.score_answer(" 12345.", "12345")
  assert passkey.score_answer("12345 is", "12345")
  assert not passkey.score_answer(" 123456", "12345")
  assert not passkey.score_answer(" 1234", "12345")
  assert not passkey.score_answer(" the key 12345", "12345")


def test_parse_length():
  assert evaluate_cli.parse_length("4096") == 4096 and evaluate_cli.parse_length("4K") == 4096 and evaluate_cli.parse_length("128k") == 131072
  for bad in ("", "0", "4M", "-1", "1.5K"):
    with pytest.raises(EvalError, match="bad length"):
      evaluate_cli.parse_length(bad)


# ----------------------------------------------------------------------------- CLI


def test_cli_passkey_grid(ckpt, tmp_path, capsys):
  out = tmp_path / "grid.json"
  rc, io = _run(capsys, "passkey", "--ckpt", ckpt, "--dtype", "float32", "--lengths", "128,200",
                "--depths", "0,0.5,1", "--samples", "2", "--batch-size", "2", "--out", str(out))
  assert rc == 0, io.err
  res = json.loads(out.read_text())
  acc = np.asarray(res["accuracy"])
  assert acc.shape == (2, 3) and np.all((acc >= 0) & (acc <= 1))
  assert res["lengths"] == [128, 200] and res["depths"] == [0, 0.5, 1] and len(res["cells"]) == 6
  for cell in res["cells"]:
    assert len(cell["answers"]) == 2 and all(len(a["key"]) == 5 for a in cell["answers"])
  assert "depth" in io.out and "overall" in io.out


def test_cli_kv_int8_reaches_generation(ckpt, tmp_path, capsys, monkeypatch):
  """--kv-int8 (passkey, ruler, babilong) generates with the int8 full-layer cache and says so in the JSON."""
  from longgen_jax.evaluation import passkey
  seen = []
  real = passkey.generate
  monkeypatch.setattr(passkey, "generate", lambda *a, **kw: seen.append(kw["kv_int8"]) or real(*a, **kw))
  for flag, expected in (([], False), (["--kv-int8"], True)):
    out = tmp_path / f"grid{len(flag)}.json"
    rc, io = _run(capsys, "passkey", "--ckpt", ckpt, "--dtype", "float32", "--lengths", "128", "--depths", "0.5",
                  "--samples", "1", "--out", str(out), *flag)
    assert rc == 0, io.err
    assert json.loads(out.read_text())["kv_int8"] is expected and seen[-1] is expected


def test_cli_ppl_buckets_match_the_models_mean_loss(ckpt, tmp_path, capsys):
  out = tmp_path / "ppl.json"
  rc, io = _run(capsys, "ppl", "--ckpt", ckpt, "--dtype", "float32", "--seq-len", "128", "--bucket", "32",
                "--loss-chunk", "16", "--docs", "3", "--seed", "5", "--out", str(out))
  assert rc == 0, io.err
  res = json.loads(out.read_text())
  b = res["buckets"]
  assert [(x["start"], x["end"]) for x in b] == [(i, i + 32) for i in range(0, 128, 32)]
  assert all(x["tokens"] == 3 * 32 for x in b) and res["docs"] == 3

  # the same rows through the plain model: [T, V] logits at once, mean next-token loss
  rows, _ = ppl.document_rows(TOK, ppl.synthetic_source(TOK, 128, 3, 5), 128, 3)
  logits = run_model(load_pretrained(ckpt), rows[:, :-1])
  direct = float(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(rows[:, 1:])).mean())
  weighted = sum(x["loss"] * x["tokens"] for x in b) / sum(x["tokens"] for x in b)
  np.testing.assert_allclose(weighted, direct, rtol=1e-5)
  np.testing.assert_allclose(res["mean_loss"], direct, rtol=1e-5)


def test_ppl_on_a_jsonl_file_skips_short_documents(ckpt, tmp_path, capsys):
  data = tmp_path / "docs.jsonl"
  docs = ["short", FILLER * 3, "also short", "Once upon a time. " * 20]
  data.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
  out = tmp_path / "ppl.json"
  rc, io = _run(capsys, "ppl", "--ckpt", ckpt, "--dtype", "float32", "--seq-len", "64", "--bucket", "64",
                "--source", "jsonl", "--paths", str(data), "--text-field", "body", "--docs", "5",
                "--batch-size", "2", "--out", str(out))
  assert rc == 0, io.err
  res = json.loads(out.read_text())
  assert res["docs"] == 2 and res["skipped_short_docs"] == 2 and len(res["buckets"]) == 1


@pytest.mark.parametrize("argv, message", [
    (["passkey", "--tokenizer", "no/such/tok"], "tokenizer 'no/such/tok' not found"),
    (["passkey", "--lengths", "1K"], "exceeds the model's max_seq_len 512"),
    (["passkey", "--lengths", "64"], "too short for a pass-key prompt"),
    (["passkey", "--lengths", "128", "--depths", "0.5,1.5"], r"depths must be in \[0, 1\]"),
    (["passkey", "--lengths", "128", "--depths", "half"], "bad list 'half'"),
    (["passkey", "--samples", "0"], "--samples and --batch-size must be >= 1"),
    (["ppl", "--seq-len", "1K"], "--seq-len 1024 exceeds the model's max_seq_len 512"),
    (["ppl", "--seq-len", "128", "--bucket", "48"], "--bucket 48 must divide --seq-len 128"),
    (["ppl", "--source", "jsonl"], "--source jsonl needs --paths"),
    (["ppl", "--source", "jsonl", "--paths", "/no/such/*.jsonl"], "matches no files"),
])
def test_bad_arguments_fail_with_one_clear_line(ckpt, capsys, argv, message):
  rc, io = _run(capsys, *argv[:1], "--ckpt", ckpt, "--dtype", "float32", *argv[1:])
  assert rc == 2 and io.err.startswith("error: ")
  assert re.search(message, io.err), io.err


def test_missing_checkpoint_and_wrong_tokenizer(tmp_path, capsys):
  rc, io = _run(capsys, "ppl", "--ckpt", str(tmp_path / "nope"))
  assert rc == 2 and "does not exist" in io.err
  small = tmp_path / "small"
  save_model(Llama(preset("tiny", vocab_size=128), rngs=nnx.Rngs(0)), small)
  rc, io = _run(capsys, "passkey", "--ckpt", str(small), "--lengths", "128")
  assert rc == 2 and "vocab_size is 128" in io.err and "--tokenizer" in io.err


def test_ppl_rows_too_short(ckpt, tmp_path, capsys):
  data = tmp_path / "short.txt"
  data.write_text("only a few words")
  rc, io = _run(capsys, "ppl", "--ckpt", ckpt, "--source", "text", "--paths", str(data), "--seq-len", "64",
                "--bucket", "32")
  assert rc == 2 and "no document has the 65 tokens" in io.err


def test_out_is_checked_before_any_work(ckpt, tmp_path, capsys):
  existing = tmp_path / "old.json"
  existing.write_text('{"mine": 1}')
  for out, match in [(existing, "already exists; pass --force"), (tmp_path / "no" / "dir.json", "cannot write")]:
    rc = evaluate_cli.main(["ppl", "--ckpt", str(ckpt), "--seq-len", "64", "--docs", "1", "--no-progress",
                            "--out", str(out)])
    out_text, err = capsys.readouterr()
    assert rc == 2 and match in err and out_text == ""  # nothing evaluated, nothing printed
  assert existing.read_text() == '{"mine": 1}'


# ----------------------------------------------------------------------------- intervals, plots, task files

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
  data = open(path, "rb").read()
  return data[:8] == PNG_MAGIC and data[12:16] == b"IHDR" and data.rstrip(b"\0")[-8:-4] == b"IEND"


def test_wilson_interval_matches_a_hand_computation():
  from longgen_jax.evaluation.common import wilson_interval
  # 3 of 10, z = 1.96: centre (0.3 + 1.96^2/20) / (1 + 1.96^2/10) = 0.35550,
  # half width 1.96 / 1.38415 * sqrt(0.3 * 0.7 / 10 + 1.96^2 / 400) = 0.24771
  lo, hi = wilson_interval(3, 10)
  assert abs(lo - 0.10779) < 1e-4 and abs(hi - 0.60322) < 1e-4
  lo, hi = wilson_interval(0, 10)
  assert lo == 0 and abs(hi - 0.27753) < 1e-4  # 0/10 is not "exactly 0": the interval still has width
  lo, hi = wilson_interval(10, 10)
  assert abs(lo - 0.72247) < 1e-4 and abs(hi - 1) < 1e-12
  with pytest.raises(EvalError, match="0 <= hits <= n"):
    wilson_interval(11, 10)


def test_cli_passkey_writes_heatmap_intervals_and_goes_beyond_the_training_length(ckpt, tmp_path, capsys):
  out = tmp_path / "grid.json"
  # the checkpoint's max_seq_len is 512; 600 tokens run with --max-seq-len (RoPE base: the checkpoint's)
  rc, io = _run(capsys, "passkey", "--ckpt", ckpt, "--dtype", "float32", "--lengths", "128,600",
                "--depths", "0,1", "--samples", "3", "--batch-size", "3", "--max-seq-len", "1K", "--out", str(out))
  assert rc == 0, io.err
  res = json.loads(out.read_text())
  assert res["lengths"] == [128, 600] and res["checkpoint_max_seq_len"] == 512 and res["max_seq_len"] == 1024
  assert res["rope_theta"] == preset("tiny").rope_theta
  assert _is_png(res["plot"]) and res["plot"] == str(tmp_path / "grid.png")
  from longgen_jax.evaluation.common import wilson_interval
  for cell, ci in zip(res["cells"], np.asarray(res["ci95"]).reshape(-1, 2)):
    hits = sum(a["correct"] for a in cell["answers"])
    assert cell["hits"] == hits and cell["samples"] == 3
    np.testing.assert_allclose(cell["ci95"], wilson_interval(hits, 3))
    np.testing.assert_allclose(ci, cell["ci95"])
  assert len(res["accuracy_by_length"]) == 2 and len(res["ci95_by_length"]) == 2 and len(res["mean_ci95"]) == 2
  assert "95% CI" in io.out


def test_cli_ppl_writes_a_plot(ckpt, tmp_path, capsys):
  out, plot = tmp_path / "ppl.json", tmp_path / "pictures" / "loss.png"
  plot.parent.mkdir()
  rc, io = _run(capsys, "ppl", "--ckpt", ckpt, "--dtype", "float32", "--seq-len", "64", "--bucket", "16",
                "--docs", "1", "--out", str(out), "--plot", str(plot))
  assert rc == 0, io.err
  res = json.loads(out.read_text())
  assert res["plot"] == str(plot) and _is_png(plot) and len(res["buckets"]) == 4  # earlier keys unchanged


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_ruler_and_babilong_readers_and_their_metrics(tmp_path):
  from longgen_jax.evaluation import tasks
  ruler = _jsonl(tmp_path / "validation.jsonl", [
      {"index": 7, "input": "Magic number for apple: 123. What is it?", "outputs": ["123"], "length": 12,
       "answer_prefix": " Answer:"},
      {"index": 8, "input": "x Answer:", "outputs": ["a", "b"], "length": 3, "answer_prefix": " Answer:"}])
  ex = tasks.read_ruler(ruler)
  assert [e.index for e in ex] == ["7", "8"] and ex[0].length == 12 and ex[0].references == ("123",)
  assert ex[0].prompt.endswith("What is it? Answer:") and ex[1].prompt == "x Answer:"  # prefix added once
  assert tasks.ruler_string_match_all(" The number is 123.", ["123"]) == 1.0
  assert tasks.ruler_string_match_all(" A and c", ["a", "b"]) == 0.5  # share found, case-insensitive
  assert tasks.ruler_string_match_part(" A and c", ["a", "b"]) == 1.0
  babi = _jsonl(tmp_path / "qa1.jsonl", [{"input": "Mary went to the bathroom.", "question": "Where is Mary?",
                                          "target": "bathroom"}])
  (b,) = tasks.read_babilong(babi)
  assert b.prompt == "<context>\nMary went to the bathroom.\n</context>\n\nQuestion: Where is Mary?\nAnswer:"
  assert tasks.babilong_match(" Bathroom. Then kitchen", ["bathroom"]) == 1.0
  assert tasks.babilong_match(" kitchen. bathroom", ["bathroom"]) == 0.0  # only the first sentence counts
  bad = _jsonl(tmp_path / "bad.jsonl", [{"input": "x", "outputs": "123"}])
  with pytest.raises(EvalError, match="bad.jsonl line 1: field 'outputs' is a str"):
    tasks.read_ruler(bad)
  with pytest.raises(EvalError, match="qa1.jsonl line 1: no field 'outputs'"):
    tasks.read_ruler(babi)


def test_cli_ruler_and_babilong_score_generations(ckpt, tmp_path, capsys):
  ruler = _jsonl(tmp_path / "niah.jsonl", [{"index": i, "input": f"The key is {i}. The key is", "outputs": [str(i)],
                                            "length": 20} for i in range(3)])
  out = tmp_path / "ruler.json"
  rc, io = _run(capsys, "ruler", "--ckpt", ckpt, "--dtype", "float32", "--data", ruler, "--max-new-tokens", "4",
                "--batch-size", "2", "--out", str(out))
  assert rc == 0, io.err
  res = json.loads(out.read_text())
  assert res["mode"] == "ruler_all" and res["examples"] == 3 and list(res["score_by_length"]) == ["20"]
  from longgen_jax.evaluation.tasks import ruler_string_match_all
  assert all(r["score"] == ruler_string_match_all(r["output"], r["references"]) for r in res["results"])
  babi = _jsonl(tmp_path / "qa.jsonl", [{"input": "Mary is here.", "question": "Who?", "target": "mary"}] * 2)
  rc, io = _run(capsys, "babilong", "--ckpt", ckpt, "--dtype", "float32", "--data", babi, "--limit", "1",
                "--max-new-tokens", "3")
  assert rc == 0 and "babilong:" in io.out
  rc, io = _run(capsys, "babilong", "--ckpt", ckpt, "--data", babi, "--max-new-tokens", "600")
  assert rc == 2 and "exceeds the model's max_seq_len 512" in io.err


def test_shared_shapes_pad_little_and_keep_the_chunk_where_they_can():
  from longgen_jax.attention.spec import AttentionSpec
  from longgen_jax.evaluation.common import shared_shapes
  from longgen_jax.model.config import preset
  sw = preset("tiny", num_layers=2).replace(layer_specs=(AttentionSpec.sink_window(64, 256), AttentionSpec.full()))
  # the GPU grid: 1K pads to one 2K chunk (no more than twice itself): the chunk stays
  assert shared_shapes(sw, [1024, 4096, 16384], 7, 2048) == (2048, 16384 + 7)
  # the CPU grid: 128 would pad to 2048; the chunk becomes 128 (a power of two within the shortest prompt)
  assert shared_shapes(sw, [128, 192, 256, 384], 7, 2048) == (128, 391)
  assert shared_shapes(sw, [100, 300], 2, 2048) == (64, 320)   # 300 -> 5 chunks of 64
  # a chunk may not drop below a sink (a later chunk holds [sink | window | chunk]): it stays
  assert shared_shapes(sw, [40, 300], 2, 2048) == (2048, 2048)
  assert shared_shapes(sw, [3900, 4100], 32, 2048) == (2048, 6144)   # task prompts: 4100 -> 3 chunks
