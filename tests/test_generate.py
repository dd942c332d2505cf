"""Cached inference equals the full-sequence model (float32), for every pattern kind.

Tolerances (float32, logits of magnitude ~1): decode vs full forward max |diff| <= 1e-4;
chunked vs one-shot prefill <= 1e-5; int8 KV (full layers) max |diff| <= 3% of the logits'
standard deviation (measured about 1%).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longgen_jax.model import inference
from longgen_jax.attention.spec import AttentionSpec
from longgen_jax.model.config import preset
from longgen_jax.model.generation import Sampling, generate, generate_stream, sample
from longgen_jax.sample import main
from longgen_jax.model.kv_cache import cache_layouts, init_cache
from longgen_jax.model.llama import Llama
from conftest import gpu_only, rel_err, run_model

SW, BS, BSH = (AttentionSpec.sink_window(3, 10), AttentionSpec.block_sparse(4, 2, 3),
               AttentionSpec.block_sparse(4, 2, 3, homo_head=True))
CONFIGS = {
    # GQA (4 query heads, 2 kv heads) with all three kinds; block_sparse non-homo and homo.
    "gqa_mixed": dict(layer_specs=(SW, AttentionSpec.full(), BS, BSH)),
    # MHA, 4 kv heads with stride phases 0, 2, 4, 6; a sink-less window; MQA-free full layer.
    "mha_mixed": dict(num_kv_heads=4, layer_specs=(AttentionSpec.block_sparse(2, 3, 8),
                                                   AttentionSpec.sink_window(0, 7), AttentionSpec.full())),
}


def _model(name, **kw):
  over = dict(CONFIGS[name])
  specs = over.pop("layer_specs")
  cfg = preset("tiny", num_layers=len(specs), **over).replace(layer_specs=specs)
  return Llama(cfg, rngs=nnx.Rngs(0), **kw)


def _forward(model, tokens):
  g, s = nnx.split(model)
  return np.asarray(jax.jit(lambda s, t: run_model(nnx.merge(g, s), t))(s, jnp.asarray(tokens)))


def _teacher_forced(model, tokens, lengths, capacity, chunk_len, impl=None, kv_int8=False):
  """Logits [B, capacity - 1 - ..] predicted at positions lengths-1 .. capacity-2 (one per step)."""
  layouts = cache_layouts(model.config, capacity, kv_int8)
  caches = init_cache(layouts, len(lengths), jnp.float32)
  T = int(max(lengths))
  prompt = np.where(np.arange(T)[None] < lengths[:, None], tokens[:, :T], 0)
  caches, logits = inference.prefill(model, layouts, caches, prompt, lengths, chunk_len=chunk_len,
                                     attn_impl=impl)
  out = [np.asarray(logits)]
  g, s = nnx.split(model)
  B = len(lengths)
  for step in range(capacity - T):
    pos = lengths + step
    tok = tokens[np.arange(B), pos]
    lg, caches = inference.decode_step_jit(g, s, layouts, caches, jnp.asarray(tok), jnp.asarray(pos))
    out.append(np.asarray(lg))
  return np.stack(out, 1), caches


@pytest.mark.parametrize("name,impl,chunk", [("gqa_mixed", "xla_blockwise", 8), ("mha_mixed", "cudnn", 16)])
def test_decode_matches_full_forward(name, impl, chunk):
  if impl == "cudnn" and jax.default_backend() == "gpu":
    pytest.skip("cuDNN has no exact float32 attention; test_gpu_prefill_paths_match_forward covers it in bf16")
  model = _model(name)
  N = 80  # windows of 7-10 and local rings of 8 positions wrap ~7-10 times
  rng = np.random.RandomState(1)
  tokens = rng.randint(0, model.config.vocab_size, (2, N)).astype(np.int32)
  lengths = np.array([32, 13])  # right-padded batch of different prompt lengths
  got, _ = _teacher_forced(model, tokens, lengths, N, chunk, impl)
  for b in range(2):  # the reference runs each sequence alone
    ref = _forward(model, tokens[b:b + 1])[0]
    steps = N - 32
    want = ref[lengths[b] - 1:lengths[b] - 1 + steps + 1]
    np.testing.assert_allclose(got[b, :len(want)], want, atol=1e-4, rtol=0)


def test_chunked_prefill_equals_one_shot():
  model = _model("gqa_mixed")
  tokens = np.random.RandomState(2).randint(0, 512, (2, 48)).astype(np.int32)
  lengths = np.array([48, 30])
  layouts = cache_layouts(model.config, 48)
  results = []
  # chunks of 16: every later chunk has a complete sink_window history (c0 >= sink 3 + window 10: no segment
  # ids); of 12: c0 = 12 has the window's slots but not yet all past the sink; of 5: early, partial histories
  for chunk in (48, 16, 12, 5):
    caches = init_cache(layouts, 2, jnp.float32)
    results.append(inference.prefill(model, layouts, caches, tokens, lengths, chunk_len=chunk,
                                     attn_impl="xla_blockwise"))
  c1, l1 = results[0]
  for c2, l2 in results[1:]:
    np.testing.assert_allclose(l1, l2, atol=1e-5, rtol=0)
    for a, b in zip(c1, c2):
      for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, rtol=0, err_msg=name)


def test_int8_kv_logit_error():
  model = _model("gqa_mixed")
  N = 64
  tokens = np.random.RandomState(3).randint(0, 512, (1, N)).astype(np.int32)
  ref = _forward(model, tokens)[0]
  got, caches = _teacher_forced(model, tokens, np.array([20]), N, 8, "xla_blockwise", kv_int8=True)
  assert caches[1]["k"].dtype == jnp.int8 and caches[0]["ring_k"].dtype == jnp.float32
  err = np.abs(got[0] - ref[19:N]).max() / ref.std()
  assert err < 0.03, err


def test_generate_batch_equals_each_alone_and_stops():
  model = _model("gqa_mixed")
  rng = np.random.RandomState(4)
  prompts = [list(rng.randint(3, 512, n)) for n in (5, 14, 9)]
  batch = generate(model, prompts, max_new_tokens=20, chunk_len=8)
  for p, out in zip(prompts, batch):
    assert len(out) == 20
    assert generate(model, [p], max_new_tokens=20, chunk_len=8)[0] == out
  # A stop token cuts the output before it; the other sequences run on.
  stop = batch[1][6]
  cut = generate(model, prompts, max_new_tokens=20, chunk_len=8, stop_tokens=[stop])
  assert cut[1] == batch[1][:batch[1].index(stop)]
  # Streaming yields the same tokens in blocks.
  blocks = list(generate_stream(model, prompts, max_new_tokens=20, chunk_len=8, stream_every=6))
  assert len(blocks) == 5 and np.concatenate(blocks, 1).tolist() == batch


def test_a_fixed_capacity_gives_the_same_tokens_and_shares_the_programs_across_prompt_lengths():
  """generate(capacity=C): a cache of C positions and prompts padded to whole chunks, so calls of different
  lengths reuse one set of compiled programs (the pass-key grid), with the tokens of the default cache."""
  from jax._src import monitoring
  model = _model("gqa_mixed")
  rng = np.random.RandomState(6)
  batches = [[list(rng.randint(3, 512, n)) for n in lens] for lens in ((5, 14, 9), (30, 21, 27), (17, 3, 12))]
  for prompts in batches[:2]:
    assert generate(model, prompts, max_new_tokens=6, chunk_len=8, capacity=48) == \
        generate(model, prompts, max_new_tokens=6, chunk_len=8)
  # the prompts are padded with a valid id, whatever pad_id (an id outside the embedding would be NaN there,
  # which masked attention still spreads as 0 * NaN)
  assert generate(model, batches[0], max_new_tokens=6, chunk_len=8, capacity=48, pad_id=512 + 5) == \
      generate(model, batches[0], max_new_tokens=6, chunk_len=8)
  with pytest.raises(ValueError, match="capacity 35 is below"):
    generate(model, batches[1], max_new_tokens=6, chunk_len=8, capacity=35)   # 30 + 6 new tokens
  with pytest.raises(ValueError, match="whole chunks of 16"):
    generate(model, batches[1], max_new_tokens=1, chunk_len=16, capacity=31)  # 30 -> 32 padded
  # Compiles: a model without full layers (on CPU the full layers' prefill is specialised to each chunk's
  # position; on GPUs cuDNN serves them without that). The first call compiles; calls of other (here
  # shorter) prompt lengths then compile nothing with a fixed capacity, and something without it.
  sparse = Llama(preset("tiny", num_layers=2).replace(layer_specs=(SW, BS)), rngs=nnx.Rngs(0))
  compiles = []

  def listen(event, duration, **kw):   # lowering: a new program, whether or not a persistent cache has it
    if "jaxpr_to_mlir_module" in event:
      compiles.append(event)

  def count(prompts, capacity):
    before = len(compiles)
    generate(sparse, prompts, max_new_tokens=4, chunk_len=8, capacity=capacity)
    return len(compiles) - before
  monitoring.register_event_duration_secs_listener(listen)
  try:
    count(batches[1], 40)   # the longest prompts: every chunk kind (first, early, complete history) compiles
    assert [count(b, 40) for b in (batches[0], batches[2])] == [0, 0]
    assert count(batches[0], None) > 0
  finally:
    monitoring.unregister_event_duration_listener(listen)


def test_sampling_filters():
  rng = jax.random.key(0)
  logits = jnp.asarray(np.random.RandomState(5).randn(4, 50).astype(np.float32))
  greedy = jnp.argmax(logits, -1)
  assert (sample(logits, rng, Sampling()) == greedy).all()
  assert (sample(logits, rng, Sampling(temperature=1.0, top_k=1)) == greedy).all()
  assert (sample(logits, rng, Sampling(temperature=1.0, top_p=1e-6)) == greedy).all()
  keys = jax.random.split(rng, 2000)
  draws = np.asarray(jax.vmap(lambda k: sample(logits, k, Sampling(temperature=2.0, top_k=3)))(keys))
  top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
  assert all(set(draws[:, b]) == set(top3[b]) for b in range(4))
  probs = np.sort(np.asarray(jax.nn.softmax(logits)), -1)[:, ::-1]
  draws = np.asarray(jax.vmap(lambda k: sample(logits, k, Sampling(temperature=1.0, top_p=0.5)))(keys))
  n_keep = (np.cumsum(probs, -1) - probs < 0.5).sum(-1)
  assert all(len(set(draws[:, b])) == n_keep[b] for b in range(4))
  with pytest.raises(ValueError, match="top_p"):
    Sampling(top_p=0.0)


def test_chunk_len_shorter_than_sink_is_rejected():
  model = _model("gqa_mixed")
  with pytest.raises(ValueError, match="sink"):
    generate(model, [list(range(3, 20))], max_new_tokens=2, chunk_len=2)


def test_bad_arguments_raise_on_the_call():
  model = _model("gqa_mixed")
  with pytest.raises(ValueError, match="stream_every"):
    generate_stream(model, [[3, 4]], stream_every=0)  # would never advance
  with pytest.raises(ValueError, match="token id 512 is outside the model's vocabulary"):
    generate_stream(model, [[3, 4], [512]])
  with pytest.raises(ValueError, match="token id -1"):
    generate(model, [[3, -1]])


def test_cli_streams_and_prints_cache_size(capsys):
  main(["--preset", "tiny", "--prompt", "hello", "--max-new-tokens", "6", "--dtype", "float32",
        "--stop-token", "511", "--stream-every", "2"])
  out, err = capsys.readouterr()
  assert out.startswith("hello") and "KV cache" in err and "all-full" in err and "6 new tokens" in err


@gpu_only
@pytest.mark.parametrize("impl", ["cudnn", "auto"])
def test_gpu_prefill_paths_match_forward(impl):
  """bf16 on GPU: cuDNN full-layer prefix merge and the Pallas sparse prefill vs the reference forward."""
  specs = (SW, AttentionSpec.full(), BS, SW)
  cfg = preset("tiny", num_layers=4, head_dim=32).replace(layer_specs=specs)
  model = Llama(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, attn_impl="reference")
  N, P = 200, 150
  tokens = np.random.RandomState(6).randint(0, 512, (1, N)).astype(np.int32)
  ref = _forward(model, tokens)[0]
  layouts = cache_layouts(cfg, N)
  caches = init_cache(layouts, 1, jnp.bfloat16)
  caches, logits = inference.prefill(model, layouts, caches, tokens[:, :P], np.array([P]), chunk_len=32,
                                     attn_impl=impl)
  got = [np.asarray(logits)[0]]
  g, s = nnx.split(model)
  for t in range(P, N - 1):
    lg, caches = inference.decode_step_jit(g, s, layouts, caches, jnp.asarray(tokens[:, t]),
                                           jnp.asarray([t], jnp.int32))
    got.append(np.asarray(lg)[0])
  assert rel_err(np.stack(got), ref[P - 1:N - 1]) < 2e-2


def test_cli_loads_a_checkpoint(tmp_path, capsys):
  from longgen_jax.weights import save_model
  model = _model("gqa_mixed")
  save_model(model, tmp_path / "ckpt")
  main(["--ckpt", str(tmp_path / "ckpt"), "--prompt", "hi", "--max-new-tokens", "3", "--dtype", "float32",
        "--stop-token", "511", "--attn-impl", "xla_blockwise"])
  out, err = capsys.readouterr()
  assert out.startswith("hi") and "block_sparse" in err and "3 new tokens" in err


def test_bad_generation_settings_fail_before_any_work(tmp_path, capsys):
  model = _model("gqa_mixed")
  for kw, match in [({"temperature": float("nan")}, "sampling"), ({"stop_tokens": [99999]}, "stop token"),
                    ({"stop_tokens": [-1]}, "stop token"), ({"max_new_tokens": 2.5}, "max_new_tokens")]:
    with pytest.raises(ValueError, match=match):
      generate_stream(model, [[3, 4]], **kw)
  assert main(["--preset", "tiny", "--prompt", "hi", "--temperature", "nan"]) == 2
  assert main(["--preset", "tiny", "--prompt-file", str(tmp_path / "missing.txt")]) == 2
  out, err = capsys.readouterr()
  assert out == "" and "no such file" in err and "sampling" in err  # nothing echoed, one line each
