"""Training CLI: python -m longgen_jax.train --config=configs/tiny.py --workdir=DIR [--config.key=value]

One jit-compiled step (gradient accumulation as a scan over micro-batches, chunked cross-entropy,
AdamW with fp32 master weights and bf16 compute), explicit shardings over a mesh, donated train
state; grain data; Orbax checkpoints that resume exactly. WORKDIR holds checkpoints/, metrics.jsonl,
TensorBoard events (tb/), config.json (the resolved config) and, at the end, model/ (the final
weights in the format generate/evaluate/convert read).

The step-building pieces (optimizer, loss, train step, FLOP count) import no grain, so benchmarks
use them without the data stack.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from longgen_jax.config import PRESETS, ModelConfig, parse_spec, preset
from longgen_jax.model import Llama

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class TrainingDiverged(RuntimeError):
  """Loss or gradient norm became NaN/inf; the last complete checkpoint is left as it was."""


# ----------------------------------------------------------------------------- config


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (configs/*.py are files, not a package)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"no config file at {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def default_config() -> ml_collections.ConfigDict:
  """Every key a config may set; configs/*.py start from this and change what they need."""
  import ml_collections
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.seq_len = 4096
  c.batch_size = 8              # global, in sequences of seq_len tokens
  c.grad_accum = 1              # micro-batches per step (batch_size / grad_accum sequences each)
  c.init_from = ""              # converted checkpoint dir or Hugging Face Llama dir; "" = random init
  c.model = ml_collections.ConfigDict(dict(
      preset="tiny",            # longgen_jax.config presets; ignored (except pattern) with init_from
      num_layers=0,             # 0 = the preset's
      num_full_layers=-1,       # -1 = keep the preset's / checkpoint's layer pattern
      sparse_spec="",           # e.g. "sink_window(64,1984)" or "block_sparse(64,16,64)"
      placement="middle",       # where the full layers go: middle, top, bottom, interleaved
      rope_theta=0.0,           # 0 = keep
      vocab_size=0,             # 0 = keep (must cover the tokenizer's ids); -1 = the tokenizer's
      compute_dtype="bfloat16",
      param_dtype="float32",    # master weights (and AdamW moments)
      attn_impl="auto",
      remat="none",             # none, full, dots
      segment_attention=True,   # keep attention inside packed documents
  ))
  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-4, min_lr_ratio=0.1, warmup_steps=100,
      schedule="cosine",        # cosine, linear, constant (after linear warmup)
      decay_steps=0,            # 0 = total_steps; fix it to extend a run later without changing the lr
      weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0,
  ))
  c.data = ml_collections.ConfigDict(dict(
      source="synthetic",       # synthetic, text, jsonl, parquet, array_record
      paths="",                 # comma-separated globs
      text_field="text",        # jsonl / parquet field holding the document
      tokenizer="byte",         # byte, a SentencePiece .model, or a Hugging Face tokenizer dir
      add_eos=False,
      eval_docs=64,             # held-out documents for eval loss (0 = no eval)
      upsample_factor=1,        # documents >= upsample_min_tokens appear this many times per epoch
      upsample_min_tokens=32768,
      prefetch=2,               # batches prepared ahead in a thread
      synthetic=ml_collections.ConfigDict(dict(num_docs=20000, seed=0, min_chars=200, max_chars=4000)),
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, sequence=1, tensor=1))
  c.loss_chunk = 2048           # logits computed this many positions at a time
  c.log_every = 1
  c.eval_every = 100            # 0 = never
  c.eval_batches = 4
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.async_checkpoint = True
  c.export_model = True         # write WORKDIR/model (convert.py's format) at the end
  c.progress_bar = True
  c.peak_tflops = 0.0           # per device, for MFU; 0 = look up the device kind
  return c


def validate_config(cfg) -> None:
  """Raises ValueError naming the offending key for values the run cannot use."""
  def need(cond, key, msg):
    if not cond:
      raise ValueError(f"config.{key}={_get(cfg, key)!r}: {msg}")
  need(cfg.total_steps >= 1, "total_steps", "must be >= 1")
  need(cfg.seq_len >= 2, "seq_len", "must be >= 2")
  need(cfg.batch_size >= 1, "batch_size", "must be >= 1")
  need(cfg.grad_accum >= 1, "grad_accum", "must be >= 1")
  need(cfg.batch_size % (cfg.grad_accum * jax.process_count()) == 0, "batch_size",
       f"must be divisible by grad_accum * hosts = {cfg.grad_accum} * {jax.process_count()}")
  need(cfg.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
  need(cfg.log_every >= 1, "log_every", "must be >= 1")
  need(cfg.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
  need(cfg.optim.schedule in ("cosine", "linear", "constant"), "optim.schedule",
       "choose cosine, linear or constant")
  need(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
  need(0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
  need(cfg.model.compute_dtype in DTYPES, "model.compute_dtype", f"choose from {list(DTYPES)}")
  need(cfg.model.param_dtype in DTYPES, "model.param_dtype", f"choose from {list(DTYPES)}")
  need(cfg.model.remat in ("none", "full", "dots"), "model.remat", "choose none, full or dots")
  need(cfg.model.placement in ("middle", "top", "bottom", "interleaved"), "model.placement",
       "choose middle, top, bottom or interleaved")
  if cfg.model.sparse_spec:
    try:
      parse_spec(cfg.model.sparse_spec)
    except ValueError as e:
      raise ValueError(f"config.model.sparse_spec: {e}") from None
  chunk = cfg.loss_chunk
  need(chunk <= 0 or chunk >= cfg.seq_len or cfg.seq_len % chunk == 0, "loss_chunk",
       f"must divide seq_len={cfg.seq_len} (or be 0 for no chunking)")
  if not cfg.init_from:
    need(cfg.model.preset in PRESETS, "model.preset", f"unknown preset; choose from {list(PRESETS)}")
  elif not os.path.exists(cfg.init_from) and "://" not in cfg.init_from:
    need(False, "init_from", "no such directory")


def _get(cfg, dotted: str):
  for k in dotted.split("."):
    cfg = cfg[k]
  return cfg


def build_model_config(cfg, tokenizer_vocab: int) -> ModelConfig:
  """The model the run trains: preset (or init_from's config) + pattern, rope and length overrides."""
  m = cfg.model
  if cfg.init_from:
    from longgen_jax.convert import load_config
    mc = load_config(cfg.init_from)
  else:
    mc = preset(m.preset, **({"num_layers": m.num_layers} if m.num_layers else {}))
  if m.num_full_layers == mc.num_layers:
    mc = mc.all_full()
  elif m.num_full_layers >= 0 or m.sparse_spec:
    num_full = m.num_full_layers if m.num_full_layers >= 0 else mc.num_full_layers
    sparse = m.sparse_spec or next((s for s in mc.layer_specs if not s.is_full), None)
    if sparse is None:
      raise ValueError("config.model.num_full_layers is set but the model has no sparse layers to copy; "
                       "set config.model.sparse_spec, e.g. 'sink_window(64,1984)'")
    mc = mc.with_pattern(num_full, sparse, m.placement)
  changes = {"max_seq_len": max(mc.max_seq_len, cfg.seq_len)}
  if m.rope_theta > 0:
    changes["rope_theta"] = float(m.rope_theta)
  if m.vocab_size > 0 or m.vocab_size == -1:
    vocab = tokenizer_vocab if m.vocab_size == -1 else m.vocab_size
    if cfg.init_from and vocab != mc.vocab_size:
      raise ValueError(f"config.model.vocab_size={m.vocab_size} ({vocab} tokens): cannot change the "
                       f"vocabulary of init_from's model ({mc.vocab_size} tokens)")
    changes["vocab_size"] = vocab
  mc = mc.replace(**changes)
  if mc.vocab_size < tokenizer_vocab:
    raise ValueError(f"model vocab_size {mc.vocab_size} is smaller than the tokenizer's {tokenizer_vocab}; "
                     "set config.model.vocab_size or use a matching tokenizer")
  return mc


# ----------------------------------------------------------------------------- optimizer & step


def make_schedule(optim, total_steps: int) -> optax.Schedule:
  decay = (optim.decay_steps or total_steps)
  warm = min(optim.warmup_steps, decay)
  peak, end = optim.lr, optim.lr * optim.min_lr_ratio
  if optim.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif optim.schedule == "linear":
    after = optax.linear_schedule(peak, end, max(decay - warm, 1))
  else:
    after = optax.cosine_decay_schedule(peak, max(decay - warm, 1), alpha=optim.min_lr_ratio)
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping then AdamW; weight decay only on matrices (not norms)."""
  schedule = make_schedule(optim, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm > 0 else optax.identity(),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                  mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
  return tx, schedule


def chunked_xent(model: Llama, hidden_BTE, targets_BT, mask_BT, chunk: int):
  """(sum of masked token losses, number of counted tokens), logits never all in memory at once."""
  B, T, E = hidden_BTE.shape
  chunk = T if chunk <= 0 or chunk >= T else chunk
  n = T // chunk
  split = lambda x: x.reshape(B, n, chunk, *x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def one(h_BCE, t_BC, m_BC):
    logits = model.logits(h_BCE)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, t_BC[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - tgt) * m_BC)

  total, _ = jax.lax.scan(lambda acc, xs: (acc + one(*xs), None), jnp.float32(0),
                          (split(hidden_BTE), split(targets_BT), split(mask_BT.astype(jnp.float32))))
  return total, jnp.sum(mask_BT.astype(jnp.float32))


def make_loss_fn(graphdef, *, loss_chunk: int, segment_attention: bool):
  """loss(params, batch[b, T]) -> (loss sum, token count)."""
  def loss_fn(params, mb):
    model = nnx.merge(graphdef, params)
    seg = mb["segment_ids"] if segment_attention else None
    pos = mb["positions"] if segment_attention else None
    hidden = model.hidden_states(mb["inputs"], pos, seg)
    return chunked_xent(model, hidden, mb["targets"], mb["loss_mask"], loss_chunk)
  return loss_fn


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, schedule) -> Callable:
  """step(state, batch[A, b, T]) -> (state, metrics): token-weighted mean over all A micro-batches."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch):
    params = state["params"]

    def micro(carry, mb):
      g_acc, l_acc, n_acc = carry
      (l, n), g = grad_fn(params, mb)
      g_acc = jax.tree.map(lambda a, b: a + b.astype(a.dtype), g_acc, g)
      return (g_acc, l_acc + l, n_acc + n), None

    if jax.tree.leaves(batch)[0].shape[0] == 1:  # no accumulation: no extra fp32 gradient buffer
      (l, n), g = grad_fn(params, jax.tree.map(lambda x: x[0], batch))
    else:
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      (g, l, n), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)), batch)
    n = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda x, p: (x / n).astype(p.dtype), g, params)  # mean over counted tokens
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                 "opt_state": opt_state}
    metrics = {"loss": l / n, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
               "tokens": n}
    return new_state, metrics

  return step


def make_eval_step(loss_fn: Callable) -> Callable:
  def step(params, batch):
    def micro(carry, mb):
      l, n = loss_fn(params, mb)
      return (carry[0] + l, carry[1] + n), None
    (l, n), _ = jax.lax.scan(micro, (jnp.float32(0), jnp.float32(0)), batch)
    return l, n
  return step


# ----------------------------------------------------------------------------- FLOPs / MFU


def attended_keys_per_query(spec, seq_len: int, num_kv_heads: int) -> float:
  """Mean number of keys a query attends under `spec` (causal), averaged over queries and kv heads."""
  i = np.arange(seq_len, dtype=np.float64)
  if spec.is_full:
    return float(np.mean(i + 1))
  if spec.kind == "sink_window":
    recent = np.minimum(i + 1, spec.window)
    return float(np.mean(recent + np.minimum(spec.sink, np.maximum(0, i + 1 - spec.window))))
  b, L, V = spec.block_size, spec.local_blocks, spec.vert_stride
  nb = -(-seq_len // b)
  qb, kb = np.arange(nb)[:, None], np.arange(nb)[None, :]
  s = spec.stride_shift(num_kv_heads)
  total = 0.0
  for h in range(num_kv_heads if s else 1):
    ok = (kb < qb) & ((qb - kb < L) | ((kb + h * s) % V == 0))
    total += ok.sum() * b * b + nb * b * (b + 1) / 2  # off-diagonal blocks + the causal diagonal block
  return min(total / (num_kv_heads if s else 1) / (nb * b), float(np.mean(i + 1)))


def train_flops_per_token(mc: ModelConfig, seq_len: int) -> float:
  """Model FLOPs per trained token (fwd + bwd = 3x fwd), counting only attended query-key pairs."""
  E, H, K, D, I = mc.hidden_size, mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.intermediate_size
  matmul = mc.num_layers * (2 * E * (H * D + 2 * K * D) + 2 * H * D * E + 3 * 2 * E * I) + 2 * E * mc.vocab_size
  attn = sum(4 * H * D * attended_keys_per_query(s, seq_len, K) for s in mc.layer_specs)
  return 3.0 * (matmul + attn)


_PEAK_TFLOPS = (("h100", 989.0), ("h200", 989.0), ("gh200", 989.0), ("b200", 2250.0), ("a100", 312.0),
                ("v6", 918.0), ("v5p", 459.0), ("v5 lite", 197.0), ("v5e", 197.0), ("v4", 275.0))


def peak_tflops(device=None) -> float | None:
  """Dense bf16 peak TFLOP/s of one device, from its kind; None when unknown (e.g. CPU)."""
  kind = (device or jax.devices()[0]).device_kind.lower()
  return next((v for k, v in _PEAK_TFLOPS if k in kind), None)


# ----------------------------------------------------------------------------- state


def abstract_model(mc: ModelConfig, mcfg) -> tuple[Any, Any]:
  """(graphdef, abstract params) without allocating anything."""
  model = nnx.eval_shape(lambda: _new_model(mc, mcfg, seed=0))
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def _new_model(mc: ModelConfig, mcfg, seed: int) -> Llama:
  return Llama(mc, rngs=nnx.Rngs(seed), dtype=DTYPES[mcfg.compute_dtype],
               param_dtype=DTYPES[mcfg.param_dtype], attn_impl=mcfg.attn_impl, remat=mcfg.remat)


def state_shardings(abstract_state, mesh):
  from longgen_jax import sharding
  return {"step": sharding.replicated(mesh),
          "params": sharding.fsdp_shardings(abstract_state["params"], mesh),
          "opt_state": sharding.fsdp_shardings(abstract_state["opt_state"], mesh)}


def new_train_state(params, optimizer: optax.GradientTransformation) -> dict:
  """{"step": 0, "params", "opt_state"}: the pytree the train step updates and checkpoints hold."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}


def init_state(cfg, mc: ModelConfig, optimizer, shardings) -> dict:
  """Fresh train state laid out by `shardings`: random init, or weights from cfg.init_from."""
  with_opt = lambda params: new_train_state(params, optimizer)
  if not cfg.init_from:
    make = lambda: with_opt(nnx.to_pure_dict(nnx.state(_new_model(mc, cfg.model, cfg.seed))))
    return jax.jit(make, out_shardings=shardings)()
  from longgen_jax.convert import load_pretrained
  model = load_pretrained(cfg.init_from, dtype=DTYPES[cfg.model.compute_dtype],
                          param_dtype=DTYPES[cfg.model.param_dtype], attn_impl=cfg.model.attn_impl,
                          remat=cfg.model.remat, layer_specs=mc.layer_specs, rope_theta=mc.rope_theta,
                          max_seq_len=mc.max_seq_len)
  params = jax.device_put(nnx.to_pure_dict(nnx.state(model)), shardings["params"])
  del model
  return jax.jit(with_opt, out_shardings=shardings)(params)


# ----------------------------------------------------------------------------- logging


class MetricsWriter:
  """metrics.jsonl (one JSON object per logged step) + TensorBoard, on the first host only."""

  def __init__(self, workdir: str, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not self.enabled:
      return
    if os.path.exists(self.path):  # drop steps the resumed run will redo (logged after the checkpoint)
      with open(self.path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(keep)
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, record: dict):
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)) and v is not None:
        self.tb.add_scalar(k, v, record["step"])
    self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


# ----------------------------------------------------------------------------- loop


def train(cfg, workdir: str) -> list[dict]:
  """Trains (or resumes) in `workdir`; returns the records written to metrics.jsonl by this call."""
  from tqdm import tqdm

  from longgen_jax import sharding
  from longgen_jax.checkpoint import Checkpointer
  from longgen_jax.data import make_datasets
  from longgen_jax.tokenizer import load_tokenizer

  validate_config(cfg)
  os.makedirs(workdir, exist_ok=True)
  tokenizer = load_tokenizer(cfg.data.tokenizer)
  mc = build_model_config(cfg, tokenizer.vocab_size)
  mesh = sharding.make_mesh(**cfg.mesh)
  batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if (cfg.batch_size // cfg.grad_accum) % batch_ways:
    raise ValueError(f"config.batch_size / grad_accum = {cfg.batch_size // cfg.grad_accum} sequences per "
                     f"micro-batch cannot be split over mesh data x fsdp = {batch_ways} devices")
  host_batch = cfg.batch_size // jax.process_count()
  train_ds, eval_ds = make_datasets(cfg.data, tokenizer, seq_len=cfg.seq_len, batch_size=host_batch,
                                    seed=cfg.seed)
  train_iter = iter(train_ds)

  optimizer, schedule = make_optimizer(cfg.optim, cfg.total_steps)
  graphdef, abstract_params = abstract_model(mc, cfg.model)
  shapes = jax.eval_shape(lambda p: new_train_state(p, optimizer), abstract_params)
  state_sh = state_shardings(shapes, mesh)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                shapes, state_sh)  # shapes with shardings: restore and compile targets
  resolved = {"train": cfg.to_dict(), "model": mc.to_dict()}

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints,
                      async_save=cfg.async_checkpoint)
  start = ckpt.latest_step()
  if start is not None:
    _warn_config_changes(ckpt.restore_config(start), resolved)
    state = ckpt.restore(start, abstract_state, train_iter)
    _log(f"resumed from step {start} in {ckpt.directory}")
  else:
    start = 0
    state = init_state(cfg, mc, optimizer, state_sh)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(resolved, f, indent=2)
  writer = MetricsWriter(workdir, start)

  A, T = cfg.grad_accum, cfg.seq_len
  batch_sh = sharding.batch_sharding(mesh, leading_dims=1)
  loss_fn = make_loss_fn(graphdef, loss_chunk=cfg.loss_chunk, segment_attention=cfg.model.segment_attention)
  step_fn = jax.jit(make_train_step(loss_fn, optimizer, schedule), in_shardings=(state_sh, batch_sh),
                    out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
  eval_fn = jax.jit(make_eval_step(loss_fn), in_shardings=(state_sh["params"], batch_sh),
                    out_shardings=sharding.replicated(mesh))

  def to_device(batch):
    local = {k: v.reshape(A, host_batch // A, T) for k, v in batch.items()}
    return sharding.host_to_global(local, batch_sh)

  tokens_per_step = cfg.batch_size * T
  flops_per_step = train_flops_per_token(mc, T) * tokens_per_step
  peak = (cfg.peak_tflops or peak_tflops() or 0.0) * 1e12 * jax.device_count()
  _log(f"model: {mc.num_layers} layers ({mc.num_full_layers} full), {_count(abstract_params) / 1e6:.1f}M params, "
       f"pattern {[str(s) for s in mc.layer_specs]}; {tokens_per_step} tokens/step on {jax.device_count()} "
       f"{jax.devices()[0].device_kind} device(s)")

  t0 = time.perf_counter()
  abstract_batch = {k: jax.ShapeDtypeStruct((A, cfg.batch_size // A, T), dt, sharding=batch_sh)
                    for k, dt in _batch_dtypes().items()}
  step_fn = step_fn.lower(abstract_state, abstract_batch).compile()
  _log(f"compiled train step in {time.perf_counter() - t0:.1f}s")

  records, window = [], []
  stop = _StopRequest()
  bar = tqdm(total=cfg.total_steps, initial=start, unit="step", dynamic_ncols=True,
             disable=not cfg.progress_bar or jax.process_index() != 0)
  try:
    for step in range(start + 1, cfg.total_steps + 1):
      t_step = time.perf_counter()
      batch = to_device(next(train_iter))
      state, m = step_fn(state, batch)
      loss, gnorm = float(m["loss"]), float(m["grad_norm"])
      dt = time.perf_counter() - t_step
      if not (math.isfinite(loss) and math.isfinite(gnorm)):
        ckpt.wait()
        raise TrainingDiverged(
            f"loss {loss} / grad norm {gnorm} at step {step} is not finite; stopped without saving. "
            f"Last complete checkpoint: step {ckpt.latest_step()} in {ckpt.directory} (resume from it "
            f"with a lower config.optim.lr or more warmup).")
      window.append(dt)
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}")
      evaluating = bool(eval_ds is not None and cfg.eval_every
                        and (step % cfg.eval_every == 0 or step == cfg.total_steps))
      if step % cfg.log_every == 0 or step == cfg.total_steps or evaluating:
        step_time = float(np.mean(window))
        rec = {"step": step, "loss": loss, "grad_norm": gnorm, "lr": float(m["lr"]),
               "tokens": int(m["tokens"]), "step_time_s": step_time,
               "tokens_per_s": tokens_per_step / step_time,
               "mfu": flops_per_step / step_time / peak if peak else None}
        window = []
        if evaluating:
          rec["eval_loss"] = evaluate(eval_fn, state["params"], eval_ds, cfg.eval_batches, to_device)
          bar.write(f"step {step}: loss {loss:.4f}, eval loss {rec['eval_loss']:.4f}")
        writer.write(rec)
        records.append(rec)
      stopping = stop.requested()
      if step % cfg.checkpoint_every == 0 or step == cfg.total_steps or stopping:
        ckpt.save(step, state, train_iter, resolved)
      if stopping:
        _log(f"SIGTERM: saved step {step}; run the same command again to resume")
        break
    ckpt.wait()
    if cfg.export_model and start < cfg.total_steps and not stop.requested():
      export_model(graphdef, state["params"], os.path.join(workdir, "model"))
  finally:
    stop.restore()
    bar.close()
    writer.close()
    ckpt.close()
  return records


class _StopRequest:
  """SIGTERM (preemption, scancel, Ctrl-C of a launcher) -> save a checkpoint at the next step, then stop.

  With several hosts the flag is agreed on every step, so all hosts save the same step.
  """

  def __init__(self):
    import signal
    import threading
    self._flag, self._old = False, None
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self._flag = True

  def requested(self) -> bool:
    if jax.process_count() == 1:
      return self._flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self._flag))))

  def restore(self):
    if self._old is not None:
      import signal
      signal.signal(signal.SIGTERM, self._old)
      self._old = None


def evaluate(eval_fn, params, eval_ds, num_batches: int, to_device) -> float:
  """Mean token loss over the first `num_batches` held-out batches (the same ones every time)."""
  it = iter(eval_ds)
  total = count = 0.0
  for _ in range(num_batches):
    try:
      batch = next(it)
    except StopIteration:
      break
    l, n = eval_fn(params, to_device(batch))
    total, count = total + float(l), count + float(n)
  return total / max(count, 1.0)


def export_model(graphdef, params, out_dir: str):
  """Final weights as config.json + params/ (what generate, evaluate and convert load)."""
  from longgen_jax.convert import save_model
  save_model(nnx.merge(graphdef, params), out_dir, overwrite=True)
  _log(f"exported model to {out_dir}")


def _batch_dtypes():
  return {"inputs": np.dtype(np.int32), "targets": np.dtype(np.int32), "positions": np.dtype(np.int32),
          "segment_ids": np.dtype(np.int32), "loss_mask": np.dtype(np.float32)}


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _log(msg: str):
  if jax.process_index() == 0:
    print(f"[train] {msg}", file=sys.stderr, flush=True)


_RESUME_SAFE = {"total_steps", "checkpoint_every", "log_every", "eval_every", "eval_batches",
                "keep_checkpoints", "async_checkpoint", "progress_bar", "peak_tflops", "export_model"}


def _warn_config_changes(saved: dict, now: dict):
  """Resuming with a different config is allowed but no longer exact: say what changed."""
  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
  a, b = flat(saved), flat(now)
  safe = _RESUME_SAFE
  if not b.get("train.optim.decay_steps") and b.get("train.optim.schedule") != "constant":
    # the lr decays over total_steps, so changing it changes every later step's lr
    safe = safe - {"total_steps"}
  changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                   and k.removeprefix("train.") not in safe)
  if changed:
    _log(f"WARNING: resuming with changed settings {changed}; the run will not match an uninterrupted one")


# ----------------------------------------------------------------------------- CLI


def main(argv):
  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  if flags.FLAGS.distributed:  # before anything touches a device
    jax.distributed.initialize()
  cfg, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  try:
    train(cfg, workdir)
  except TrainingDiverged as e:
    print(f"[train] ERROR: {e}", file=sys.stderr)
    sys.exit(1)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py)",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, TensorBoard events, config.json")
  flags.DEFINE_bool("distributed", False, "one process per host: call jax.distributed.initialize() first "
                    "(finds the other hosts on TPU pods, SLURM and Open MPI)")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
