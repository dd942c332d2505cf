"""Context parallelism on CPU: the load-balanced layout, ring / all-gather attention on up to 8 forced
devices (one subprocess, so its compiles are shared and the rest of the suite keeps one device),
and the training CLI on a mesh with a context axis: one-device losses, exact resume, another mesh."""

import textwrap

import numpy as np
import pytest

from conftest import close, run_result_script, train_cli
from longgen_jax.parallel.layout import padded_length, sequence_order, to_context_layout
from longgen_jax.training import default_config, validate_config


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("context", [1, 2, 3, 4, 8])
def test_layout_gives_device_r_chunks_r_and_its_mirror(context):
  T = 16 * context
  order = sequence_order(T, context)
  assert sorted(order.tolist()) == list(range(T))
  if context == 1:
    assert order.tolist() == list(range(T))
    return
  c = T // (2 * context)
  for r, shard in enumerate(order.reshape(context, 2 * c)):  # contiguous shards over the context axis
    assert shard.tolist() == [*range(r * c, (r + 1) * c), *range((2 * context - 1 - r) * c, (2 * context - r) * c)]


def test_layout_pads_instead_of_dropping_and_moves_fields_together():
  B, T, cp = 2, 30, 4  # 30 does not divide into 8 chunks: padded to 32
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 100, (B, T + 1)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
           "segment_ids": np.ones((B, T), np.int32), "loss_mask": np.ones((B, T), np.float32)}
  out = to_context_layout(batch, cp)
  assert padded_length(T, cp) == 32 and all(x.shape == (B, 32) for x in out.values())
  order = sequence_order(32, cp)
  real = order < T
  for name in ("inputs", "targets", "segment_ids", "loss_mask"):  # every real token, in its slot
    np.testing.assert_array_equal(out[name][:, real], batch[name][:, order[real]])
    assert not out[name][:, ~real].any()  # padding: token 0, segment 0, no loss
  np.testing.assert_array_equal(out["positions"][0], np.arange(32)[order])  # positions continue into the pad
  assert out["loss_mask"].sum() == batch["loss_mask"].sum()
  assert to_context_layout(batch, 1) is batch
  with pytest.raises(ValueError, match="does not split"):
    sequence_order(30, 4)


def test_old_mesh_sequence_key_names_its_new_name():
  cfg = default_config()
  cfg.mesh.sequence = 2
  with pytest.raises(ValueError, match="renamed to config.mesh.context"):
    validate_config(cfg)
  cfg = default_config()
  cfg.parallel.full_strategy = "ulysses"
  with pytest.raises(ValueError, match="parallel.full_strategy"):
    validate_config(cfg)


# ----------------------------------------------------------------------------- attention on 8 devices

