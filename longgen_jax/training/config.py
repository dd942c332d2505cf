"""The training config: every key a run may set (ml_collections), validation that names the
offending key, and the ModelConfig a run trains."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import jax

from longgen_jax.attention.registry import USER_NAMES
from longgen_jax.attention.spec import parse_spec
from longgen_jax.model.config import DTYPES, PLACEMENTS, PRESETS, REMAT_POLICIES, ModelConfig, preset
from longgen_jax.parallel.context import FULL_STRATEGIES, SPARSE_STRATEGIES, ContextStrategy

if TYPE_CHECKING:
  import ml_collections


def load_config_module(path: str | os.PathLike):
  """A config file as a module (configs/*.py are files, not a package): for configs built on another
  file's helpers (configs/repro/*.py on base.py)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"no config file at {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(path: str | os.PathLike) -> "ml_collections.ConfigDict":
  """`get_config()` of a config file."""
  return load_config_module(path).get_config()


def default_config() -> "ml_collections.ConfigDict":
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
      attn_impl="auto",         # attention.registry.USER_NAMES: auto, pallas, cudnn, xla_blockwise, reference
      remat="none",             # model.config.REMAT_POLICIES: none, full, dots, offload
      scan_layers=True,         # runs of equal layers as one lax.scan (compile time flat in depth); False unrolls
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
      host_split="rows",        # several processes: "rows" = each packs the global batches and feeds its
                                # devices' slices (the same batches for any process count); "documents" =
                                # each reads 1/processes of the documents (no repeated tokenizing, for pods)
      synthetic=ml_collections.ConfigDict(dict(num_docs=20000, seed=0, min_chars=200, max_chars=4000)),
  ))
  # Device mesh (parallel.mesh); one size may be -1 (the rest of the devices). context splits each
  # sequence over devices (the load-balanced layout of parallel.layout; attention per parallel.context).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1))
  c.parallel = ml_collections.ConfigDict(dict(
      full_strategy="ring",       # full layers under context > 1: ring (K/V rotate), ring_loop or all_gather
      sparse_strategy="halo",     # sink_window / block_sparse layers under context > 1: halo (only the
                                  # window's keys move) or all_gather
  ))
  c.loss_chunk = 2048           # logits computed this many positions at a time
  c.log_every = 1
  c.eval_every = 100            # 0 = never
  c.eval_batches = 4
  c.checkpoint_every = 500      # 0 = never (benchmarks): no periodic or final save; a SIGTERM still saves
  c.keep_checkpoints = 3
  c.async_checkpoint = True
  c.export_model = True         # write WORKDIR/model (convert.py's format) at the end
  c.progress_bar = True
  c.peak_tflops = 0.0           # per device, for MFU; 0 = look up the device kind
  c.dry_run = False             # compile the step, print per-device memory and FLOPs, load nothing, stop
  c.dry_run_devices = 0         # with dry_run: plan the mesh for this many devices from one machine (GPU: JAX
                                # mocks them on one GPU, compile only; CPU: host devices); 0 = the real ones
  c.profile_steps = ""          # "FIRST,LAST": jax.profiler trace of those steps in WORKDIR/profile
  c.compile_cache_dir = "auto"  # JAX persistent compilation cache: auto = ~/.cache/longgen_jax/jax_compile, "" = off
  return c


def config_keys(cfg, prefix: str = "") -> set[str]:
  """Dotted names of every leaf key of a (nested) config."""
  keys = set()
  for k, v in cfg.items():
    keys |= config_keys(v, f"{prefix}{k}.") if hasattr(v, "items") else {f"{prefix}{k}"}
  return keys


def unknown_keys(cfg) -> list[str]:
  """Keys a config sets that default_config() does not have (typos; nothing would read them)."""
  return sorted(config_keys(cfg) - config_keys(default_config()))


def validate_config(cfg) -> None:
  """Raises ValueError naming the offending key for values the run cannot use."""
  if "mesh" in cfg and "sequence" in cfg.mesh:
    raise ValueError("config.mesh.sequence was renamed to config.mesh.context (context parallelism)")
  unknown = unknown_keys(cfg)
  if unknown:
    raise ValueError(f"unknown config key(s) {unknown}; every key is listed in "
                     "longgen_jax/training/config.py:default_config")

  def need(cond, key, msg):
    if not cond:
      raise ValueError(f"config.{key}={_get(cfg, key)!r}: {msg}")
  need(cfg.total_steps >= 1, "total_steps", "must be >= 1")
  need(cfg.seq_len >= 2, "seq_len", "must be >= 2")
  need(cfg.batch_size >= 1, "batch_size", "must be >= 1")
  need(cfg.grad_accum >= 1, "grad_accum", "must be >= 1")
  need(cfg.batch_size % cfg.grad_accum == 0, "batch_size", f"must be divisible by grad_accum = {cfg.grad_accum}")
  need(cfg.dry_run_devices >= 0, "dry_run_devices", "must be >= 0 (0 = this machine's devices)")
  need(cfg.dry_run or not cfg.dry_run_devices, "dry_run_devices", "plans a mesh for a dry run: set dry_run=True too")
  if cfg.data.host_split == "documents" and not cfg.dry_run_devices:  # each process packs its own share
    need(cfg.batch_size % (cfg.grad_accum * jax.process_count()) == 0, "batch_size",  # ("rows": all of it)
         f"with data.host_split='documents' must be divisible by grad_accum * hosts = {cfg.grad_accum} * "
         f"{jax.process_count()}")
  need(cfg.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0 = never)")
  need(cfg.log_every >= 1, "log_every", "must be >= 1")
  need(cfg.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
  need(cfg.optim.schedule in ("cosine", "linear", "constant"), "optim.schedule",
       "choose cosine, linear or constant")
  need(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
  need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
  if cfg.profile_steps:
    parts = cfg.profile_steps.split(",")
    need(len(parts) <= 2 and all(p.strip().isdigit() and int(p) >= 1 for p in parts)
         and int(parts[0]) <= int(parts[-1]), "profile_steps", "must be 'FIRST,LAST' (or one step), 1 <= FIRST <= LAST")
  need(cfg.data.host_split in ("rows", "documents"), "data.host_split", "choose rows or documents")
  need(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
  need(cfg.optim.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 = no clipping)")
  need(cfg.eval_every >= 0, "eval_every", "must be >= 0 (0 = never)")
  need(cfg.eval_batches >= 1 or not cfg.eval_every, "eval_batches", "must be >= 1 when eval_every > 0")
  need(cfg.model.num_layers >= 0, "model.num_layers", "must be >= 1 (or 0 for the preset's)")
  need(cfg.model.num_full_layers >= -1, "model.num_full_layers", "must be >= 0 (or -1 to keep the pattern)")
  need(cfg.model.rope_theta >= 0, "model.rope_theta", "must be > 0 (or 0 to keep)")
  need(0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
  need(cfg.model.compute_dtype in DTYPES, "model.compute_dtype", f"choose from {list(DTYPES)}")
  need(cfg.model.param_dtype in DTYPES, "model.param_dtype", f"choose from {list(DTYPES)}")
  need(cfg.model.remat in REMAT_POLICIES, "model.remat", f"choose from {list(REMAT_POLICIES)}")
  need(cfg.model.placement in PLACEMENTS, "model.placement", f"choose from {list(PLACEMENTS)}")
  for axis in ("data", "fsdp", "context", "tensor"):
    need(cfg.mesh[axis] == -1 or cfg.mesh[axis] >= 1, f"mesh.{axis}", "must be >= 1 (or -1: the rest of the devices)")
  need(cfg.parallel.full_strategy in FULL_STRATEGIES, "parallel.full_strategy", f"choose from {list(FULL_STRATEGIES)}")
  need(cfg.parallel.sparse_strategy in SPARSE_STRATEGIES, "parallel.sparse_strategy",
       f"choose from {list(SPARSE_STRATEGIES)}")
  need(cfg.model.attn_impl in USER_NAMES, "model.attn_impl", f"choose from {list(USER_NAMES)}")
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


def context_strategy(cfg) -> ContextStrategy:
  """The run's context-parallel strategies (config.parallel)."""
  return ContextStrategy(full=cfg.parallel.full_strategy, sparse=cfg.parallel.sparse_strategy)


def _get(cfg, dotted: str):
  for k in dotted.split("."):
    cfg = cfg[k]
  return cfg


def build_model_config(cfg, tokenizer_vocab: int) -> ModelConfig:
  """The model the run trains: preset (or init_from's config) + pattern, rope and length overrides."""
  m = cfg.model
  if cfg.init_from:
    from longgen_jax.weights import load_config
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


_RESUME_SAFE = {"compile_cache_dir", "dry_run", "dry_run_devices", "profile_steps", "total_steps", "checkpoint_every", "log_every", "eval_every", "eval_batches",
                "keep_checkpoints", "async_checkpoint", "progress_bar", "peak_tflops", "export_model"}


def changed_settings(saved: dict, now: dict) -> list[str]:
  """Keys whose change makes a resumed run differ from an uninterrupted one."""
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
  return changed
