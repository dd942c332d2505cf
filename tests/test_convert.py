"""Hugging Face <-> longgen_jax conversion: logit parity with transformers, bit-exact round trips,
LongGen patterns, and clear errors on bad checkpoints."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from longgen_jax import AttentionSpec, weights  # noqa: E402
from longgen_jax import convert as convert_cli  # noqa: E402
from longgen_jax.model.config import resolve_pattern  # noqa: E402
from longgen_jax.weights import hf as hf_names  # noqa: E402
from conftest import run_model  # noqa: E402
from longgen_jax.weights import ConversionError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB = 100


def _hf_model(tie: bool = False, seed: int = 0):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0, rms_norm_eps=1e-5,
      max_position_embeddings=256, tie_word_embeddings=tie)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # norms away from 1 so a wrong mapping shows up in the logits
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """(torch model, single-file dir, sharded dir)."""
  root = tmp_path_factory.mktemp("hf")
  model = _hf_model()
  model.save_pretrained(root / "single")
  model.save_pretrained(root / "sharded", max_shard_size="20KB")
  assert (root / "sharded" / hf_names.SAFETENSORS_INDEX).exists()
  return model, root / "single", root / "sharded"


def _tokens(T=16, B=2, seed=1):
  return np.random.default_rng(seed).integers(0, VOCAB, (B, T)).astype(np.int32)


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _assert_logits_close(jax_model, torch_model, tokens):
  ours = np.asarray(run_model(jax_model, tokens))
  ref = _torch_logits(torch_model, tokens)
  assert ours.shape == ref.shape
  assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def _copy(src: Path, dst: Path) -> Path:
  shutil.copytree(src, dst)
  return dst


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_hf_to_jax_logits_match_transformers(hf, tmp_path, layout):
  model, single, sharded = hf
  src = single if layout == "single" else sharded
  assert convert_cli.main(["hf-to-jax", "--hf-dir", str(src), "--out", str(tmp_path / "ck")]) == 0
  assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "hf_config.json", "params"]
  cfg = weights.load_config(tmp_path / "ck")
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.rope_theta, cfg.tie_embeddings) == (4, 2, 50000.0, False)
  assert all(s.is_full for s in cfg.layer_specs)
  jm = weights.load_pretrained(tmp_path / "ck", attn_impl="reference")
  _assert_logits_close(jm, model, _tokens())


def test_load_pretrained_straight_from_hf_dir(hf):
  model, single, sharded = hf
  for src in (single, sharded):
    _assert_logits_close(weights.load_pretrained(src, attn_impl="reference"), model, _tokens(T=9))


def test_cli_subprocess_smoke(hf, tmp_path):
  _, single, _ = hf
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  r = subprocess.run([sys.executable, "-m", "longgen_jax.convert", "hf-to-jax", "--hf-dir", str(single),
                      "--out", str(tmp_path / "ck"), "--pattern", "longgen"],
                     capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert r.returncode == 0, r.stderr
  assert "1 full + 2 sink_window(64,1984)" in r.stdout
  r = subprocess.run([sys.executable, "-m", "longgen_jax.convert", "hf-to-jax", "--hf-dir",
                      str(tmp_path / "nowhere"), "--out", str(tmp_path / "ck2")],
                     capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_bf16_tensors_are_read_and_cast(hf, tmp_path):
  model, _, _ = hf
  half = _hf_model()
  half.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  jm = weights.load_pretrained(tmp_path / "bf16")
  want = half.model.embed_tokens.weight.detach().float().numpy()
  got = np.asarray(jm.embed_tokens.embedding[...])
  assert got.dtype == np.float32 and np.array_equal(got, want)
  jm16 = weights.load_pretrained(tmp_path / "bf16", param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  assert jm16.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- LongGen patterns


def test_longgen_pattern_changes_logits_only_beyond_the_window(hf, tmp_path):
  model, single, _ = hf
  full = weights.load_pretrained(single, attn_impl="reference")
  assert convert_cli.main(["hf-to-jax", "--hf-dir", str(single), "--out", str(tmp_path / "ck"),
                       "--pattern", "longgen", "--sparse", "sink_window(2,6)"]) == 0
  cfg = weights.load_config(tmp_path / "ck")
  sw = AttentionSpec.sink_window(2, 6)
  assert cfg.layer_specs == (sw, AttentionSpec.full(), sw)
  sparse = weights.load_pretrained(tmp_path / "ck", attn_impl="reference")
  tokens = _tokens(T=16)
  a, b = np.asarray(run_model(full, tokens)), np.asarray(run_model(sparse, tokens))
  # Position i first loses a key at i = sink + window = 8; earlier rows see everything.
  scale = np.abs(a).max()
  assert np.abs(a[:, :8] - b[:, :8]).max() <= 1e-5 * scale
  assert np.abs(a[:, 8:] - b[:, 8:]).max(axis=(0, 2)).min() > 1e-4 * scale


def test_pattern_options(hf, tmp_path):
  _, single, _ = hf
  weights.hf_to_jax(single, tmp_path / "a", pattern="tiny", rope_theta=1e6, max_seq_len=1024)
  cfg = weights.load_config(tmp_path / "a")
  assert [str(s) for s in cfg.layer_specs] == ["sink_window(4,28)", "full", "sink_window(4,28)"]
  assert (cfg.rope_theta, cfg.max_seq_len) == (1e6, 1024)
  weights.hf_to_jax(single, tmp_path / "b", pattern="full;block_sparse(4,2,3);full")
  assert str(weights.load_config(tmp_path / "b").layer_specs[1]) == "block_sparse(4,2,3)"
  with pytest.raises(ConversionError, match="llama2_7b.*32 layers.*has 3"):
    weights.hf_to_jax(single, tmp_path / "c", pattern="llama2_7b")
  with pytest.raises(ConversionError, match="bad layer pattern 'wide"):
    weights.hf_to_jax(single, tmp_path / "c", pattern="wide(3)")
  with pytest.raises(ConversionError, match="already exists"):
    weights.hf_to_jax(single, tmp_path / "a")
  assert resolve_pattern("longgen", 32).count(AttentionSpec.full()) == 12
  with pytest.raises(ValueError, match="not to pattern 'full'"):  # not silently ignored
    resolve_pattern("full", 3, sparse="sink_window(2,6)")
  with pytest.raises(ValueError, match="not to pattern 'tiny'"):
    resolve_pattern("tiny", 3, num_full=1)


def test_load_pretrained_overrides(hf, tmp_path):
  model, single, _ = hf
  weights.hf_to_jax(single, tmp_path / "ck")
  jm = weights.load_pretrained(tmp_path / "ck", attn_impl="reference", layer_specs="longgen",
                               rope_theta=5e5, max_seq_len=2048)
  assert jm.config.layer_specs[1].is_full and not jm.config.layer_specs[0].is_full
  assert (jm.config.rope_theta, jm.config.max_seq_len) == (5e5, 2048)
  assert jm.layers[0].self_attn.rope_theta == 5e5
  with pytest.raises(ConversionError, match="cannot override hidden_size"):
    weights.load_pretrained(tmp_path / "ck", hidden_size=64)
  with pytest.raises(ConversionError, match="unknown config override"):
    weights.load_pretrained(tmp_path / "ck", rope_thetta=1.0)


def test_save_model_roundtrip(hf, tmp_path):
  _, single, _ = hf
  jm = weights.load_pretrained(single, attn_impl="reference")
  weights.save_model(jm, tmp_path / "ck")
  again = weights.load_pretrained(tmp_path / "ck", attn_impl="reference")
  tokens = jnp.asarray(_tokens())
  assert np.array_equal(np.asarray(run_model(jm, tokens)), np.asarray(run_model(again, tokens)))


# ----------------------------------------------------------------------------- back to Hugging Face


def _assert_same_weights(a, b):
  sa, sb = a.state_dict(), b.state_dict()
  assert sa.keys() == sb.keys()
  for k in sa:
    assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("shard_size", ["5GB", "30KB"])
def test_jax_to_hf_reloads_bit_exactly(hf, tmp_path, shard_size):
  model, _, sharded = hf
  convert_cli.main(["hf-to-jax", "--hf-dir", str(sharded), "--out", str(tmp_path / "ck"),
                "--pattern", "longgen", "--sparse", "block_sparse(4,2,3)"])
  assert convert_cli.main(["jax-to-hf", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "hf"),
                       "--shard-size", shard_size]) == 0
  files = sorted(os.listdir(tmp_path / "hf"))
  if shard_size == "5GB":
    assert files == ["config.json", "model.safetensors"]
  else:
    assert hf_names.SAFETENSORS_INDEX in files and len(files) > 3
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
  _assert_same_weights(model, back)
  hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert hf_cfg["architectures"] == ["LlamaForCausalLM"] and hf_cfg["torch_dtype"] == "float32"
  assert hf_cfg[hf_names.HF_PATTERN_KEY] == ["block_sparse(4,2,3)", "full", "block_sparse(4,2,3)"]
  # the pattern survives a second trip in
  assert weights.load_config(tmp_path / "hf") == weights.load_config(tmp_path / "ck")
  with pytest.raises(ConversionError, match="already holds weights"):
    weights.jax_to_hf(tmp_path / "ck", tmp_path / "hf")


def test_jax_to_hf_bf16_export(hf, tmp_path):
  model, single, _ = hf
  weights.hf_to_jax(single, tmp_path / "ck")
  weights.jax_to_hf(tmp_path / "ck", tmp_path / "hf", dtype="bfloat16")
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
  assert back.dtype == torch.bfloat16
  assert torch.equal(back.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_tied_embeddings(tmp_path):
  model = _hf_model(tie=True, seed=3)
  model.save_pretrained(tmp_path / "hf")
  convert_cli.main(["hf-to-jax", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")])
  jm = weights.load_pretrained(tmp_path / "ck", attn_impl="reference")
  assert jm.config.tie_embeddings and jm.lm_head is None
  _assert_logits_close(jm, model, _tokens())
  weights.jax_to_hf(tmp_path / "ck", tmp_path / "out")
  assert "lm_head.weight" not in load_file(tmp_path / "out" / "model.safetensors")
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
  _assert_same_weights(model, back)


# ----------------------------------------------------------------------------- bad checkpoints


def _edit_tensors(d: Path, fn):
  f = d / "model.safetensors"
  tensors = load_file(f)
  fn(tensors)
  save_file(tensors, f, metadata={"format": "pt"})


def _edit_config(d: Path, **changes):
  cfg = json.loads((d / "config.json").read_text())
  cfg.update(changes)
  (d / "config.json").write_text(json.dumps(cfg))


def test_missing_config(hf, tmp_path):
  d = _copy(hf[1], tmp_path / "hf")
  (d / "config.json").unlink()
  with pytest.raises(ConversionError, match="missing config.json"):
    weights.hf_to_jax(d, tmp_path / "ck")
  with pytest.raises(ConversionError, match="missing config.json"):
    weights.load_pretrained(d)


@pytest.mark.parametrize("changes, match", [
    (dict(model_type="mistral"), "unsupported model_type 'mistral'"),
    (dict(architectures=["LlamaForSequenceClassification"]), "unsupported architectures"),
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(mlp_bias=True), "mlp_bias=true"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_type='llama3'"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "rope_type='linear'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_unsupported_configs(hf, tmp_path, changes, match):
  d = _copy(hf[1], tmp_path / "hf")
  _edit_config(d, **changes)
  with pytest.raises(ConversionError, match=match):
    weights.hf_to_jax(d, tmp_path / "ck")


def test_missing_tensor(hf, tmp_path):
  d = _copy(hf[1], tmp_path / "hf")
  _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ConversionError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
    weights.hf_to_jax(d, tmp_path / "ck")
  assert not (tmp_path / "ck").exists()  # nothing written


def test_unexpected_tensor(hf, tmp_path):
  d = _copy(hf[1], tmp_path / "hf")
  _edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}))
  with pytest.raises(ConversionError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
    weights.hf_to_jax(d, tmp_path / "ck")


def test_shape_mismatch(hf, tmp_path):
  d = _copy(hf[1], tmp_path / "hf")
  _edit_tensors(d, lambda t: t.update({"model.layers.2.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)}))
  with pytest.raises(ConversionError, match=r"shape mismatch for tensor 'model\.layers\.2\.self_attn\.k_proj\."
                                            r"weight': expected \(16, 32\) \(from config.json\), got \(32, 32\)"):
    weights.hf_to_jax(d, tmp_path / "ck")


def test_missing_shard_file(hf, tmp_path):
  d = _copy(hf[2], tmp_path / "hf")
  victim = sorted(d.glob("model-*.safetensors"))[1]
  victim.unlink()
  with pytest.raises(ConversionError, match=f"missing shard file '{victim.name}'"):
    weights.load_pretrained(d)


def test_derived_rope_buffers_are_checked(hf, tmp_path):
  d = _copy(hf[1], tmp_path / "hf")
  inv = 1.0 / 50000.0 ** (np.arange(0, 8, 2) / 8)
  _edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": inv.astype(np.float32)}))
  weights.hf_to_jax(d, tmp_path / "ok")  # an old-style buffer that matches is fine
  _edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": (2 * inv).astype(np.float32)}))
  with pytest.raises(ConversionError, match="does not match rope_theta=50000"):
    weights.hf_to_jax(d, tmp_path / "bad")


def test_our_checkpoint_mismatch(hf, tmp_path):
  weights.hf_to_jax(hf[1], tmp_path / "ck")
  cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
  cfg["intermediate_size"] = 48
  (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConversionError, match=r"shape mismatch for parameter 'layers/0/mlp/down_proj/kernel'.*"
                                            r"expected \(48, 32\).*got \(64, 32\)"):
    weights.load_pretrained(tmp_path / "ck")


def test_writers_refuse_to_overwrite_their_input_or_foreign_files(hf, tmp_path):
  """A conversion never destroys its input and never replaces a config it did not write without --force."""
  _, single, _ = hf
  before = (single / "config.json").read_text()
  with pytest.raises(ConversionError, match="overlaps --hf-dir"):
    weights.hf_to_jax(single, single, overwrite=True)
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "config.json").write_text('{"mine": 1}')
  with pytest.raises(ConversionError, match="config.json already exists"):
    weights.hf_to_jax(single, foreign)
  assert (foreign / "config.json").read_text() == '{"mine": 1}' and (single / "config.json").read_text() == before
  weights.hf_to_jax(single, tmp_path / "ck")
  with pytest.raises(ConversionError, match="overlaps --ckpt"):
    weights.jax_to_hf(tmp_path / "ck", tmp_path / "ck", overwrite=True)
  with pytest.raises(ConversionError, match="overlaps --ckpt"):
    weights.jax_to_hf(tmp_path / "ck", tmp_path / "ck" / "hf")
  with pytest.raises(ConversionError, match="config.json already exists"):
    weights.jax_to_hf(tmp_path / "ck", foreign)
  assert weights.load_config(tmp_path / "ck").num_layers > 0  # the checkpoint still loads


def test_bad_conversion_arguments_and_unwritable_outputs_are_one_line_errors(hf, tmp_path, capsys):
  _, single, _ = hf
  with pytest.raises(ConversionError, match="rope-theta must be > 0"):
    weights.hf_to_jax(single, tmp_path / "a", rope_theta=-1)
  with pytest.raises(ConversionError, match="at least 1 byte"):
    weights.parse_size("0")
  blocker = tmp_path / "file"
  blocker.write_text("x")
  assert convert_cli.main(["hf-to-jax", "--hf-dir", str(single), "--out", str(blocker / "sub")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_context_parallel_trained_scanned_checkpoint_round_trips_through_hf(tmp_path):
  """Hugging Face weights -> training with scanned layers on a context-parallel mesh (2 CPU devices: ring for
  the full layers, halo for the sparse ones) -> the exported model -> jax-to-hf: transformers loads the
  trained weights bit for bit and its logits match ours (at a length the window covers, where the sparse
  layers equal full attention, which is all transformers computes)."""
  from conftest import train_cli
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                 num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0,
                                 max_position_embeddings=256)  # vocab covers the byte tokenizer's 259 ids
  transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf_in")
  assert convert_cli.main(["hf-to-jax", "--hf-dir", str(tmp_path / "hf_in"), "--out", str(tmp_path / "ck")]) == 0
  work = tmp_path / "run"
  train_cli(work, f"--config.init_from={tmp_path / 'ck'}", "--config.mesh.data=1", "--config.mesh.context=2",
            "--config.model.num_full_layers=2", "--config.model.sparse_spec=sink_window(4,28)",
            "--config.model.scan_layers=True", "--config.export_model=True", "--config.optim.lr=1e-2",
            devices=2, steps=2)
  run_cfg = json.loads((work / "config.json").read_text())["train"]
  assert run_cfg["mesh"]["context"] == 2 and run_cfg["model"]["scan_layers"]
  assert convert_cli.main(["jax-to-hf", "--ckpt", str(work / "model"), "--out", str(tmp_path / "hf_out")]) == 0
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_out", dtype=torch.float32).eval()
  ours = weights.load_pretrained(work / "model", attn_impl="reference")
  assert [str(s) for s in ours.config.layer_specs] == ["sink_window(4,28)"] * 2 + ["full"] * 2 + ["sink_window(4,28)"] * 2
  trained = back.model.layers[3].mlp.up_proj.weight
  initial = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_in").model.layers[3].mlp.up_proj.weight
  assert not torch.equal(trained, initial)  # the round trip carries the trained weights, not the initial ones
  np.testing.assert_array_equal(trained.detach().numpy().T, np.asarray(ours.layers[3].mlp.up_proj.kernel[...]))
  tokens = np.random.default_rng(3).integers(3, 320, (2, 24)).astype(np.int32)  # 24 < 4 + 28: window covers all
  _assert_logits_close(ours, back, tokens)