ATTENTION = textwrap.dedent(r'''
    import json, re
    import jax, jax.numpy as jnp, numpy as np
    from longgen_jax.attention import AttentionSpec, attention
    from longgen_jax.parallel.context import ContextStrategy, context_attention
    from longgen_jax.parallel.layout import sequence_order
    from longgen_jax.parallel.mesh import make_mesh

    rng = np.random.default_rng(0)
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    results = []

    def gathered_fraction(hlo, full_size):
      """Largest all-gather result, as a fraction of the whole K (or V) of the call."""
      sizes = [int(np.prod([int(d) for d in dims.split(",") if d])) for line in hlo.splitlines() if "all-gather" in line
               for dims in re.findall(r"\[([\d,]*)\]", line.split("all-gather")[0])]
      return max(sizes, default=0) / full_size

    def case(name, cp, spec, *, full="ring", sparse="halo", T=48, H=4, K=2, segments=True, data=1, tensor=1,
             impl="xla_blockwise"):
      B, D = 2 * data, 8
      q, k, v, w = (rng.normal(size=(B, T, h, D)).astype(np.float32) for h in (H, K, K, H))
      seg = (np.arange(T)[None] >= rng.integers(3, T - 3, (B, 1))).astype(np.int32) + 1 if segments else None

      def loss(attend, q, k, v, w, seg):  # out and lse both feed the loss: both gradients are checked
        out, lse = attend(q, k, v, seg)
        return jnp.sum(out * w) + 0.1 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)

      plain = lambda q, k, v, s: attention(q, k, v, spec, impl="reference", segment_ids=s, return_lse=True)
      (_, (out, lse)), grads = jax.value_and_grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2), has_aux=True)(
          q, k, v, w, None if seg is None else jnp.asarray(seg))
      order = sequence_order(T, cp)
      lay = lambda x, axis=1: None if x is None else np.take(np.asarray(x), order, axis=axis)
      strat = ContextStrategy(full=full, sparse=sparse)
      split = lambda q, k, v, s: context_attention(q, k, v, spec, impl=impl, segment_ids=s, return_lse=True,
                                                   strategy=strat)
      mesh = make_mesh(data=data, context=cp, tensor=tensor, devices=jax.devices()[:data * cp * tensor])
      with jax.set_mesh(mesh):
        f = jax.jit(jax.value_and_grad(lambda *a: loss(split, *a), argnums=(0, 1, 2), has_aux=True))
        (_, (out_cp, lse_cp)), grads_cp = f(lay(q), lay(k), lay(v), lay(w), lay(seg))
        hlo = f.lower(lay(q), lay(k), lay(v), lay(w), lay(seg)).compile().as_text()
      errors = [rel(out_cp, lay(out)), rel(lse_cp, lay(lse, 2))] + [rel(a, lay(b)) for a, b in zip(grads_cp, grads)]
      results.append({"name": name, "strategy": strat.for_spec(spec, T, cp), "errors": errors,
                      "permutes": hlo.count("collective-permute"),
                      "gathered": gathered_fraction(hlo, B * T * K * D),
                      "vert_stride": spec.vert_stride})

    full, sw, bs = AttentionSpec.full(), AttentionSpec.sink_window, AttentionSpec.block_sparse
    case("full ring cp2 segments", 2, full)
    case("full ring cp4 no segments", 4, full, segments=False)
    case("full ring cp8 MHA", 8, full, T=64, K=4)
    case("full all_gather cp4", 4, full, full="all_gather")
    case("full ring_loop cp8 MHA no segments", 8, full, T=64, K=4, segments=False, full="ring_loop")
    case("full ring cp2 data2 tensor2", 2, full, data=2, tensor=2)
    case("sink_window halo, window < tokens per device, cp2", 2, sw(0, 5))
    case("sink_window halo, sinks, window > tokens per device, cp4", 4, sw(3, 20))
    case("sink_window halo, sinks over several chunks, window > T, cp8", 8, sw(9, 100), T=64, segments=False)
    case("sink_window halo cp2 data2 tensor2", 2, sw(4, 6), data=2, tensor=2)
    case("sink_window halo, tile-aligned chunks, cp4", 4, sw(3, 20), T=1024, H=2, K=1)
    case("sink_window all_gather cp4", 4, sw(3, 20), sparse="all_gather")
    case("block_sparse halo head-dependent cp2", 2, bs(4, 2, 2), T=64)
    case("block_sparse halo homo cp4 GQA 4", 4, bs(4, 3, 2, homo_head=True), T=64, H=8, K=2)
    case("block_sparse halo several hops cp8", 8, bs(2, 5, 2), T=128, K=4, H=8, segments=False)
    case("block_sparse chunks off the stride grid: all_gather", 2, bs(4, 1, 3), T=40)
    # The GPU kernel (Pallas interpreter) brings its backward given statistics: the ring uses it.
    import functools
    from longgen_jax.attention import register_impl
    from longgen_jax.attention.pallas_gpu import pallas_attention, pallas_attention_backward
    tiny_tiles = dict(interpret=True, block_q=16, block_k=16)
    register_impl("pallas_interpret", functools.partial(pallas_attention, **tiny_tiles),
                  backward=functools.partial(pallas_attention_backward, **tiny_tiles))
    case("full ring with the kernel's own backward, cp4", 4, full, T=64, impl="pallas_interpret")
    case("full ring_loop with the kernel's own backward, cp4", 4, full, T=64, impl="pallas_interpret",
         full="ring_loop")

    # ring_loop's program stops growing with the context axis; the unrolled ring's doubles with it. Both
    # do the same arithmetic: equal bits (context 3: a loop of one trip; 8: of six).
    program_size, same_bits = {}, {}
    x = jnp.asarray(rng.normal(size=(1, 48, 2, 8)), jnp.float32)
    seg48 = jnp.asarray((np.arange(48)[None] >= 17) + 1, jnp.int32)
    for cp in (3, 4, 8):
      grads = {}
      for name in ("ring", "ring_loop"):
        g = jax.value_and_grad(lambda x: jnp.sum(jnp.sin(context_attention(
            x, x * 2, x, full, impl="xla_blockwise", segment_ids=seg48, strategy=ContextStrategy(full=name)))))
        with jax.set_mesh(make_mesh(data=1, context=cp, devices=jax.devices()[:cp])):
          program_size[f"{name} cp{cp}"] = len(jax.jit(g).lower(x).as_text())
          grads[name] = jax.jit(g)(x)
      same_bits[cp] = all(bool(jnp.array_equal(a, b)) for a, b in zip(grads["ring"], grads["ring_loop"]))

    # remat="full" keeps the ring's output and LSE: the backward does not run the ring again.
    from longgen_jax.model.config import REMAT_POLICIES
    x = jnp.ones((1, 32, 2, 8))
    f = lambda x: jnp.sum(jnp.sin(context_attention(x, x * 2, x, full, impl="xla_blockwise")))
    permutes = {}
    for name, policy in (("none", None), ("full", REMAT_POLICIES["full"]), ("offload", REMAT_POLICIES["offload"]),
                         ("nothing_saveable", jax.checkpoint_policies.nothing_saveable)):
      with jax.set_mesh(make_mesh(data=1, context=4, devices=jax.devices()[:4])):
        g = jax.value_and_grad(jax.checkpoint(f, policy=policy) if policy else f)
        permutes[name] = jax.jit(g).lower(x).compile().as_text().count("collective-permute")
    f_loop = lambda x: jnp.sum(jnp.sin(context_attention(x, x * 2, x, full, impl="xla_blockwise",
                                                         strategy=ContextStrategy(full="ring_loop"))))
    for name in ("full", "nothing_saveable"):
      policy = REMAT_POLICIES["full"] if name == "full" else jax.checkpoint_policies.nothing_saveable
      with jax.set_mesh(make_mesh(data=1, context=4, devices=jax.devices()[:4])):
        g = jax.value_and_grad(jax.checkpoint(f_loop, policy=policy))
        permutes[f"ring_loop {name}"] = jax.jit(g).lower(x).compile().as_text().count("collective-permute")

    # The whole train step under context 4: the sequence is never gathered (not by attention, the
    # embedding, the MLPs or the chunked loss); the all-gathers are the fsdp x context weight shards.
    import types
    from longgen_jax.model.config import preset
    from longgen_jax.training.optimizer import make_optimizer
    from longgen_jax.training.step import sharded_step
    T = 3968  # a length no weight has
    mcfg = types.SimpleNamespace(compute_dtype="float32", param_dtype="float32", attn_impl="xla_blockwise",
                                 remat="full", scan_layers=True)
    optim = types.SimpleNamespace(lr=1e-3, min_lr_ratio=1.0, warmup_steps=0, schedule="constant", decay_steps=0,
                                  weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)
    optimizer, schedule = make_optimizer(optim, 10)
    hlo = sharded_step(preset("tiny", num_layers=3, max_seq_len=T), mcfg, optimizer, schedule,
                       make_mesh(data=1, context=4, devices=jax.devices()[:4]), batch_shape=(1, 1, T),
                       loss_chunk=496, segment_attention=True).compile_train().as_text()
    gathers = [line for line in hlo.splitlines() if "all-gather" in line and "=" in line]
    sequence_gathers = [line[:160] for line in gathers if any(
        str(T) in dims.split(",") for dims in re.findall(r"\[([\d,]*)\]", line.split("all-gather")[0]))]
    print("RESULT " + json.dumps({"cases": results, "remat_permutes": permutes, "weight_gathers": len(gathers),
                                  "program_size": program_size, "same_bits": same_bits,
                                  "sequence_gathers": sequence_gathers}))
''')


