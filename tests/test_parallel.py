"""Attention under a device mesh runs per shard (8 forced CPU devices, in a subprocess).

An opaque implementation stands in for a GPU/TPU kernel: a host callback, which XLA's SPMD
partitioner cannot split, exactly like a pallas_call or a cuDNN custom call. Without per-shard
dispatch XLA gathers the whole batch's activations onto every device around it.
"""

import textwrap

from conftest import run_result_script, train_cli

SCRIPT = textwrap.dedent('''
    import json, sys, types
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from longgen_jax.attention import AttentionSpec, SegmentIds, attention, dense_mask, register_impl
    from longgen_jax.attention.reference import reference_attention
    from longgen_jax.model.config import preset
    from longgen_jax.parallel.mesh import make_mesh
    from longgen_jax.training.optimizer import make_optimizer
    from longgen_jax.training.step import sharded_step

    def host_attention(q, k, v, spec, *, q_segment_ids=None, kv_segment_ids=None, q_offset=0, return_lse=False):
      """An opaque forward (numpy on the host, like a custom call to XLA) with an XLA backward."""
      qs = q_segment_ids if q_segment_ids is not None else jnp.zeros(q.shape[:2], jnp.int32)
      ks = kv_segment_ids if kv_segment_ids is not None else jnp.zeros(k.shape[:2], jnp.int32)

      def on_host(q, k, v, qs, ks):
        B, T, H, D = q.shape
        K = k.shape[2]
        mask = dense_mask(spec, T, k.shape[1], K, q_offset)[None] & (qs[:, None, :, None] == ks[:, None, None, :])
        s = np.einsum("btkgd,bskd->bkgts", q.reshape(B, T, K, H // K, D), k) / np.sqrt(D)
        s = np.where(mask[:, :, None], s, -np.inf)
        m = np.max(s, -1, keepdims=True)
        p = np.where(mask[:, :, None], np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
        p = p / np.maximum(p.sum(-1, keepdims=True), 1e-30)
        return np.einsum("bkgts,bskd->btkgd", p, v).reshape(B, T, H, D).astype(q.dtype)

      def ref(q, k, v):
        return reference_attention(q, k, v, spec, q_segment_ids=qs, kv_segment_ids=ks, q_offset=q_offset)

      @jax.custom_vjp
      def f(q, k, v):
        return jax.pure_callback(on_host, jax.ShapeDtypeStruct(q.shape, q.dtype), q, k, v, qs, ks)

      f.defvjp(lambda q, k, v: (f(q, k, v), (q, k, v)), lambda res, g: jax.vjp(ref, *res)[1](g))
      return f(q, k, v)

    register_impl("host", host_attention)
    out = {}

    # 1. The compiled train step: no all-gather of activations, per-device memory scales with the data axis.
    mc = preset("tiny", num_layers=3, max_seq_len=256)
    mcfg = types.SimpleNamespace(compute_dtype="float32", param_dtype="float32", attn_impl="host", remat="none",
                                 scan_layers=True)
    optim = types.SimpleNamespace(lr=1e-3, min_lr_ratio=1.0, warmup_steps=0, schedule="constant", decay_steps=0,
                                  weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)
    optimizer, schedule = make_optimizer(optim, 10)
    B, T = 8, 256
    for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
      compiled = sharded_step(mc, mcfg, optimizer, schedule, make_mesh(data=-1, devices=devices),
                              batch_shape=(1, B, T), loss_chunk=0, segment_attention=True).compile_train()
      hlo = compiled.as_text()
      out[name] = {"all_gathers": hlo.count("all-gather"),
                   "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}

    # 2. Per-shard attention equals the unsharded call, outputs and gradients: batch over data x fsdp,
    #    heads over tensor, with GQA, segment ids and lse; and a head-dependent pattern refuses a tensor axis.
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(4, 48, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(4, 48, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(4, 48, 2, 16)), jnp.float32)
    seg = jnp.asarray((np.arange(48)[None] >= rng.integers(5, 40, (4, 1))).astype(np.int32))
    spec = AttentionSpec.sink_window(3, 9)
    want, want_lse = attention(q, k, v, spec, impl="reference", segment_ids=seg, return_lse=True)
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    def grads(impl):
      loss = lambda q, k, v: jnp.sum(attention(q, k, v, spec, impl=impl, segment_ids=seg) * w)
      return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    want_grads = grads("reference")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
      got, got_lse = jax.jit(lambda q, k, v, s: attention(q, k, v, spec, impl="xla_blockwise", segment_ids=s,
                                                          return_lse=True))(q, k, v, seg)
      got_grads = grads("xla_blockwise")
      try:
        jax.jit(lambda q, k, v: attention(q, k, v, AttentionSpec.block_sparse(8, 1, 4)))(q, k, v)
        out["head_dependent_error"] = None
      except ValueError as e:
        out["head_dependent_error"] = str(e)
    out["max_err"] = float(jnp.max(jnp.abs(got - want)))
    out["max_grad_err"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got_grads, want_grads))
    out["max_lse_err"] = float(jnp.max(jnp.abs(jnp.where(jnp.isfinite(want_lse), got_lse - want_lse, 0.0))))
    print("RESULT " + json.dumps(out))
''')


def test_attention_runs_per_shard_under_a_mesh():
  r = run_result_script(SCRIPT, devices=8, timeout=600)
  assert r["eight"]["all_gathers"] == 0, r  # data parallel: only the gradient all-reduce
  assert r["eight"]["temp_bytes"] < r["one"]["temp_bytes"] / 4, r  # 8x fewer sequences per device
  assert r["max_err"] < 1e-5 and r["max_lse_err"] < 1e-5 and r["max_grad_err"] < 1e-5, r
  assert r["head_dependent_error"] and "stride phase" in r["head_dependent_error"], r


def test_train_cli_on_a_data_x_fsdp_mesh_matches_one_device(tmp_path):
  """The training loop on 4 CPU devices (data 2 x fsdp 2, per-shard attention, sharded state and
  checkpoints, eval) logs the losses of the same run on one device."""
  one = [(loss, ev) for loss, _, ev in train_cli(tmp_path / "one").values()]
  mesh = [(loss, ev) for loss, _, ev in train_cli(tmp_path / "mesh", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                                                  devices=4).values()]
  assert len(one) == len(mesh) == 4
  for (a, ea), (b, eb) in zip(one, mesh):
    assert abs(a - b) < 1e-5 * abs(a) and (ea is None) == (eb is None) and (ea is None or abs(ea - eb) < 1e-5 * ea)