def test_context_attention_equals_unsharded_outputs_and_gradients():
  """Ring (unrolled and looped), halo and all-gather over context 2/4/8 (with data and tensor axes, GQA,
  packed segments, sinks, windows shorter and longer than a device's tokens, block_sparse head-dependent
  and homo) against the unsharded reference: out, lse, dq, dk, dv; and what each compiles to."""
  report = run_result_script(ATTENTION, devices=8)
  results, permutes = report["cases"], report["remat_permutes"]
  assert report["weight_gathers"] > 0 and report["sequence_gathers"] == [], report["sequence_gathers"]
  assert permutes["full"] == permutes["offload"] == permutes["none"] < permutes["nothing_saveable"], permutes
  assert len(results) == 18
  size = report["program_size"]
  assert size["ring cp8"] > 1.5 * size["ring cp4"] and size["ring_loop cp8"] < 1.05 * size["ring_loop cp3"], size
  assert report["same_bits"] == {"3": True, "4": True, "8": True}, report["same_bits"]
  assert permutes["ring_loop full"] < permutes["ring_loop nothing_saveable"], permutes
  for r in results:
    assert max(r["errors"]) <= 1e-5, r
    assert r["strategy"] in r["name"], r
    if r["strategy"].startswith("ring") or "sink_window halo" in r["name"]:  # K/V travel by collective-permute only
      assert r["permutes"] > 0 and r["gathered"] == 0, r
    elif r["strategy"] == "halo":  # block_sparse: near blocks by permute, 1/vert_stride of the keys gathered
      assert r["permutes"] > 0 and 0 < r["gathered"] <= 1 / r["vert_stride"], r
    else:
      assert r["gathered"] >= 1, r


# ----------------------------------------------------------------------------- the training CLI


def _train(workdir, *overrides, devices=8, steps=4):
  return train_cli(workdir, *overrides, devices=devices, steps=steps, seq_len=62)  # 62: padded under context 2, 4


def test_train_cli_with_context_parallelism_matches_one_device_resumes_and_changes_mesh(tmp_path):
  """seq_len 62 is padded to 64 under context 2 and 4 (no token lost: the losses match the unpadded
  one-device run); a resumed run is bit exact; a checkpoint from (fsdp 2, context 4) resumes on
  (data 2, fsdp 2, context 2)."""
  mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.context=2"]
  one = _train(tmp_path / "one", devices=1)
  cp = _train(tmp_path / "cp", *mesh)
  assert sorted(one) == sorted(cp) == [1, 2, 3, 4]
  for step in one:
    assert close(cp[step], one[step]), (step, cp[step], one[step])

  _train(tmp_path / "resumed", *mesh, steps=2)
  resumed = _train(tmp_path / "resumed", *mesh)
  assert resumed == cp  # the same mesh: exact

  other = ["--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.context=4",
           "--config.parallel.full_strategy=all_gather", "--config.parallel.sparse_strategy=all_gather"]
  _train(tmp_path / "moved", *other, steps=2)
  moved = _train(tmp_path / "moved", *mesh)
  for step in one:
    assert close(moved[step], one[step]), (step, moved[step], one[step])


def test_chunked_loss_per_shard_pads_instead_of_shrinking_chunks():
  """Chunks within each context shard: a shard that is not a whole number of chunks is padded (mask 0),
  and any chunking gives the unchunked loss."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from longgen_jax.model.config import preset
  from longgen_jax.model.llama import Llama
  from longgen_jax.training.loss import chunked_xent
  model = Llama(preset("tiny", num_layers=1), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  B, T = 2, 30
  hidden = jnp.asarray(rng.normal(size=(B, T, model.config.hidden_size)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, model.config.vocab_size, (B, T)), jnp.int32)
  mask = jnp.asarray(rng.random((B, T)) < 0.8, jnp.float32)
  want, count = chunked_xent(model, hidden, targets, mask, chunk=0)
  for chunk, parts in ((4, 3), (7, 2), (5, 1), (100, 3)):  # 10 positions per shard in chunks of 4: 3 chunks
    got, n = jax.jit(lambda h: chunked_xent(model, h, targets, mask, chunk=chunk, parts=parts))(hidden)
    assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want)) and float(n) == float(count), (chunk, parts)
  with pytest.raises(ValueError, match="does not split"):
    chunked_xent(model, hidden, targets, mask, chunk=4, parts=4)
